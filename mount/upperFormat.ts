/**
 * How a union's own bookkeeping is written into a directory, so that nothing
 * a user can create reads back as bookkeeping.
 *
 * A writable layer ("upper") is kept in kernel overlayfs's format:
 * - a deleted name is a character device 0/0 under that name. Users cannot
 *   make one: mknod of a 0/0 device through the union is refused (EPERM),
 *   as kernel overlayfs refuses it;
 * - an opaque directory carries the xattr `trusted.overlay.opaque` = "y"
 *   (`user.overlay.opaque` when the server is not root and cannot write
 *   trusted.* attributes);
 * - a user's own xattr in those two namespaces is stored *escaped*, one
 *   `overlay.` more (`trusted.overlay.opaque` → `trusted.overlay.overlay.opaque`),
 *   as kernel overlayfs 6.7+ escapes them, so it never reads back as a marker;
 * - file names are the user's, all of them: `.wh.foo` is a file named
 *   `.wh.foo`.
 * So kernel overlayfs can mount a layerd upper, and layerd an overlayfs one.
 *
 * Layer directories a host user prepares (`run --layer-dir`, `commit
 * --layer-dir`) are the owner's own description of a layer: there `.wh.X`
 * and `.wh..wh..opq` files are OCI markers too (the 'layer-dir' dialect).
 */

/** How a directory's markers are read. */
export type MarkerDialect = 'overlay' | 'layer-dir';

const PRIVATE_PREFIXES = ['trusted.overlay.', 'user.overlay.'] as const;
const ESCAPE = 'overlay.';

/** The opaque marker this server writes (trusted.* needs CAP_SYS_ADMIN). */
export const OPAQUE_XATTR = process.getuid?.() === 0 ? 'trusted.overlay.opaque' : 'user.overlay.opaque';
/** Opaque markers read, in either namespace. */
export const OPAQUE_XATTRS: readonly string[] = ['trusted.overlay.opaque', 'user.overlay.opaque'];
/** fuse-overlayfs' own opaque marker: read only in layer directories prepared by hand or by it. */
export const FUSE_OVERLAYFS_OPAQUE = 'user.fuseoverlayfs.opaque';

/** The name a user's xattr is stored under in an upper. */
export function storedXattrName(name: string): string {
  for (const prefix of PRIVATE_PREFIXES) if (name.startsWith(prefix)) return prefix + ESCAPE + name.slice(prefix.length);
  return name;
}

/**
 * The user's name of a stored xattr, or undefined for the union's own
 * bookkeeping (not content: never listed, never copied into a layer).
 */
export function userXattrName(stored: string): string | undefined {
  for (const prefix of PRIVATE_PREFIXES) {
    if (!stored.startsWith(prefix)) continue;
    return stored.startsWith(prefix + ESCAPE) ? prefix + stored.slice(prefix.length + ESCAPE.length) : undefined;
  }
  return stored;
}
