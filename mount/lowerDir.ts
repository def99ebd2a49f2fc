/**
 * A plain directory as a layer: one walk at mount time produces its
 * LayerIndex; the bytes of its regular files are the files themselves.
 *
 * The walk and every later open go through the system-call layer
 * (common/sys) relative to the directory's root descriptor: no symlink is
 * followed in any component, so an owner who swaps a scanned subdirectory
 * for a symlink to /etc gets a refused open, never a host file. A file's
 * bytes are opened beneath the root and must be the very file the walk saw
 * (same device, inode, type and size), or the open fails with ESTALE.
 *
 * Markers (mount/upperFormat.ts):
 * - 'overlay' (a writable layer, or a directory prepared for kernel
 *   overlayfs): a 0/0 character device deletes its own name; the opaque
 *   xattr (`trusted.overlay.opaque` or `user.overlay.opaque` = "y") makes a
 *   directory opaque; escaped xattrs are the user's, other overlay xattrs
 *   are bookkeeping and dropped; every file name is a name.
 * - 'layer-dir' (a directory a host user prepares as a layer): the same,
 *   plus OCI `.wh.<name>` files and `.wh..wh..opq` markers, and
 *   fuse-overlayfs' opaque xattr.
 */
import { join, resolve } from 'node:path';
import {
  O_DIRECTORY, O_RDONLY, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK, close, devMajor, devMinor,
  fstat, openBeneath, openRoot, readDirFd, readXattrsAt, readlinkAt, statAt, type Stat,
} from '../common/sys/fs.js';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { errnoNameOf, fsError } from '../common/sys/errors.js';
import { LAYER_INDEX_VERSION, xattrsFromBuffers, type ContentRef, type EntryKind, type LayerEntry, type LayerIndex, type LayerSource } from '../storage/layerIndex.js';
import { OPAQUE_MARKER, WHITEOUT_PREFIX, joinPath } from './paths.js';
import { FUSE_OVERLAYFS_OPAQUE, OPAQUE_XATTRS, userXattrName, type MarkerDialect } from './upperFormat.js';

export type { MarkerDialect } from './upperFormat.js';
export { devMajor, devMinor, makeDev } from '../common/sys/fs.js';

/** xattr name → exact value bytes. */
export type XattrMap = Map<string, Buffer>;

/** How a whiteout is represented on disk: an OCI `.wh.` file or an overlayfs 0/0 device. */
export type MarkerStyle = 'oci' | 'overlay';

export interface ScannedDirectory {
  readonly root: string;
  readonly index: LayerIndex;
  /** st_ino of every entry, by path (the upper dir's inode numbers come from here). */
  readonly inodes: Map<string, number>;
  /** st_dev of the directory's filesystem (content opens check it). */
  readonly dev: number;
  /** st_dev of the entries on another filesystem (something mounted inside the directory), by path. */
  readonly devs: Map<string, number>;
  /** How each whiteout is represented on disk. */
  readonly whiteoutStyles: Map<string, MarkerStyle>;
  /** The user's xattrs of each entry (including none), by path. */
  readonly xattrs: Map<string, XattrMap>;
}

function kindOf(mode: number): EntryKind | undefined {
  switch (mode & S_IFMT) {
    case S_IFREG: return 'file';
    case S_IFDIR: return 'dir';
    case S_IFLNK: return 'symlink';
    case S_IFCHR: return 'char';
    case S_IFBLK: return 'block';
    case S_IFIFO: return 'fifo';
    case S_IFSOCK: return 'socket';
    default: return undefined;
  }
}

/** Names that vanish or change between listing and stat: the directory is being edited; the next walk sees them. */
const CHANGED_MEANWHILE = new Set(['ENOENT', 'ELOOP', 'ENOTDIR']);

function userXattrs(raw: XattrMap, dialect: MarkerDialect): XattrMap {
  const kept = new Map<string, Buffer>();
  for (const [stored, value] of raw) {
    if (dialect === 'layer-dir' && stored.startsWith('user.fuseoverlayfs.')) continue;
    const name = userXattrName(stored);
    if (name !== undefined) kept.set(name, value);
  }
  return kept;
}

function readXattrsQuietly(dirfd: number, name: string, label: string): XattrMap {
  try {
    return readXattrsAt(dirfd, name, label);
  } catch (err) {
    if (errnoNameOf(err) === 'EOPNOTSUPP') return new Map(); // a filesystem without xattrs
    throw err;
  }
}

/** Walk `dir` once and describe it as a layer. */
export async function scanDirectory(dir: string, label?: string, dialect: MarkerDialect = 'overlay'): Promise<ScannedDirectory> {
  const root = resolve(dir);
  let rootFd: number;
  try {
    rootFd = openRoot(root);
  } catch (err) {
    throw new LayerdError(ErrorCodes.ENOTFOUND, `cannot read layer directory ${root}`, { path: root }, { cause: err });
  }
  try {
    return await walkDirectory(root, rootFd, label, dialect);
  } finally {
    close(rootFd);
  }
}

/**
 * Entries walked between two yields to the event loop: a walk of a big tree
 * (tens of thousands of entries, ~30 µs each) must not stall the process for
 * seconds — a mount host serving other mounts, the daemon answering containerd
 * while it ingests an unpacked layer.
 */
const ENTRIES_PER_YIELD = 256;

async function walkDirectory(root: string, rootFd: number, label: string | undefined, dialect: MarkerDialect): Promise<ScannedDirectory> {
  const entries: LayerEntry[] = [];
  const whiteouts: string[] = [];
  const opaques: string[] = [];
  const inodes = new Map<string, number>();
  const whiteoutStyles = new Map<string, MarkerStyle>();
  const xattrs = new Map<string, XattrMap>();
  const firstNameOfInode = new Map<string, string>();
  const devs = new Map<string, number>();

  const rootStat = fstat(rootFd, root);
  if ((rootStat.mode & S_IFMT) !== S_IFDIR) throw new LayerdError(ErrorCodes.EINVAL, `${root} is not a directory`, { path: root });

  const describe = (path: string, st: Stat, kind: EntryKind, raw: XattrMap, target?: string): void => {
    xattrs.set(path, userXattrs(raw, dialect));
    inodes.set(path, st.ino);
    if (st.dev !== rootStat.dev) devs.set(path, st.dev);
    const entry: LayerEntry = {
      path, kind, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, mtime: st.mtime.sec, size: kind === 'file' ? st.size : 0,
    };
    if (st.mtime.nsec !== 0) entry.mtimeNsec = st.mtime.nsec;
    const x = xattrsFromBuffers(xattrs.get(path)!);
    if (x !== undefined) entry.xattrs = x;
    if (target !== undefined) entry.target = target;
    if (kind === 'char' || kind === 'block') {
      entry.devMajor = devMajor(st.rdev);
      entry.devMinor = devMinor(st.rdev);
    }
    if (kind !== 'dir' && st.nlink > 1) {
      const key = `${st.dev}:${st.ino}`;
      const first = firstNameOfInode.get(key);
      if (first === undefined) firstNameOfInode.set(key, path);
      else entry.link = first;
    }
    const opaqueMarkers = dialect === 'layer-dir' ? [...OPAQUE_XATTRS, FUSE_OVERLAYFS_OPAQUE] : OPAQUE_XATTRS;
    if (kind === 'dir' && opaqueMarkers.some((name) => raw.get(name)?.toString('latin1') === 'y')) opaques.push(path);
    entries.push(entry);
  };

  describe('', rootStat, 'dir', readXattrsQuietly(rootFd, '', root));
  let sinceYield = 0;
  const walk = async (dirPath: string, dirFd: number): Promise<void> => {
    const names = readDirFd(dirFd, join(root, dirPath)).map((e) => e.name).sort();
    const subdirs: string[] = [];
    for (const name of names) {
      if (++sinceYield >= ENTRIES_PER_YIELD) {
        sinceYield = 0;
        await new Promise<void>((done) => setImmediate(done));
      }
      const path = joinPath(dirPath, name);
      const where = join(root, path);
      if (dialect === 'layer-dir' && name.startsWith(WHITEOUT_PREFIX)) {
        if (name === OPAQUE_MARKER) opaques.push(dirPath);
        else if (!name.startsWith(WHITEOUT_PREFIX + WHITEOUT_PREFIX)) { // .wh..wh.* : other aufs metadata
          const target = joinPath(dirPath, name.slice(WHITEOUT_PREFIX.length));
          whiteouts.push(target);
          whiteoutStyles.set(target, 'oci');
        }
        continue;
      }
      let st: Stat;
      try {
        st = statAt(dirFd, name, where);
      } catch (err) {
        if (CHANGED_MEANWHILE.has(errnoNameOf(err) ?? '')) continue;
        throw err;
      }
      const kind = kindOf(st.mode);
      if (kind === undefined) continue;
      if (kind === 'char' && st.rdev === 0) {
        whiteouts.push(path);
        whiteoutStyles.set(path, 'overlay');
        continue;
      }
      let target: string | undefined;
      if (kind === 'symlink') {
        try { target = readlinkAt(dirFd, name, where); } catch (err) {
          if (CHANGED_MEANWHILE.has(errnoNameOf(err) ?? '') || errnoNameOf(err) === 'EINVAL') continue;
          throw err;
        }
      }
      describe(path, st, kind, readXattrsQuietly(dirFd, name, where), target);
      if (kind === 'dir') subdirs.push(name);
    }
    for (const name of subdirs) {
      const path = joinPath(dirPath, name);
      let fd: number;
      try {
        fd = openBeneath(dirFd, name, O_RDONLY | O_DIRECTORY);
      } catch (err) {
        if (CHANGED_MEANWHILE.has(errnoNameOf(err) ?? '')) continue; // swapped for something else: not walked
        throw err;
      }
      try {
        const st = fstat(fd, join(root, path));
        if (st.ino !== inodes.get(path) || st.dev !== (devs.get(path) ?? rootStat.dev)) continue; // not the directory just described
        await walk(path, fd);
      } finally {
        close(fd);
      }
    }
  };
  const top = openBeneath(rootFd, '', O_RDONLY | O_DIRECTORY);
  try {
    await walk('', top);
  } finally {
    close(top);
  }

  const index: LayerIndex = { version: LAYER_INDEX_VERSION, id: label ?? `dir:${root}`, entries, whiteouts, opaques };
  return { root, index, inodes, dev: rootStat.dev, devs, whiteoutStyles, xattrs };
}

/**
 * Open a regular file of a scanned directory for reading: beneath the root,
 * no symlink anywhere, and it must be the file the walk saw.
 */
export function openScannedFile(root: string, path: string, dev: number, ino: number, size: number): number {
  const rootFd = openRoot(root);
  let fd: number;
  try {
    fd = openBeneath(rootFd, path, O_RDONLY);
  } finally {
    close(rootFd);
  }
  const st = fstat(fd, join(root, path));
  // Inode numbers are reused at once: a size that changed also means "not what the walk saw".
  if (st.ino !== ino || st.dev !== dev || (st.mode & S_IFMT) !== S_IFREG || st.size !== size) {
    close(fd);
    throw fsError('ESTALE', join(root, path), 'open layer file (changed since the directory was read)');
  }
  return fd;
}

/** A LayerSource whose bytes are the directory's own files, each opened safely (openScannedFile). */
export function directorySource(scanned: Pick<ScannedDirectory, 'root' | 'index' | 'inodes' | 'dev' | 'devs'>): LayerSource {
  const { root, index, inodes, dev, devs } = scanned;
  return {
    index,
    content(entry: LayerEntry): ContentRef | undefined {
      if (entry.kind !== 'file' || entry.size === 0) return undefined;
      const path = entry.link ?? entry.path;
      const ino = inodes.get(path) ?? -1;
      const open = (): number => openScannedFile(root, path, devs.get(path) ?? dev, ino, entry.size);
      // The file itself can stand behind a passthrough open (as kernel overlayfs reads a lower file).
      return { path: join(root, path), offset: 0, size: entry.size, open, whole: open };
    },
  };
}

/** Build a layer from a plain directory (one walk, now). */
export async function lowerDirSource(dir: string, label?: string, dialect: MarkerDialect = 'overlay'): Promise<LayerSource> {
  return directorySource(await scanDirectory(dir, label, dialect));
}
