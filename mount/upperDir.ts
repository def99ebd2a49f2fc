/**
 * The writable upper directory: a real directory tree that, with the
 * whiteouts and opaque markers written into it (mount/upperFormat.ts), is
 * the changeset of the lower layers. This module only touches the disk;
 * which paths to touch is decided by the union core.
 *
 * Every call goes through the system-call layer relative to the upper's root
 * descriptor, by union path: the parent directory is opened beneath the root
 * with no symlink followed, and the call acts on the final name without
 * following it. So a long path never passes PATH_MAX as `upper + path`
 * would, and a symlink a container made is never a way out.
 *
 * Metadata calls are synchronous (µs each on a local disk, where a thread-pool
 * round trip costs ~50 µs of CPU); file content moves on the thread pool.
 */
import { fchownSync, read, readSync, write, writeSync } from 'node:fs';
import {
  O_DIRECTORY, O_PATH, O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, S_IFCHR, S_IFMT, close, chmodAt, chownAt,
  fstat, linkAt, listXattrsAt, mkdirAt, mknodAt, openBeneath, openRoot, readDirFd, readlinkAt, removeXattrAt, renameAt,
  setXattrAt, statAt, symlinkAt, unlinkAt, utimensAt, getXattrAt, fsetXattr, futimens, type Stat, type TimeChange,
} from '../common/sys/fs.js';
import { errnoNameOf, fsError } from '../common/sys/errors.js';
import { type ContentRef, type EntryKind, type LayerEntry, openContent, xattrBytes } from '../storage/layerIndex.js';
import { SYNC_IO_MAX, callback as call } from './openFiles.js';
import { baseName, parentOf } from './paths.js';
import { OPAQUE_XATTR, storedXattrName, userXattrName } from './upperFormat.js';
import type { XattrMap } from './lowerDir.js';

export type NodeKind = 'fifo' | 'char' | 'block' | 'socket';

/** How many directories' descriptors an upper keeps open (dirFd): a few per mount, as many mounts share a host's descriptor limit. */
const KEPT_DIR_FDS = 16;

const TYPE_OF: Record<NodeKind, number> = { fifo: 0o010000, char: 0o020000, block: 0o060000, socket: 0o140000 };

export class UpperDir {
  /** Descriptor of the upper's root, for the union's lifetime. */
  private readonly rootFd: number;

  /** Directories' descriptors kept between calls (dirFd), oldest first. */
  private readonly dirFds = new Map<string, number>();

  constructor(readonly root: string) {
    this.rootFd = openRoot(root);
  }

  close(): void {
    this.forgetDirs('');
    close(this.rootFd);
  }

  /** Where `path` is, for messages. */
  pathOf(path: string): string {
    return path === '' ? this.root : `${this.root}/${path}`;
  }

  /** Run `op` on the final name of `path` with its parent directory's descriptor ("" = the root itself). */
  private at<T>(path: string, op: (dirfd: number, name: string) => T): T {
    if (path === '') return op(this.rootFd, '');
    const slash = path.lastIndexOf('/');
    if (slash < 0) return op(this.rootFd, path);
    return op(this.dirFd(path.slice(0, slash)), path.slice(slash + 1));
  }

  /**
   * An O_PATH descriptor of the directory `dir`, opened beneath the root
   * with no symlink followed, and kept for the next calls in it: a file
   * made in a directory is then chowned, chmodded, timed and stat'ed there,
   * and resolving the path again for each (openat2 + close) was the largest
   * item of the server's CPU profile while untarring into a mount. Only
   * this union changes the upper's directories while it is mounted (as
   * with overlayfs, changing the upper behind a mount is not supported);
   * its renames and removals of directories drop what they move or remove.
   */
  private dirFd(dir: string): number {
    const kept = this.dirFds.get(dir);
    if (kept !== undefined) return kept;
    const fd = openBeneath(this.rootFd, dir, O_PATH | O_DIRECTORY);
    if (this.dirFds.size >= KEPT_DIR_FDS) {
      const [oldest, oldestFd] = this.dirFds.entries().next().value as [string, number];
      this.dirFds.delete(oldest);
      close(oldestFd);
    }
    this.dirFds.set(dir, fd);
    return fd;
  }

  /** Forget kept descriptors of `path` and of the directories beneath it (it was renamed or removed). */
  private forgetDirs(path: string): void {
    if (this.dirFds.size === 0) return;
    const prefix = `${path}/`;
    for (const [dir, fd] of this.dirFds) {
      if (path === '' || dir === path || dir.startsWith(prefix)) {
        this.dirFds.delete(dir);
        close(fd);
      }
    }
  }

  /** Two names at once (link, rename): both parents opened beneath the root. */
  private at2<T>(a: string, b: string, op: (dirA: number, nameA: string, dirB: number, nameB: string) => T): T {
    return this.at(a, (dirA, nameA) => this.at(b, (dirB, nameB) => op(dirA, nameA, dirB, nameB)));
  }

  stat(path: string): Stat {
    return this.at(path, (d, n) => statAt(d, n, this.pathOf(path)));
  }

  /** Open `path` beneath the root (never through a symlink). */
  open(path: string, flags: number, mode = 0): number {
    return this.at(path, (d, n) => openBeneath(d, n, flags, mode));
  }

  mkdir(path: string, mode: number): void {
    this.at(path, (d, n) => mkdirAt(d, n, mode, this.pathOf(path)));
  }

  mknod(path: string, kind: NodeKind, mode: number, major = 0, minor = 0): void {
    this.at(path, (d, n) => mknodAt(d, n, TYPE_OF[kind] | (mode & 0o7777), major, minor, this.pathOf(path)));
  }

  symlink(target: string, path: string): void {
    this.at(path, (d, n) => symlinkAt(target, d, n, this.pathOf(path)));
  }

  readlink(path: string): string {
    return this.at(path, (d, n) => readlinkAt(d, n, this.pathOf(path)));
  }

  link(src: string, dst: string): void {
    this.at2(src, dst, (ds, ns, dd, nd) => linkAt(ds, ns, dd, nd, this.pathOf(dst)));
  }

  unlink(path: string): void {
    this.at(path, (d, n) => unlinkAt(d, n, false, this.pathOf(path)));
  }

  rename(src: string, dst: string, flags = 0): void {
    try {
      this.at2(src, dst, (ds, ns, dd, nd) => renameAt(ds, ns, dd, nd, flags, this.pathOf(src)));
    } finally {
      this.forgetDirs(src); // moved: its descriptors now stand for another path
      this.forgetDirs(dst); // an empty directory renamed over is gone
    }
  }

  chown(path: string, uid: number, gid: number): void {
    this.at(path, (d, n) => chownAt(d, n, uid, gid, this.pathOf(path)));
  }

  chmod(path: string, mode: number): void {
    this.at(path, (d, n) => chmodAt(d, n, mode, this.pathOf(path)));
  }

  utimens(path: string, atime: TimeChange, mtime: TimeChange): void {
    this.at(path, (d, n) => utimensAt(d, n, atime, mtime, this.pathOf(path)));
  }

  // ---- markers ------------------------------------------------------------------

  /** A whiteout: a 0/0 character device under the deleted name. */
  writeWhiteout(path: string): void {
    this.at(path, (d, n) => mknodAt(d, n, S_IFCHR, 0, 0, this.pathOf(path)));
  }

  writeOpaqueMarker(dirPath: string): void {
    this.at(dirPath, (d, n) => setXattrAt(d, n, OPAQUE_XATTR, Buffer.from('y'), 0, this.pathOf(dirPath)));
  }

  /** Remove a whiteout, in either on-disk style ('oci' only in uppers written before the overlay format). */
  removeWhiteout(path: string, style: 'oci' | 'overlay'): void {
    const onDisk = style === 'oci' ? `${parentOf(path) === '' ? '' : parentOf(path) + '/'}.wh.${baseName(path)}` : path;
    this.unlink(onDisk);
  }

  /**
   * Remove a directory the union shows as empty: what is left in it on disk
   * are whiteouts, which go with it. Anything else there is an error
   * (ENOTEMPTY), never deleted.
   */
  removeDir(path: string): void {
    const fd = this.open(path, O_RDONLY | O_DIRECTORY);
    try {
      for (const entry of readDirFd(fd, this.pathOf(path))) {
        const st = statAt(fd, entry.name, this.pathOf(path));
        if ((st.mode & S_IFMT) !== S_IFCHR || st.rdev !== 0) throw fsError('ENOTEMPTY', this.pathOf(path), 'rmdir');
        unlinkAt(fd, entry.name, false, this.pathOf(path));
      }
    } finally {
      close(fd);
    }
    try {
      this.at(path, (d, n) => unlinkAt(d, n, true, this.pathOf(path)));
    } finally {
      this.forgetDirs(path);
    }
  }

  // ---- xattrs (the user's names; bookkeeping hidden, escaped names mapped) -------

  readXattrs(path: string): XattrMap {
    return this.at(path, (d, n) => {
      const map: XattrMap = new Map();
      let names: string[];
      try {
        names = listXattrsAt(d, n, this.pathOf(path));
      } catch (err) {
        if (errnoNameOf(err) === 'EOPNOTSUPP') return map;
        throw err;
      }
      for (const stored of names) {
        const name = userXattrName(stored);
        if (name === undefined) continue;
        const value = getXattrAt(d, n, stored, this.pathOf(path));
        if (value !== undefined) map.set(name, value);
      }
      return map;
    });
  }

  setXattr(path: string, name: string, value: Buffer, flags: number): void {
    this.at(path, (d, n) => setXattrAt(d, n, storedXattrName(name), value, flags, this.pathOf(path)));
  }

  removeXattr(path: string, name: string): void {
    this.at(path, (d, n) => removeXattrAt(d, n, storedXattrName(name), this.pathOf(path)));
  }

  // ---- copy-up ------------------------------------------------------------------

  /**
   * Copy a lower object into the upper at `path` with all its attributes:
   * owner first (chown clears setuid and capabilities), then xattrs, then
   * mode, then times (last, since every other change touches ctime/mtime).
   * Returns the new upper object's st_ino.
   */
  async copyUpObject(path: string, kind: EntryKind, entry: LayerEntry, content: ContentRef | undefined): Promise<number> {
    if (kind === 'file') return this.copyUpFile(path, entry, content);
    const where = this.pathOf(path);
    return this.at(path, (d, n) => {
      switch (kind) {
        case 'dir': mkdirAt(d, n, 0o700, where); break;
        case 'symlink': symlinkAt(entry.target ?? '', d, n, where); break;
        default: mknodAt(d, n, TYPE_OF[kind] | 0o600, entry.devMajor ?? 0, entry.devMinor ?? 0, where);
      }
      chownAt(d, n, entry.uid, entry.gid, where);
      for (const [name, value] of entryXattrs(entry)) setXattrAt(d, n, storedXattrName(name), value, 0, where);
      if (kind !== 'symlink') chmodAt(d, n, entry.mode & 0o7777, where);
      utimensAt(d, n, mtimeOf(entry), mtimeOf(entry), where);
      return statAt(d, n, where).ino;
    });
  }

  /** A regular file: content and attributes through one descriptor. */
  private async copyUpFile(path: string, entry: LayerEntry, content: ContentRef | undefined): Promise<number> {
    const where = this.pathOf(path);
    const fd = this.open(path, O_WRONLY | O_CREAT | O_EXCL, 0o600);
    try {
      if (content !== undefined) {
        await content.ready?.(0, content.size); // a lazy layer's bytes, fetched and verified first
        await copyContent(content, fd, where);
      }
      fchownSync(fd, entry.uid, entry.gid);
      for (const [name, value] of entryXattrs(entry)) fsetXattr(fd, storedXattrName(name), value, 0, where);
      this.at(path, (d, n) => chmodAt(d, n, entry.mode & 0o7777, where));
      futimens(fd, mtimeOf(entry), mtimeOf(entry), where);
      return fstat(fd, where).ino;
    } catch (err) {
      try { this.unlink(path); } catch { /* the first error is the one to report */ }
      throw err;
    } finally {
      close(fd);
    }
  }
}

export function mtimeOf(entry: LayerEntry): { sec: number; nsec: number } {
  return { sec: entry.mtime, nsec: entry.mtimeNsec ?? 0 };
}

function entryXattrs(entry: LayerEntry): Array<[string, Buffer]> {
  return Object.keys(entry.xattrs ?? {}).map((name) => [name, xattrBytes(entry, name)!]);
}

const COPY_CHUNK = 1 << 20;

/** Copy `content` (a whole file, or a range of a bigger one) to the start of `destFd`. */
async function copyContent(content: ContentRef, destFd: number, dest: string): Promise<void> {
  const srcFd = openContent(content);
  try {
    if (content.size <= SYNC_IO_MAX) { // copied at once, as small writes are
      const buffer = Buffer.allocUnsafe(content.size);
      if (readSync(srcFd, buffer, 0, content.size, content.offset) !== content.size) throw fsError('EIO', dest, `copy-up: ${content.path} ends before its entry`);
      for (let written = 0; written < content.size;) written += writeSync(destFd, buffer, written, content.size - written, written);
      return;
    }
    const buffer = Buffer.allocUnsafe(Math.min(content.size, COPY_CHUNK));
    for (let done = 0; done < content.size;) {
      const want = Math.min(buffer.length, content.size - done);
      const got = await call<number>((cb) => read(srcFd, buffer, 0, want, content.offset + done, cb));
      if (got === 0) throw fsError('EIO', dest, `copy-up: ${content.path} ends before its entry`);
      for (let written = 0; written < got;) {
        written += await call<number>((cb) => write(destFd, buffer, written, got - written, done + written, cb));
      }
      done += got;
    }
  } finally {
    close(srcFd);
  }
}
