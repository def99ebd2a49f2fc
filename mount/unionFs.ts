/**
 * The union filesystem: ordered read-only layers plus one writable upper
 * directory, seen as one tree with OCI-layer / overlayfs semantics. Imports
 * nothing from the FUSE binding; the adapter translates FUSE calls into these
 * methods and FsError into negative errnos.
 *
 * Vocabulary: a path is union-relative ("" = root, "a/b"); "lower" is the
 * merge of the layers; "upper" is the writable directory, which always holds
 * an OCI changeset of the lower: changed and new files as real files (real
 * mode, owner, times and xattrs), deletions as `.wh.<name>`, directories
 * replaced by new ones marked `.wh..wh..opq`.
 *
 * Reads of lower content are answered from the in-memory merged tree; only
 * upper content is stat'ed on disk. Every namespace or metadata change runs
 * under one async lock, so copy-ups never race each other. Metadata system
 * calls on the upper dir are made synchronously (µs each, where a thread-pool
 * round trip costs ~50 µs of CPU); file content moves on the thread pool.
 */
import { closeSync, fchmodSync, fchownSync, ftruncate } from 'node:fs';
import { statfs } from 'node:fs/promises';
import {
  O_CREAT, O_DSYNC, O_EXCL, O_RDWR, O_SYNC, O_TRUNC, O_WRONLY, fstat, futimens, reopenFd, type Stat, type TimeChange,
} from '../common/sys/fs.js';
import { type EntryKind, type LayerEntry, type LayerSource, PASSTHROUGH_MIN_LOWER_SIZE, openContent, xattrBytes } from '../storage/layerIndex.js';
import { fsError } from './fsError.js';
import { devMajor, devMinor, scanDirectory, type MarkerStyle, type XattrMap } from './lowerDir.js';
import { type LowerMergeCache, mergeLayers } from './lowerMerges.js';
import { MergedTree, UnionNode } from './mergedTree.js';
import { KIND_OF_TYPE, S_IFMT, TYPE_BITS, inoOf, lowerStat, upperStat, type UnionStat } from './nodeStats.js';
import { THROUGH_TAR, OpenFiles, callback as call } from './openFiles.js';
import { TarReader } from './tarReader.js';
import { ancestorsOf, baseName, isWithin, joinPath, parentOf } from './paths.js';
import { UpperDir } from './upperDir.js';

export interface UnionStatfs {
  bsize: number; frsize: number; blocks: number; bfree: number; bavail: number;
  files: number; ffree: number; favail: number; fsid: number; flag: number; namemax: number;
}

export interface DirListing {
  names: string[];
  /** Parallel to names; only type bits and ino are meaningful (for d_type/d_ino). */
  stats: Array<Pick<UnionStat, 'mode' | 'ino'>>;
}

/** What one SETATTR changes besides the size (setattrNow): each field given is set. */
export interface AttrChange {
  mode?: number;
  /** NO_OWNER_CHANGE or absent: left alone. */
  uid?: number;
  gid?: number;
  times?: [TimeChange, TimeChange];
  /** Clear suid (and a group-executable file's sgid) last. */
  killPrivileges?: boolean;
}

/** Who creates a new file (the calling process), when the FUSE binding tells. */
export interface Owner { uid: number; gid: number }

export interface UnionFsOptions {
  /** Layers bottom → top. */
  layers: readonly LayerSource[];
  upper: string;
  readOnly?: boolean;
  /** Where merges of lower layers are kept between mounts of the same layers (a mount host's). */
  lowerMerges?: LowerMergeCache;
}

export type { UnionStat } from './nodeStats.js';

const O_ACCMODE = 3;
const O_RDONLY = 0;
/** NAME_MAX of the union (and of every Linux filesystem it sits on). */
const NAME_MAX = 255;
const SERVER_UID = process.getuid?.() ?? -1;
const SERVER_GID = process.getgid?.() ?? -1;
/** Read once: process.umask() has no read-only form, and nothing in the server changes it. */
const SERVER_UMASK = process.umask();
/** Stands for the path of an open file in stat helpers (any non-root path). */
const OPEN_FILE_PATH = '\0open-file';

export const XATTR_CREATE = 1;
export const XATTR_REPLACE = 2;
/** chown's "leave this id alone" ((uid_t) -1), as the FUSE bindings pass it. */
export const NO_OWNER_CHANGE = 0xffffffff;
const S_ISGID = 0o2000;
const S_ISUID = 0o4000;
const S_IXGRP = 0o010;

/** The permission bits left once privileges are cleared: no suid, no sgid if group-executable (a sgid without it is a locking mark). */
function withoutPrivileges(mode: number): number {
  let kept = mode & 0o7777 & ~S_ISUID;
  if ((mode & (S_ISGID | S_IXGRP)) === (S_ISGID | S_IXGRP)) kept &= ~S_ISGID;
  return kept;
}

/** Flags kept when opening an upper file for a FUSE open (offsets come from the kernel, so no O_APPEND). */
const OPEN_FLAGS_KEPT = O_ACCMODE | O_TRUNC | O_SYNC | O_DSYNC;

/** Whether open(2) with `flags` may change the file (and so copies it up). */
export function opensForWriting(flags: number): boolean {
  return (flags & O_ACCMODE) !== O_RDONLY || (flags & O_TRUNC) !== 0;
}

/** ENAMETOOLONG for a final name longer than NAME_MAX bytes (checked only where it can be: > 85 UTF-16 units). */
function checkNameLength(path: string, op: string): void {
  const name = baseName(path);
  if (name.length > NAME_MAX / 3 && Buffer.byteLength(name) > NAME_MAX) throw fsError('ENAMETOOLONG', path, op);
}

function sameInode(a: UnionNode, b: UnionNode): boolean {
  if (a.upper && b.upper) return a.upperStIno === b.upperStIno;
  return !a.upper && !b.upper && a.lower === b.lower;
}

async function merge(layers: readonly LayerSource[], upperDir: string, lowerMerges?: LowerMergeCache): Promise<{
  tree: MergedTree; upperWhiteouts: Map<string, MarkerStyle>; upperRoot: string;
}> {
  // The upper's walk runs while the lower layers merge.
  const scanning = scanDirectory(upperDir, 'upper', 'overlay');
  scanning.catch(() => undefined); // awaited below; not "unhandled" if merging throws first
  const lower = lowerMerges?.get(layers) ?? mergeLayers(layers);
  const tree = new MergedTree(lower); // this mount's changes, over the lower merge (shared with other mounts, never changed)
  const scanned = await scanning;
  const upperWhiteouts = tree.addUpper(scanned);
  return { tree, upperWhiteouts, upperRoot: scanned.root };
}

export class UnionFs {
  // The two below are replaced together when the lower layers change (a live layer).
  /** The merged view; what the lower layers alone hold is its base (`baseKind`: whether a deletion needs a whiteout). */
  private tree: MergedTree;
  /** Whiteouts present in the upper dir, and how they are written there. */
  private upperWhiteouts: Map<string, MarkerStyle>;
  private readonly upper: UpperDir;
  private readonly readOnly: boolean;
  private readonly files = new OpenFiles();
  /** One reader per store-layer tar this mount reads files from (tarReader.ts). */
  private readonly tars = new Map<string, TarReader>();
  /**
   * xattrs of upper objects by st_ino, once read or changed: every name of a
   * hard-link group is one inode with one set of xattrs, so a change through
   * one name must show through the others (a cache per name went stale).
   */
  private readonly xattrsByIno = new Map<number, XattrMap>();
  private lock: Promise<unknown> = Promise.resolve();
  /** Changes queued or running under the lock: while there are none, a change that needs no copy-up may be made at once (the *Now methods). */
  private pending = 0;

  private constructor(tree: MergedTree, upperWhiteouts: Map<string, MarkerStyle>, upper: UpperDir, readOnly: boolean) {
    this.tree = tree;
    this.upperWhiteouts = upperWhiteouts;
    this.upper = upper;
    this.readOnly = readOnly;
  }

  /** Merge the layers and the current upper dir (one walk of the upper, none of the layers). */
  static async create(options: UnionFsOptions): Promise<UnionFs> {
    const merged = await merge(options.layers, options.upper, options.lowerMerges);
    return new UnionFs(merged.tree, merged.upperWhiteouts, new UpperDir(merged.upperRoot), options.readOnly ?? false);
  }

  /**
   * Replace the lower layers (bottom → top) and merge the upper dir, as it
   * is on disk, on top of them again: how a live directory layer's changes
   * become visible. Runs under the change lock, so no change is half-applied
   * to the old tree; open files keep what they opened.
   */
  replaceLayers(layers: readonly LayerSource[]): Promise<void> {
    return this.locked(async () => {
      const merged = await merge(layers, this.upper.root);
      this.tree = merged.tree;
      this.upperWhiteouts = merged.upperWhiteouts;
      this.xattrsByIno.clear(); // the new tree's nodes carry what the walk just read
    });
  }

  /** Index entries the merge ignored (e.g. hard links to nothing). */
  get skippedEntries(): number {
    return this.tree.skipped;
  }

  // ---- lookups --------------------------------------------------------------

  private node(path: string, op: string): UnionNode {
    const node = this.tree.get(path);
    if (node === undefined) {
      checkNameLength(path, op);
      throw fsError('ENOENT', path, op);
    }
    return node;
  }

  private parentDir(path: string, op: string): UnionNode {
    if (path === '') throw fsError('EEXIST', path, op);
    checkNameLength(path, op);
    const parent = this.tree.get(parentOf(path));
    if (parent === undefined) throw fsError('ENOENT', path, op);
    if (parent.kind !== 'dir') throw fsError('ENOTDIR', path, op);
    return parent;
  }

  /** Attributes; synchronous for lower content (the common case). */
  getattr(path: string): UnionStat {
    const node = this.node(path, 'getattr');
    const subdirs = node.subdirs;
    if (!node.upper) return lowerStat(path, node, subdirs);
    return upperStat(path, node, this.upper.stat(path), subdirs);
  }

  /**
   * Attributes, or undefined when there is no such name (a lookup's common
   * "no": answered without making an error). A name too long still fails.
   */
  lookupStat(path: string): UnionStat | undefined {
    const node = this.tree.get(path);
    if (node === undefined) {
      checkNameLength(path, 'lookup');
      return undefined;
    }
    const subdirs = node.subdirs;
    if (!node.upper) return lowerStat(path, node, subdirs);
    return upperStat(path, node, this.upper.stat(path), subdirs);
  }

  /**
   * Attributes of an open file by its handle (fstat): right even after the
   * file was renamed or unlinked, when there is no path to look up.
   */
  fgetattr(fh: number): UnionStat {
    const { fd, node, upper, lower } = this.files.get(fh);
    // A lower file opened for reading stays what was opened, even once another open copied the name up.
    if (!upper && lower !== undefined) return lowerStat(OPEN_FILE_PATH, new UnionNode(node.kind, lower), 0, false);
    return upperStat(OPEN_FILE_PATH, node, fstat(fd, OPEN_FILE_PATH), 0);
  }

  /**
   * Change an open upper file by its handle: how metadata changes reach a
   * file whose last name is gone (fchmod, fchown, futimens after unlink).
   */
  fchmod(fh: number, mode: number): void {
    fchmodSync(this.openUpperFd(fh, 'fchmod'), mode & 0o7777);
  }

  fchown(fh: number, uid: number, gid: number): void {
    fchownSync(this.openUpperFd(fh, 'fchown'), uid === NO_OWNER_CHANGE ? -1 : uid, gid === NO_OWNER_CHANGE ? -1 : gid);
  }

  futimens(fh: number, atime: TimeChange, mtime: TimeChange): void {
    futimens(this.openUpperFd(fh, 'futimens'), atime, mtime);
  }

  /**
   * Clear suid (and a group-executable file's sgid) of the file at `path`:
   * with FUSE_HANDLE_KILLPRIV_V2 the kernel leaves that to the server when
   * a caller without CAP_FSETID writes, truncates or chowns. Only upper
   * files can be asked for it (writing copies up first).
   */
  killPrivileges(path: string): Promise<void> {
    return this.mutate(path, 'clear suid/sgid', async () => {
      const node = this.node(path, 'clear suid/sgid');
      if (!node.upper || node.kind !== 'file') return;
      const mode = this.upper.stat(path).mode;
      const kept = withoutPrivileges(mode);
      if (kept !== (mode & 0o7777)) this.upper.chmod(path, kept);
    });
  }

  /** killPrivileges by an open handle (a WRITE that carries FUSE_WRITE_KILL_SUIDGID). */
  fkillPrivileges(fh: number): void {
    const { fd, upper } = this.files.get(fh);
    if (!upper || fd < 0) return;
    const mode = fstat(fd, OPEN_FILE_PATH).mode;
    const kept = withoutPrivileges(mode);
    if (kept !== (mode & 0o7777)) fchmodSync(fd, kept);
  }

  private openUpperFd(fh: number, op: string): number {
    const { fd, upper } = this.files.get(fh);
    if (!upper || fd < 0) throw fsError('EPERM', String(fh), `${op} of a deleted lower file`);
    return fd;
  }

  readdir(path: string): DirListing {
    const node = this.node(path, 'readdir');
    if (node.children === undefined) throw fsError('ENOTDIR', path, 'readdir');
    // glibc's readdir skips entries with d_ino 0, so "." and ".." need real numbers too.
    const parentPath = path === '' ? '' : parentOf(path);
    const names = ['.', '..'];
    const stats: DirListing['stats'] = [
      { mode: TYPE_BITS.dir, ino: inoOf(path, node) },
      { mode: TYPE_BITS.dir, ino: inoOf(parentPath, this.tree.get(parentPath)!) },
    ];
    for (const name of node.children) {
      const childPath = joinPath(path, name);
      const child = this.tree.get(childPath)!;
      names.push(name);
      stats.push({ mode: TYPE_BITS[child.kind], ino: inoOf(childPath, child) });
    }
    return { names, stats };
  }

  async readlink(path: string): Promise<string> {
    const node = this.node(path, 'readlink');
    if (node.kind !== 'symlink') throw fsError('EINVAL', path, 'readlink');
    if (node.upper) return this.upper.readlink(path);
    return node.lower!.entry.target ?? '';
  }

  access(path: string): void {
    this.node(path, 'access');
  }

  async statfs(): Promise<UnionStatfs> {
    const st = await statfs(this.upper.root);
    return {
      bsize: st.bsize, frsize: st.bsize, blocks: st.blocks, bfree: st.bfree, bavail: st.bavail,
      files: st.files, ffree: st.ffree, favail: st.ffree, fsid: 0, flag: 0, namemax: 255,
    };
  }

  // ---- xattrs ---------------------------------------------------------------

  private upperXattrs(path: string, node: UnionNode): XattrMap {
    let map = this.xattrsByIno.get(node.upperStIno);
    if (map === undefined) {
      map = node.upperXattrs ?? this.upper.readXattrs(path);
      this.xattrsByIno.set(node.upperStIno, map);
    }
    return map;
  }

  /** A value, or undefined for "no such attribute" (ENODATA, common enough not to throw). */
  getxattr(path: string, name: string): Buffer | undefined {
    const node = this.node(path, 'getxattr');
    if (!node.upper) {
      const value = node.lower!.entry.xattrs?.[name];
      return value === undefined ? undefined : Buffer.from(value, 'base64');
    }
    return this.upperXattrs(path, node).get(name);
  }

  listxattr(path: string): string[] {
    const node = this.node(path, 'listxattr');
    if (!node.upper) return Object.keys(node.lower!.entry.xattrs ?? {});
    return [...this.upperXattrs(path, node).keys()];
  }

  setxattr(path: string, name: string, value: Buffer, flags: number): Promise<void> {
    const bytes = Buffer.from(value); // the caller's buffer is only valid during the call
    return this.mutate(path, 'setxattr', async () => {
      const node = await this.copyUp(path);
      const map = this.upperXattrs(path, node);
      if ((flags & XATTR_CREATE) !== 0 && map.has(name)) throw fsError('EEXIST', path, 'setxattr');
      if ((flags & XATTR_REPLACE) !== 0 && !map.has(name)) throw fsError('ENODATA', path, 'setxattr');
      this.upper.setXattr(path, name, bytes, 0);
      map.set(name, bytes);
    });
  }

  removexattr(path: string, name: string): Promise<void> {
    return this.mutate(path, 'removexattr', async () => {
      const node = this.node(path, 'removexattr');
      if (!node.upper && node.lower!.entry.xattrs?.[name] === undefined) throw fsError('ENODATA', path, 'removexattr');
      await this.copyUp(path);
      this.upper.removeXattr(path, name);
      this.upperXattrs(path, node).delete(name);
    });
  }

  // ---- open files -----------------------------------------------------------

  /**
   * open, made at once where it needs no copy-up and no truncation (reads of
   * any file; writes of an upper file while no change is queued); undefined
   * when it cannot be: then `open` does it.
   */
  openNow(path: string, flags: number): number | undefined {
    const node = this.tree.get(path);
    if (node === undefined || node.kind === 'dir') return undefined;
    if (!opensForWriting(flags)) return node.upper ? this.openUpperNow(path, node, flags) : this.openLower(node);
    if (!node.upper || (flags & O_TRUNC) !== 0 || !this.canChangeNow()) return undefined;
    this.dropKilledXattrs(node); // writing drops security.capability
    return this.openUpperNow(path, node, flags);
  }

  open(path: string, flags: number): Promise<number> {
    const node = this.node(path, 'open');
    if (node.kind === 'dir') return Promise.reject(fsError('EISDIR', path, 'open'));
    if (!opensForWriting(flags)) {
      try {
        return Promise.resolve(node.upper ? this.openUpperNow(path, node, flags) : this.openLower(node));
      } catch (err) {
        return Promise.reject(err);
      }
    }
    return this.mutate(path, 'open', async () => {
      const current = await this.copyUp(path);
      this.dropKilledXattrs(current); // writing drops security.capability
      return this.openUpper(path, current, flags);
    });
  }

  private openLower(node: UnionNode): number {
    const object = node.lower!;
    const content = object.source?.content(object.entry);
    if (content === undefined) return this.files.add({ fd: -1, node, upper: false, lower: object });
    // A store layer's tar is the store's own file: read through the mount's one
    // descriptor of it, opened at the first read. What opens by its own rules (a
    // directory layer's file, checked to be the one scanned; lazily pulled bytes)
    // is opened now, so the open fails if it fails.
    const range = { offset: content.offset, size: content.size };
    if (content.open === undefined && content.ready === undefined) {
      return this.files.add({ fd: THROUGH_TAR, node, upper: false, lower: object, range, tar: this.tarReader(content.path) });
    }
    const fd = openContent(content);
    const whole = content.offset === 0 && content.size === object.entry.size && content.ready === undefined;
    return this.files.add(whole ? { fd, node, upper: false, lower: object } : {
      fd, node, upper: false, lower: object, range, ...(content.ready ? { ready: content.ready } : {}),
    });
  }

  private tarReader(tarPath: string): TarReader {
    let reader = this.tars.get(tarPath);
    if (reader === undefined) this.tars.set(tarPath, reader = new TarReader(tarPath));
    return reader;
  }

  /** An upper file opened without O_TRUNC (everything done at once). */
  private openUpperNow(path: string, node: UnionNode, flags: number): number {
    const kept = flags & OPEN_FLAGS_KEPT & ~O_TRUNC;
    const fd = this.upper.open(path, kept);
    return this.files.add({
      fd, node, upper: true, durable: (kept & (O_SYNC | O_DSYNC)) !== 0, plainReadWrite: (kept & (O_ACCMODE | O_SYNC | O_DSYNC)) === O_RDWR,
    });
  }

  private async openUpper(path: string, node: UnionNode, flags: number): Promise<number> {
    if ((flags & O_TRUNC) === 0) return this.openUpperNow(path, node, flags);
    const kept = flags & OPEN_FLAGS_KEPT;
    // Truncating frees the file's blocks, which can take long: that part goes to the thread pool.
    const fd = this.upper.open(path, kept & ~O_TRUNC);
    if ((kept & O_TRUNC) !== 0) {
      try {
        await call<void>((cb) => ftruncate(fd, 0, (err) => cb(err, undefined)));
      } catch (err) {
        closeSync(fd);
        throw err;
      }
    }
    return this.files.add({
      fd, node, upper: true, durable: (kept & (O_SYNC | O_DSYNC)) !== 0, plainReadWrite: (kept & (O_ACCMODE | O_SYNC | O_DSYNC)) === O_RDWR,
    });
  }

  /**
   * A descriptor of a whole file to register as an open handle's backing
   * file (FUSE passthrough; `owned`: the caller closes it). For an upper
   * file a read-write one: the handle's own when it is a plain read-write
   * open, else a new one. For a lower file of PASSTHROUGH_MIN_LOWER_SIZE or
   * more its content-addressed object, read-only (`lower`), when it has one;
   * when it has none yet one is made in the background
   * (storage/objectStore.ts) and undefined returned.
   */
  backingFd(fh: number): { fd: number; owned: boolean; lower: boolean } | undefined {
    const { fd, node, upper, lower, range, plainReadWrite } = this.files.get(fh);
    if (node.kind !== 'file') return undefined;
    if (!upper) {
      if (lower === undefined || lower.entry.size < PASSTHROUGH_MIN_LOWER_SIZE) return undefined;
      const object = lower.source?.content(lower.entry)?.whole?.();
      return object === undefined ? undefined : { fd: object, owned: true, lower: true };
    }
    if (fd < 0 || range !== undefined) return undefined;
    return plainReadWrite === true ? { fd, owned: false, lower: false } : { fd: reopenFd(fd, O_RDWR, OPEN_FILE_PATH), owned: true, lower: false };
  }

  /**
   * How many bytes of an open file may be handed to the kernel's page cache
   * before its first read (kernelFuse.ts, `prefill`): all of a lower file
   * smaller than PASSTHROUGH_MIN_LOWER_SIZE whose bytes are all here (not
   * lazily pulled). 0 for anything else: upper files, larger files (passed
   * through, or read as asked), empty ones.
   */
  prefillSize(fh: number): number {
    const { upper, lower, ready, node } = this.files.get(fh);
    if (upper || lower === undefined || ready !== undefined || node.kind !== 'file') return 0;
    const { size } = lower.entry;
    return size < PASSTHROUGH_MIN_LOWER_SIZE ? size : 0;
  }

  read(fh: number, buffer: Buffer, length: number, position: number): Promise<number> {
    return this.files.read(fh, buffer, length, position);
  }

  /** `buffer` may be reused as soon as this returns (a write not done at once works on a copy). */
  write(fh: number, buffer: Buffer, length: number, position: number): number | Promise<number> {
    this.dropKilledXattrs(this.files.get(fh).node); // writing drops security.capability
    return this.files.write(fh, buffer, length, position);
  }

  ftruncate(fh: number, size: number): Promise<void> {
    this.dropKilledXattrs(this.files.get(fh).node);
    return this.files.truncate(fh, size);
  }

  fsync(fh: number, dataOnly: boolean): Promise<void> {
    return this.files.sync(fh, dataOnly);
  }

  release(fh: number): Promise<void> {
    return this.files.release(fh);
  }

  /** Open handles (for shutdown and tests). */
  get openFiles(): number {
    return this.files.size;
  }

  /** Close every open file, and the upper's root descriptor: the union is done. */
  async closeAll(): Promise<void> {
    await this.files.closeAll();
    for (const reader of this.tars.values()) reader.close();
    this.tars.clear();
    this.upper.close();
  }

  // ---- writes ---------------------------------------------------------------

  /** Run a change under the lock; refuse it on a read-only union. */
  private mutate<T>(path: string, op: string, change: () => Promise<T>): Promise<T> {
    if (this.readOnly) return Promise.reject(fsError('EROFS', path, op));
    return this.locked(change);
  }

  /** Run `work` after every change queued before it (one at a time, in order). */
  private locked<T>(work: () => Promise<T>): Promise<T> {
    this.pending++;
    const run = this.lock.then(work, work).finally(() => { this.pending--; });
    this.lock = run.catch(() => undefined);
    return run;
  }

  /**
   * Whether a change may be made synchronously, now: the union is writable
   * and no queued change is waiting or running (so making it at once keeps
   * the order of changes; it runs to its end before anything else does).
   */
  private canChangeNow(): boolean {
    return !this.readOnly && this.pending === 0;
  }

  /** True when the lower layers show something at `path` that an upper deletion must white out. */
  private coversLower(path: string): boolean {
    if (this.tree.baseKind(path) === undefined) return false;
    for (const ancestor of ancestorsOf(path)) if (this.tree.get(ancestor)?.opaque) return false;
    return true;
  }

  private async materializeDir(path: string): Promise<void> {
    const node = this.tree.get(path)!;
    if (node.upper) return;
    if (path !== '') await this.materializeDir(parentOf(path));
    const ino = await this.upper.copyUpObject(path, 'dir', node.lower!.entry, undefined);
    this.markUpper(path, node, ino, node.lower!.entry);
  }

  /**
   * The node's content now lives in the upper. Its xattrs are known without
   * asking the disk (a getfattr process per lookup would cost milliseconds):
   * a copy-up wrote exactly the lower entry's, a new object has none —
   * unless its directory has a default ACL, which the new object inherits
   * behind our back: then they are read from the disk when asked. So the
   * directory's own are looked at (read once per directory, then known):
   * the kernel asks for security.capability before the first write of
   * every new file, and that "none" is then answered from memory.
   */
  private markUpper(path: string, node: UnionNode, ino: number, copiedFrom?: LayerEntry, newObject = true): void {
    node.upper = true;
    node.upperStIno = ino;
    if (!newObject) { // another name of an upper inode: its xattrs are that inode's
      node.upperXattrs = undefined;
      return;
    }
    this.xattrsByIno.delete(ino); // a new object may reuse the number of one deleted before
    if (copiedFrom === undefined && path !== '') {
      const parent = this.tree.get(parentOf(path));
      const parentXattrs = parent?.upper === true ? this.knownUpperXattrs(parentOf(path), parent) : undefined;
      node.upperXattrs = parentXattrs === undefined || parentXattrs.has('system.posix_acl_default') ? undefined : new Map();
    } else if (copiedFrom !== undefined) {
      node.upperXattrs = new Map(Object.keys(copiedFrom.xattrs ?? {}).map((name) => [name, xattrBytes(copiedFrom, name)!]));
    } else {
      node.upperXattrs = new Map();
    }
  }

  /** An upper directory's xattrs (read once), or undefined if they cannot be read. */
  private knownUpperXattrs(path: string, node: UnionNode): XattrMap | undefined {
    try {
      return this.upperXattrs(path, node);
    } catch {
      return undefined;
    }
  }

  /** ext4 (like any Linux fs) drops security.capability when a file is written, truncated or chowned. */
  private dropKilledXattrs(node: UnionNode): void {
    node.upperXattrs?.delete('security.capability');
    this.xattrsByIno.get(node.upperStIno)?.delete('security.capability');
  }

  /**
   * Bring `path` into the upper with content and attributes. For a file of a
   * lower hard-link group, every name of the group is copied up as a hard
   * link of the one copy, so the names stay one inode.
   */
  private async copyUp(path: string): Promise<UnionNode> {
    const node = this.node(path, 'copy-up');
    if (node.upper) return node;
    if (node.kind === 'dir') {
      await this.materializeDir(path);
      return node;
    }
    const object = node.lower!;
    const names = [path, ...[...object.names].filter((name) => name !== path)];
    await this.materializeDir(parentOf(path));
    const ino = await this.upper.copyUpObject(path, node.kind, object.entry, object.source?.content(object.entry));
    for (const name of names.slice(1)) {
      await this.materializeDir(parentOf(name));
      this.upper.link(path, name);
    }
    for (const name of names) {
      const named = this.tree.get(name)!;
      named.lower = undefined;
      this.markUpper(name, named, ino, object.entry);
    }
    // object.names stays: handles opened on the lower object still describe it (fstat nlink)
    return node;
  }

  private async deepCopyUp(path: string): Promise<void> {
    const node = await this.copyUp(path);
    if (node.children === undefined) return;
    for (const name of [...node.children]) await this.deepCopyUp(joinPath(path, name));
  }

  /** Prepare the upper for a new entry at `path`: parent present, no whiteout in the way. */
  private async prepareNewEntry(path: string, op: string): Promise<void> {
    this.parentDir(path, op);
    if (this.tree.get(path) !== undefined) throw fsError('EEXIST', path, op);
    await this.materializeDir(parentOf(path));
    this.clearWhiteout(path);
  }

  private clearWhiteout(path: string): void {
    const style = this.upperWhiteouts.get(path);
    if (style === undefined) return;
    this.upper.removeWhiteout(path, style);
    this.upperWhiteouts.delete(path);
  }

  private async whiteoutIfCovered(path: string): Promise<void> {
    if (!this.coversLower(path)) return;
    await this.materializeDir(parentOf(path));
    this.upper.writeWhiteout(path);
    this.upperWhiteouts.set(path, 'overlay');
  }

  /**
   * Give a new entry its creator's uid/gid (by `fd` when open, else by
   * path). When the creator is this server's own user (root in a container,
   * the common case), the kernel already did exactly that, including the gid
   * of a setgid parent: nothing to do, which saves syscalls per created file.
   * Otherwise, as the kernel would: in a setgid directory the group is the
   * directory's (the upper fs already did that), else the caller's.
   */
  private applyOwner(path: string, owner: Owner | undefined, fd?: number): void {
    if (owner === undefined || (owner.uid === SERVER_UID && owner.gid === SERVER_GID)) return;
    const parentSetgid = (this.upper.stat(parentOf(path)).mode & S_ISGID) !== 0;
    const gid = parentSetgid ? -1 : owner.gid;
    if (fd === undefined) this.upper.chown(path, owner.uid, gid);
    else fchownSync(fd, owner.uid, gid);
  }

  private addUpperNode(path: string, kind: EntryKind, ino: number, newObject = true): UnionNode {
    const node = new UnionNode(kind, undefined);
    this.tree.insert(path, node);
    this.markUpper(path, node, ino, undefined, newObject);
    return node;
  }

  create(path: string, mode: number, owner?: Owner): Promise<number> {
    return this.createFile(path, mode, owner).then((made) => made.fh);
  }

  /**
   * createFile, made at once when its directory is in the upper already and
   * no change is queued (untar, a build: every file of a new directory);
   * undefined when it cannot be: then `createFile` does it.
   */
  createFileNow(path: string, mode: number, owner?: Owner): { fh: number; stat: UnionStat } | undefined {
    if (!this.canChangeNow() || path === '' || this.tree.get(parentOf(path))?.upper !== true) return undefined;
    this.parentDir(path, 'create');
    if (this.tree.get(path) !== undefined) throw fsError('EEXIST', path, 'create');
    this.clearWhiteout(path);
    return this.createInUpper(path, mode, owner);
  }

  /** create, answering with the new file's attributes too (from its descriptor: no second lookup of the path). */
  createFile(path: string, mode: number, owner?: Owner): Promise<{ fh: number; stat: UnionStat }> {
    return this.mutate(path, 'create', async () => {
      await this.prepareNewEntry(path, 'create');
      return this.createInUpper(path, mode, owner);
    });
  }

  /** The new file, its parent ready in the upper and no whiteout in the way. */
  private createInUpper(path: string, mode: number, owner?: Owner): { fh: number; stat: UnionStat } {
    const fd = this.upper.open(path, O_CREAT | O_EXCL | O_RDWR, mode & 0o7777);
    let st: Stat;
    try {
      this.applyOwner(path, owner, fd);
      // open() applied our umask, and a chown clears setuid/setgid: set the mode unless neither changed it.
      if ((mode & 0o7777 & ~SERVER_UMASK) !== (mode & 0o7777) || (mode & 0o6000) !== 0) fchmodSync(fd, mode & 0o7777);
      st = fstat(fd, this.upper.pathOf(path));
    } catch (err) {
      closeSync(fd); // no handle leaks, and no file the tree does not know
      try { this.upper.unlink(path); } catch { /* the first error is the one to report */ }
      throw err;
    }
    const node = this.addUpperNode(path, 'file', st.ino);
    return { fh: this.files.add({ fd, node, upper: true, plainReadWrite: true }), stat: upperStat(path, node, st, 0) };
  }

  mkdir(path: string, mode: number, owner?: Owner): Promise<void> {
    return this.mutate(path, 'mkdir', async () => {
      await this.prepareNewEntry(path, 'mkdir');
      this.upper.mkdir(path, 0o700);
      const made = this.upper.stat(path);
      this.applyOwner(path, owner);
      this.upper.chmod(path, (mode & 0o7777) | (made.mode & S_ISGID)); // a setgid parent's bit carries over
      const node = this.addUpperNode(path, 'dir', made.ino);
      if (this.tree.baseKind(path) === 'dir' && this.coversLower(path)) {
        this.upper.writeOpaqueMarker(path);
        node.opaque = true;
      }
    });
  }

  symlink(target: string, path: string, owner?: Owner): Promise<void> {
    return this.mutate(path, 'symlink', async () => {
      await this.prepareNewEntry(path, 'symlink');
      this.upper.symlink(target, path);
      this.applyOwner(path, owner);
      this.addUpperNode(path, 'symlink', this.upper.stat(path).ino);
    });
  }

  mknod(path: string, mode: number, dev: number, owner?: Owner): Promise<void> {
    return this.mutate(path, 'mknod', async () => {
      const kind = KIND_OF_TYPE.get(mode & S_IFMT);
      if (kind === undefined || kind === 'dir' || kind === 'symlink') throw fsError('EINVAL', path, 'mknod');
      // A 0/0 character device is how the upper records a deletion: nobody may make one (overlayfs: EPERM too).
      if (kind === 'char' && devMajor(dev) === 0 && devMinor(dev) === 0) throw fsError('EPERM', path, 'mknod of a whiteout device');
      await this.prepareNewEntry(path, 'mknod');
      if (kind === 'file') closeSync(this.upper.open(path, O_CREAT | O_EXCL | O_WRONLY, 0o600));
      else this.upper.mknod(path, kind, 0o600, devMajor(dev), devMinor(dev));
      this.applyOwner(path, owner);
      this.upper.chmod(path, mode & 0o7777);
      this.addUpperNode(path, kind, this.upper.stat(path).ino);
    });
  }

  link(src: string, dst: string): Promise<void> {
    return this.mutate(dst, 'link', async () => {
      const source = this.node(src, 'link');
      if (source.kind === 'dir') throw fsError('EPERM', src, 'link');
      await this.prepareNewEntry(dst, 'link');
      const copied = await this.copyUp(src);
      this.upper.link(src, dst);
      this.addUpperNode(dst, source.kind, copied.upperStIno, false);
    });
  }

  unlink(path: string): Promise<void> {
    return this.mutate(path, 'unlink', async () => {
      const node = this.node(path, 'unlink');
      if (node.kind === 'dir') throw fsError('EISDIR', path, 'unlink');
      if (node.upper) this.upper.unlink(path);
      this.tree.removeSubtree(path);
      await this.whiteoutIfCovered(path);
    });
  }

  rmdir(path: string): Promise<void> {
    return this.mutate(path, 'rmdir', async () => {
      const node = this.node(path, 'rmdir');
      if (node.kind !== 'dir') throw fsError('ENOTDIR', path, 'rmdir');
      if (path === '') throw fsError('EPERM', path, 'rmdir');
      if (node.children!.size > 0) throw fsError('ENOTEMPTY', path, 'rmdir');
      if (node.upper) this.upper.removeDir(path);
      this.forgetWhiteoutsBelow(path);
      this.tree.removeSubtree(path);
      await this.whiteoutIfCovered(path);
    });
  }

  private forgetWhiteoutsBelow(dir: string): void {
    for (const path of [...this.upperWhiteouts.keys()]) if (path !== dir && isWithin(path, dir)) this.upperWhiteouts.delete(path);
  }

  /**
   * Rename anything, including directories that exist in lower layers (no
   * EXDEV, unlike overlayfs without redirect_dir): the source subtree is
   * copied up in full, renamed inside the upper, whited out at the old path,
   * and made opaque at the new path if a lower directory lies there.
   */
  rename(src: string, dst: string): Promise<void> {
    return this.mutate(src, 'rename', async () => {
      const source = this.node(src, 'rename');
      if (src === dst) return;
      if (src === '' || isWithin(dst, src)) throw fsError('EINVAL', dst, 'rename');
      this.parentDir(dst, 'rename');
      const target = this.tree.get(dst);
      if (target !== undefined) {
        if (source.kind === 'dir' && target.kind !== 'dir') throw fsError('ENOTDIR', dst, 'rename');
        if (source.kind !== 'dir' && target.kind === 'dir') throw fsError('EISDIR', dst, 'rename');
        if (target.kind === 'dir' && target.children!.size > 0) throw fsError('ENOTEMPTY', dst, 'rename');
        if (source.kind !== 'dir' && sameInode(source, target)) return; // rename(2): nothing to do
      }

      if (source.kind === 'dir') await this.deepCopyUp(src);
      else await this.copyUp(src);
      await this.materializeDir(parentOf(dst));
      if (target !== undefined) {
        if (target.upper && target.kind === 'dir') this.upper.removeDir(dst);
        this.forgetWhiteoutsBelow(dst);
        this.tree.removeSubtree(dst);
      }
      this.clearWhiteout(dst);
      this.upper.rename(src, dst);
      this.tree.move(src, dst);
      for (const path of [...this.upperWhiteouts.keys()]) {
        if (path !== src && isWithin(path, src)) {
          this.upperWhiteouts.set(dst + path.slice(src.length), this.upperWhiteouts.get(path)!);
          this.upperWhiteouts.delete(path);
        }
      }
      const moved = this.tree.get(dst)!;
      if (moved.kind === 'dir' && this.tree.baseKind(dst) === 'dir' && this.coversLower(dst) && !moved.opaque) {
        this.upper.writeOpaqueMarker(dst);
        moved.opaque = true;
      }
      await this.whiteoutIfCovered(src);
    });
  }

  /**
   * The metadata changes of one SETATTR (all but the size), made at once
   * when the node is in the upper already (no copy-up) and no change is
   * queued; false, with nothing done, when they cannot be: then chmod,
   * chown, utimens and killPrivileges make them. In that order, as those.
   */
  setattrNow(path: string, change: AttrChange): boolean {
    if (!this.canChangeNow()) return false;
    const node = this.tree.get(path);
    if (node === undefined || !node.upper) return false;
    if (change.mode !== undefined && node.kind !== 'symlink') this.upper.chmod(path, change.mode & 0o7777);
    if (change.uid !== undefined || change.gid !== undefined) {
      const uid = change.uid ?? NO_OWNER_CHANGE;
      const gid = change.gid ?? NO_OWNER_CHANGE;
      this.upper.chown(path, uid === NO_OWNER_CHANGE ? -1 : uid, gid === NO_OWNER_CHANGE ? -1 : gid);
      this.dropKilledXattrs(node); // chown drops security.capability
    }
    if (change.times !== undefined) this.upper.utimens(path, change.times[0], change.times[1]);
    if (change.killPrivileges === true && node.kind === 'file') {
      const mode = this.upper.stat(path).mode;
      const kept = withoutPrivileges(mode);
      if (kept !== (mode & 0o7777)) this.upper.chmod(path, kept);
    }
    return true;
  }

  chmod(path: string, mode: number): Promise<void> {
    return this.mutate(path, 'chmod', async () => {
      const node = await this.copyUp(path);
      if (node.kind !== 'symlink') this.upper.chmod(path, mode & 0o7777);
    });
  }

  chown(path: string, uid: number, gid: number): Promise<void> {
    return this.mutate(path, 'chown', async () => {
      const node = await this.copyUp(path);
      this.upper.chown(path, uid === NO_OWNER_CHANGE ? -1 : uid, gid === NO_OWNER_CHANGE ? -1 : gid);
      this.dropKilledXattrs(node); // chown drops security.capability
    });
  }

  truncate(path: string, size: number): Promise<void> {
    return this.mutate(path, 'truncate', async () => {
      const node = await this.copyUp(path);
      if (node.kind === 'dir') throw fsError('EISDIR', path, 'truncate');
      const fd = this.upper.open(path, O_WRONLY);
      try {
        await call<void>((cb) => ftruncate(fd, size, (err) => cb(err, undefined)));
      } finally {
        closeSync(fd);
      }
      this.dropKilledXattrs(node);
    });
  }

  /** Set either time or both (UTIME_OMIT leaves one alone), to the nanosecond. */
  utimens(path: string, atime: TimeChange, mtime: TimeChange): Promise<void> {
    return this.mutate(path, 'utimens', async () => {
      await this.copyUp(path);
      this.upper.utimens(path, atime, mtime);
    });
  }
}
