/**
 * The only module that imports fuse-native: it mounts a UnionFs and turns
 * FUSE calls into UnionFs calls and errors into negative errnos.
 *
 * fuse-native 2.2.6 (libfuse 2.9, high-level path API) and what layerd does
 * about its gaps (patches/fuse-native+2.2.6.patch, applied by patch-package
 * on install, after which the native module is rebuilt from source; this
 * adapter also works with a stock build, detected by `LAYERD_PATCH`):
 * - its option builder has no `use_ino`, `big_writes`,
 *   `negative_timeout` or `ro`, so `LayerdFuse` overrides `_fuseOptions`;
 *   without use_ino the kernel would see libfuse's own inode numbers, and
 *   (`hard_remove` is deliberately NOT used: with it, libfuse 2.9 answers
 *   ENOENT to fstat/fchmod of an open file that was unlinked, which breaks
 *   apt among others; without it, libfuse renames such a file to
 *   `.fuse_hidden<id>` until its last close, and the union keeps those names
 *   out of listings and out of the writable layer's changeset);
 * - its getxattr/listxattr replies copy into the kernel's buffer without a
 *   size check and pad list sizes by 128 bytes; `LayerdFuse` overrides both
 *   to answer ERANGE and exact sizes;
 * - st_ino and the statfs counts travel as 32-bit numbers (hence the inode
 *   scheme in inodes.ts) and times in whole milliseconds;
 * - its C utimens passes atime twice, so mtime is lost (`touch -d` is right,
 *   since both times are equal; os.utime(a, m) sets both to a); the patch
 *   fixes it. libfuse 2.9 calls utimens only when BOTH times
 *   are set, so `touch -a` / `touch -m` alone succeed without effect (no
 *   fuse-native patch can fix that; it needs a newer libfuse);
 * - no calling uid/gid reach JS, so on a stock build new files belong to
 *   the server's user (root); the patch adds `caller()` and layerd then gives
 *   new files their creator's uid/gid.
 * `FUSE_NATIVE_PATCHED` tells which build is installed; both work.
 *
 * Never touch the mountpoint synchronously from this process: a sync call
 * on our own mount blocks the thread that would have to answer it.
 */
import Fuse from 'fuse-native';
import type { FuseOperations, FuseStat } from 'fuse-native';
import type { Logger } from '../common/log.js';
import { ERRNO, errnoNameOf, negativeErrno } from './fsError.js';
import { fromFusePath } from './paths.js';
import { type OpStats, instrumentOperations } from './opStats.js';
import type { Owner, UnionFs, UnionStat } from './unionFs.js';

export interface FuseMountOptions {
  readOnly: boolean;
  /** Seconds the kernel may cache names and attributes. */
  cacheSeconds?: number;
  /** Lower content can change while mounted (a live layer): never keep file pages across opens. */
  contentMayChange?: boolean;
  debug?: boolean;
}

type Settle<T> = (errno: number, value?: T) => void;

function reply<T>(settle: Settle<T>, logger: Logger, op: string, path: string, work: () => T | Promise<T>): void {
  const fail = (err: unknown): void => {
    if (errnoNameOf(err) === undefined) logger.warn('unexpected error in FUSE operation', { op, path, error: String(err) });
    settle(negativeErrno(err));
  };
  try {
    const result = work();
    if (result instanceof Promise) result.then((value) => settle(0, value), fail);
    else settle(0, result);
  } catch (err) {
    fail(err);
  }
}

function toFuseStat(st: UnionStat): FuseStat {
  const ms = (t: { sec: number; nsec: number }): number => t.sec * 1000 + t.nsec / 1e6;
  return { ...st, atime: ms(st.atime), mtime: ms(st.mtime), ctime: ms(st.ctime) };
}

/** Whether the installed fuse-native carries layerd's patch (see the module comment). */
export const FUSE_NATIVE_PATCHED = Fuse.LAYERD_PATCH === 1;

/**
 * FUSE operation table for one UnionFs. `caller` names the process behind
 * the operation being dispatched (only with the patched binding).
 */
export function fuseOperations(fs: UnionFs, logger: Logger, caller: () => Owner | undefined): FuseOperations {
  const done = (cb: (errno: number) => void): Settle<unknown> => (errno) => cb(errno);
  return {
    init: (cb) => cb(0),
    getattr: (path, cb) => reply(cb, logger, 'getattr', path, () => {
      const st = fs.getattr(fromFusePath(path));
      return st instanceof Promise ? st.then(toFuseStat) : toFuseStat(st);
    }),
    // With the patched binding, an open file that was unlinked arrives with
    // path "" and is known by its handle only.
    fgetattr: (path, fh, cb) => reply(cb, logger, 'fgetattr', path, () => {
      const st = fs.fgetattr(fh);
      return st instanceof Promise ? st.then(toFuseStat) : toFuseStat(st);
    }),
    readdir: (path, cb) => {
      try {
        const listing = fs.readdir(fromFusePath(path));
        cb(0, listing.names, listing.stats as FuseStat[]);
      } catch (err) {
        cb(negativeErrno(err));
      }
    },
    readlink: (path, cb) => reply(cb, logger, 'readlink', path, () => fs.readlink(fromFusePath(path))),
    access: (path, _mode, cb) => reply(done(cb), logger, 'access', path, () => fs.access(fromFusePath(path))),
    statfs: (_path, cb) => reply(cb, logger, 'statfs', '', () => fs.statfs()),
    // Replies for these two are built by LayerdFuse (size checks); the
    // entries must exist for fuse-native to register the operations.
    getxattr: (path, name, _position, cb) => reply(cb, logger, 'getxattr', path, () => {
      const value = fs.getxattr(fromFusePath(path), name);
      return value instanceof Promise ? value.then((v) => v ?? null) : value ?? null;
    }),
    listxattr: (path, cb) => reply(cb, logger, 'listxattr', path, () => fs.listxattr(fromFusePath(path))),
    setxattr: (path, name, value, _position, flags, cb) =>
      reply(done(cb), logger, 'setxattr', path, () => fs.setxattr(fromFusePath(path), name, value, flags)),
    removexattr: (path, name, cb) => reply(done(cb), logger, 'removexattr', path, () => fs.removexattr(fromFusePath(path), name)),
    open: (path, flags, cb) => reply(cb, logger, 'open', path, () => fs.open(fromFusePath(path), flags)),
    create: (path, mode, cb) => reply(cb, logger, 'create', path, () => fs.create(fromFusePath(path), mode, caller())),
    read: (_path, fh, buf, len, pos, cb) => {
      fs.read(fh, buf, len, pos).then(cb, (err: unknown) => cb(negativeErrno(err)));
    },
    write: (_path, fh, buf, len, pos, cb) => {
      Promise.resolve().then(() => fs.write(fh, buf, len, pos)).then(cb, (err: unknown) => cb(negativeErrno(err)));
    },
    // Nobody waits for a release's result: answer at once, close behind.
    release: (path, fh, cb) => {
      cb(0);
      fs.release(fh).catch((err: unknown) => logger.warn('close failed', { path, error: String(err) }));
    },
    fsync: (path, datasync, fh, cb) => reply(done(cb), logger, 'fsync', path, () => fs.fsync(fh, datasync !== 0)),
    ftruncate: (path, fh, size, cb) => reply(done(cb), logger, 'ftruncate', path, () => fs.ftruncate(fh, size)),
    truncate: (path, size, cb) => reply(done(cb), logger, 'truncate', path, () => fs.truncate(fromFusePath(path), size)),
    utimens: (path, atime, mtime, cb) =>
      reply(done(cb), logger, 'utimens', path, () => fs.utimens(fromFusePath(path), msTime(atime), msTime(mtime))),
    chmod: (path, mode, cb) => reply(done(cb), logger, 'chmod', path, () => fs.chmod(fromFusePath(path), mode)),
    chown: (path, uid, gid, cb) => reply(done(cb), logger, 'chown', path, () => fs.chown(fromFusePath(path), uid, gid)),
    mknod: (path, mode, dev, cb) => reply(done(cb), logger, 'mknod', path, () => fs.mknod(fromFusePath(path), mode, dev, caller())),
    mkdir: (path, mode, cb) => reply(done(cb), logger, 'mkdir', path, () => fs.mkdir(fromFusePath(path), mode, caller())),
    rmdir: (path, cb) => reply(done(cb), logger, 'rmdir', path, () => fs.rmdir(fromFusePath(path))),
    unlink: (path, cb) => reply(done(cb), logger, 'unlink', path, () => fs.unlink(fromFusePath(path))),
    rename: (src, dest, cb) => reply(done(cb), logger, 'rename', src, () => fs.rename(fromFusePath(src), fromFusePath(dest))),
    link: (src, dest, cb) => reply(done(cb), logger, 'link', dest, () => fs.link(fromFusePath(src), fromFusePath(dest))),
    // fuse-native names the arguments (path, dest) but passes (target, linkpath).
    symlink: (target, path, cb) => reply(done(cb), logger, 'symlink', path, () => fs.symlink(target, fromFusePath(path), caller())),
  };
}

/** Mount options: see the module comment for why each is needed. */
export function mountOptionString(options: FuseMountOptions): string {
  const cache = options.cacheSeconds ?? (options.readOnly ? 60 : 1);
  const list = [
    'allow_other', 'default_permissions', 'use_ino', 'big_writes',
    'fsname=layerd', 'subtype=layerd',
    `entry_timeout=${cache}`, `attr_timeout=${cache}`, 'negative_timeout=0',
    // Read-only: content never changes, keep pages across opens. Writable:
    // libfuse gives each name of a hard-link group its own kernel inode, so
    // a write through one name leaves stale pages under the others;
    // auto_cache drops them on open when size or mtime changed, and
    // ac_attr_timeout=0 makes it look every time (a getattr per open).
    // A live layer: neither, so pages are dropped on every open (an edit
    // of the same size within the same second would fool auto_cache).
    ...(options.contentMayChange ? [] : options.readOnly ? ['kernel_cache'] : ['auto_cache', 'ac_attr_timeout=0']),
  ];
  if (options.readOnly) list.push('ro');
  if (options.debug) list.push('debug');
  return '-o' + list.join(',');
}

/** fuse-native with layerd's option string and size-checked xattr replies. */
export class LayerdFuse extends Fuse {
  private readonly optionString: string;
  private readonly union: UnionFs;

  constructor(mountpoint: string, union: UnionFs, logger: Logger, options: FuseMountOptions, stats?: OpStats) {
    let self: LayerdFuse | undefined;
    // caller() must run synchronously inside the handler, which these closures do.
    const caller = (): Owner | undefined => {
      const who = self?.caller?.();
      return who === undefined ? undefined : { uid: who.uid, gid: who.gid };
    };
    // Copy-ups of large files can take long; no per-operation reply timeout.
    const ops = fuseOperations(union, logger, caller);
    super(mountpoint, stats ? instrumentOperations(ops, stats) : ops, { timeout: false });
    self = this;
    this.optionString = mountOptionString(options);
    this.union = union;
  }

  protected override _fuseOptions(): string {
    return this.optionString;
  }

  protected override _op_getxattr(signal: (result: number, buffer: ArrayBufferLike) => void, path: string, name: string, valueBuf: Buffer): void {
    const answer = (value: Buffer | undefined): void => {
      if (value === undefined) return signal(-ERRNO.ENODATA, valueBuf.buffer);
      if (valueBuf.length === 0) return signal(value.length, valueBuf.buffer); // size query
      if (value.length > valueBuf.length) return signal(-ERRNO.ERANGE, valueBuf.buffer);
      value.copy(valueBuf);
      signal(value.length, valueBuf.buffer);
    };
    try {
      const value = this.union.getxattr(fromFusePath(path), name);
      if (value instanceof Promise) value.then(answer, (err: unknown) => signal(negativeErrno(err), valueBuf.buffer));
      else answer(value);
    } catch (err) {
      signal(negativeErrno(err), valueBuf.buffer);
    }
  }

  protected override _op_listxattr(signal: (result: number, buffer: ArrayBufferLike) => void, path: string, listBuf: Buffer): void {
    const answer = (names: string[]): void => {
      let size = 0;
      for (const name of names) size += Buffer.byteLength(name) + 1;
      if (listBuf.length === 0) return signal(size, listBuf.buffer);
      if (size > listBuf.length) return signal(-ERRNO.ERANGE, listBuf.buffer);
      let offset = 0;
      for (const name of names) {
        offset += listBuf.write(name, offset);
        listBuf[offset++] = 0;
      }
      signal(offset, listBuf.buffer);
    };
    try {
      const names = this.union.listxattr(fromFusePath(path));
      if (names instanceof Promise) names.then(answer, (err: unknown) => signal(negativeErrno(err), listBuf.buffer));
      else answer(names);
    } catch (err) {
      signal(negativeErrno(err), listBuf.buffer);
    }
  }
}

/** fuse-native passes times as milliseconds. */
function msTime(ms: number): { sec: number; nsec: number } {
  const sec = Math.floor(ms / 1000);
  return { sec, nsec: Math.round((ms - sec * 1000) * 1e6) };
}
