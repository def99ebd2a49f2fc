/**
 * A plain directory as a layer: one walk at mount time (lstat of every path,
 * one `getfattr -R` for all xattrs) produces its LayerIndex; the bytes of its
 * regular files are the files themselves.
 *
 * Whiteouts and opaque directories are understood in both dialects, so
 * directories prepared for kernel overlayfs (or left behind by it or by
 * fuse-overlayfs as an upper dir) work unchanged:
 * - OCI: a `.wh.<name>` file deletes `<name>`; a `.wh..wh..opq` file makes
 *   its directory opaque;
 * - overlayfs: a 0/0 character device deletes its own name; an opaque xattr
 *   (`trusted.overlay.opaque`, `user.overlay.opaque` or fuse-overlayfs'
 *   `user.fuseoverlayfs.opaque`, value `y`) makes a directory opaque.
 * The union filesystem's own bookkeeping xattrs are not part of the content
 * and are dropped from the entries.
 */
import { lstat, readdir, readlink } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import { join, resolve } from 'node:path';
import { ErrorCodes, LayerdError, asLayerdError } from '../common/errors.js';
import { LAYER_INDEX_VERSION, xattrsFromBuffers, type ContentRef, type EntryKind, type LayerEntry, type LayerIndex, type LayerSource } from '../storage/layerIndex.js';
import { OPAQUE_MARKER, WHITEOUT_PREFIX, isFuseHidden, joinPath } from './paths.js';
import { readXattrTree, type XattrMap } from './xattrTool.js';

export type MarkerStyle = 'oci' | 'overlay';

export interface ScannedDirectory {
  readonly root: string;
  readonly index: LayerIndex;
  /** st_ino of every entry, by path (the upper dir's inode numbers come from here). */
  readonly inodes: Map<string, number>;
  /** How each whiteout is represented on disk. */
  readonly whiteoutStyles: Map<string, MarkerStyle>;
  /** xattrs of each entry as read (including none), by path. */
  readonly xattrs: Map<string, XattrMap>;
}

const OPAQUE_XATTRS = ['trusted.overlay.opaque', 'user.overlay.opaque', 'user.fuseoverlayfs.opaque'];
const PRIVATE_XATTR_PREFIXES = ['trusted.overlay.', 'user.overlay.', 'user.fuseoverlayfs.'];

function isPrivateXattr(name: string): boolean {
  return PRIVATE_XATTR_PREFIXES.some((prefix) => name.startsWith(prefix));
}

function kindOf(st: Stats): EntryKind | undefined {
  if (st.isFile()) return 'file';
  if (st.isDirectory()) return 'dir';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isCharacterDevice()) return 'char';
  if (st.isBlockDevice()) return 'block';
  if (st.isFIFO()) return 'fifo';
  return undefined; // sockets have no place in an image
}

export function devMajor(rdev: number): number {
  return ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
}

export function devMinor(rdev: number): number {
  return (rdev & 0xff) | ((rdev >>> 12) & 0xfff00);
}

export function makeDev(major: number, minor: number): number {
  return ((minor & 0xff) | ((major & 0xfff) << 8) | ((minor & ~0xff) << 12)) >>> 0;
}

/** Walk `dir` once and describe it as a layer. */
export async function scanDirectory(dir: string, label?: string): Promise<ScannedDirectory> {
  const root = resolve(dir);
  let xattrTree: Map<string, XattrMap>;
  try {
    xattrTree = await readXattrTree(root);
  } catch (err) {
    throw asLayerdError(err, ErrorCodes.EIO, { path: root, op: 'getfattr' });
  }
  const entries: LayerEntry[] = [];
  const whiteouts: string[] = [];
  const opaques: string[] = [];
  const inodes = new Map<string, number>();
  const whiteoutStyles = new Map<string, MarkerStyle>();
  const xattrs = new Map<string, XattrMap>();
  const firstNameOfInode = new Map<string, string>();

  const rootStat = await lstat(root).catch((err: unknown) => {
    throw new LayerdError(ErrorCodes.ENOTFOUND, `cannot read layer directory ${root}`, { path: root }, { cause: err });
  });
  if (!rootStat.isDirectory()) throw new LayerdError(ErrorCodes.EINVAL, `${root} is not a directory`, { path: root });

  const describe = (path: string, st: Stats, kind: EntryKind, target?: string): void => {
    const raw = xattrTree.get(path === '' ? root : join(root, path)) ?? new Map<string, Buffer>();
    const kept = new Map([...raw].filter(([name]) => !isPrivateXattr(name)));
    xattrs.set(path, kept);
    inodes.set(path, st.ino);
    const entry: LayerEntry = {
      path, kind, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid,
      mtime: Math.floor(st.mtimeMs / 1000), size: kind === 'file' ? st.size : 0,
    };
    const x = xattrsFromBuffers(kept);
    if (x !== undefined) entry.xattrs = x;
    if (target !== undefined) entry.target = target;
    if (kind === 'char' || kind === 'block') {
      entry.devMajor = devMajor(st.rdev);
      entry.devMinor = devMinor(st.rdev);
    }
    if (kind === 'file' && st.nlink > 1) {
      const key = `${st.dev}:${st.ino}`;
      const first = firstNameOfInode.get(key);
      if (first === undefined) firstNameOfInode.set(key, path);
      else entry.link = first;
    }
    if (kind === 'dir' && OPAQUE_XATTRS.some((name) => raw.get(name)?.toString('latin1') === 'y')) opaques.push(path);
    entries.push(entry);
  };

  describe('', rootStat, 'dir');
  const walk = async (dirPath: string): Promise<void> => {
    const names = (await readdir(join(root, dirPath))).sort();
    const stats = await Promise.all(names.map((name) => lstat(join(root, dirPath, name))));
    const targets = await Promise.all(names.map((name, i) => (stats[i]!.isSymbolicLink() ? readlink(join(root, dirPath, name)) : undefined)));
    const subdirs: string[] = [];
    names.forEach((name, i) => {
      const path = joinPath(dirPath, name);
      const st = stats[i]!;
      if (name === OPAQUE_MARKER) { opaques.push(dirPath); return; }
      if (isFuseHidden(name)) return; // a file unlinked while open: transient, not content
      if (name.startsWith(WHITEOUT_PREFIX + WHITEOUT_PREFIX)) return; // other aufs metadata
      if (name.startsWith(WHITEOUT_PREFIX)) {
        const target = joinPath(dirPath, name.slice(WHITEOUT_PREFIX.length));
        whiteouts.push(target);
        whiteoutStyles.set(target, 'oci');
        return;
      }
      const kind = kindOf(st);
      if (kind === undefined) return;
      if (kind === 'char' && st.rdev === 0) {
        whiteouts.push(path);
        whiteoutStyles.set(path, 'overlay');
        return;
      }
      describe(path, st, kind, targets[i]);
      if (kind === 'dir') subdirs.push(path);
    });
    for (const sub of subdirs) await walk(sub);
  };
  await walk('');

  const index: LayerIndex = { version: LAYER_INDEX_VERSION, id: label ?? `dir:${root}`, entries, whiteouts, opaques };
  return { root, index, inodes, whiteoutStyles, xattrs };
}

/** A LayerSource whose bytes are the directory's own files. */
export function directorySource(scanned: ScannedDirectory): LayerSource {
  const { root, index } = scanned;
  return {
    index,
    content(entry: LayerEntry): ContentRef | undefined {
      if (entry.kind !== 'file' || entry.size === 0) return undefined;
      return { path: join(root, entry.link ?? entry.path), offset: 0, size: entry.size };
    },
  };
}

/** Build a layer from a plain directory (one walk, now). */
export async function lowerDirSource(dir: string, label?: string): Promise<LayerSource> {
  return directorySource(await scanDirectory(dir, label));
}
