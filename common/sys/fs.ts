/**
 * Checked system calls on descriptors and names relative to them — the one
 * way layerd touches a directory it does not own outright (a layer
 * directory, a container's writable layer, a live directory).
 *
 * Every call takes a directory descriptor and one *name* in it, never a path
 * walked by the kernel with symlinks followed: `openBeneath` is the only
 * call that walks several components, and it does so with openat2's
 * RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, so a symlink
 * or `..` planted anywhere on the way fails the walk (ELOOP / EXDEV) instead
 * of leading out of the root. Calls on a final name never follow it
 * (AT_SYMLINK_NOFOLLOW, O_NOFOLLOW). Failures throw FsError with the real
 * errno, the path and the operation.
 *
 * Times are whole seconds plus nanoseconds end to end (statx, utimensat):
 * nothing passes through float milliseconds.
 */
import { isUtf8 } from 'node:buffer';
import { openSync } from 'node:fs';
import { XattrArgs, SYS, lastErrno, libc } from './libc.js';
import { errnoName, fsError, type ErrnoName } from './errors.js';

export const AT_FDCWD = -100;
export const AT_SYMLINK_NOFOLLOW = 0x100;
export const AT_REMOVEDIR = 0x200;
export const AT_EMPTY_PATH = 0x1000;

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_ACCMODE = 3;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;
export const O_APPEND = 0o2000;
export const O_NONBLOCK = 0o4000;
export const O_DSYNC = 0o10000;
export const O_DIRECTORY = 0o200000;
export const O_NOFOLLOW = 0o400000;
export const O_CLOEXEC = 0o2000000;
export const O_SYNC = 0o4010000;
export const O_PATH = 0o10000000;

const RESOLVE_NO_MAGICLINKS = 0x02;
const RESOLVE_NO_SYMLINKS = 0x04;
const RESOLVE_BENEATH = 0x08;
const RESOLVE_SAFE = BigInt(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS);

export const RENAME_NOREPLACE = 1;
export const RENAME_EXCHANGE = 2;

export const XATTR_CREATE = 1;
export const XATTR_REPLACE = 2;

export const S_IFMT = 0o170000;
export const S_IFSOCK = 0o140000;
export const S_IFLNK = 0o120000;
export const S_IFREG = 0o100000;
export const S_IFBLK = 0o060000;
export const S_IFDIR = 0o040000;
export const S_IFCHR = 0o020000;
export const S_IFIFO = 0o010000;

/** A time as the kernel keeps it. */
export interface Timespec { sec: number; nsec: number }

/** utimensat's special values: leave this time alone, or set it to now. */
export const UTIME_NOW = 'now';
export const UTIME_OMIT = 'omit';
export type TimeChange = Timespec | typeof UTIME_NOW | typeof UTIME_OMIT;

export interface Stat {
  dev: number;
  ino: number;
  /** Type bits | permission bits. */
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  /** Device number of a device node, encoded as glibc's makedev does. */
  rdev: number;
  size: number;
  blocks: number;
  blksize: number;
  atime: Timespec;
  mtime: Timespec;
  ctime: Timespec;
}

export function makeDev(major: number, minor: number): number {
  return ((minor & 0xff) | ((major & 0xfff) << 8) | ((minor & ~0xff) << 12)) >>> 0;
}

export function devMajor(rdev: number): number {
  return ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
}

export function devMinor(rdev: number): number {
  return (rdev & 0xff) | ((rdev >>> 12) & 0xfff00);
}

function fail(op: string, path: string): never {
  throw fsError(errnoName(lastErrno()), path, op);
}

function check(rc: number, op: string, path: string): number {
  if (rc < 0) fail(op, path);
  return rc;
}

/** The errno name of the last failed call (for callers that branch on it without throwing). */
export function lastErrnoName(): ErrnoName {
  return errnoName(lastErrno());
}

// ---- opening -------------------------------------------------------------------

const howBuffer = Buffer.alloc(24);

/**
 * Open `path` (one or more components, relative) beneath directory `dirfd`:
 * no symlink in any component, no `..` above `dirfd`, no magic links. The
 * final component is not followed either. "" or "." opens `dirfd` itself.
 */
export function openBeneath(dirfd: number, path: string, flags: number, mode = 0): number {
  if (path.length > PATH_CHUNK / 4 && Buffer.byteLength(path) > PATH_CHUNK) return openLongBeneath(dirfd, path, flags, mode);
  return openat2(dirfd, path, flags, mode);
}

function openat2(dirfd: number, path: string, flags: number, mode: number): number {
  howBuffer.writeBigUInt64LE(BigInt(flags | O_NOFOLLOW | O_CLOEXEC), 0);
  howBuffer.writeBigUInt64LE(BigInt((flags & O_CREAT) !== 0 ? mode & 0o7777 : 0), 8);
  howBuffer.writeBigUInt64LE(RESOLVE_SAFE, 16);
  return check(Number(libc.openat2(SYS.openat2, dirfd, path === '' ? '.' : path, howBuffer, 24)), 'open', path);
}

/** Paths longer than this are walked in pieces: one openat2 takes at most PATH_MAX bytes. */
const PATH_CHUNK = 3072;

/**
 * A path past PATH_MAX (a deep tree made with *at calls, as the union's
 * users can): directories opened piece by piece, each beneath the last.
 */
function openLongBeneath(dirfd: number, path: string, flags: number, mode: number): number {
  const parts = path.split('/');
  let fd = dirfd;
  let piece: string[] = [];
  let bytes = 0;
  try {
    for (const part of parts) {
      const size = Buffer.byteLength(part) + 1;
      if (bytes + size > PATH_CHUNK && piece.length > 0) { // open what is gathered; the rest goes beneath it
        const next = openat2(fd, piece.join('/'), O_PATH | O_DIRECTORY, 0);
        if (fd !== dirfd) close(fd);
        fd = next;
        piece = [];
        bytes = 0;
      }
      piece.push(part);
      bytes += size;
    }
    return openat2(fd, piece.join('/'), flags, mode);
  } finally {
    if (fd !== dirfd) close(fd);
  }
}

/** Open a trusted absolute path (a root given by the administrator) as a directory descriptor. */
export function openRoot(path: string): number {
  howBuffer.writeBigUInt64LE(BigInt(O_PATH | O_DIRECTORY | O_CLOEXEC), 0);
  howBuffer.writeBigUInt64LE(0n, 8);
  howBuffer.writeBigUInt64LE(0n, 16);
  return check(Number(libc.openat2(SYS.openat2, AT_FDCWD, path, howBuffer, 24)), 'open root', path);
}

export function close(fd: number): void {
  libc.close(fd);
}

// ---- attributes ----------------------------------------------------------------

const STATX_BASIC_STATS = 0x7ff;
const statxBuffer = Buffer.alloc(256);

function timeAt(buf: Buffer, at: number): Timespec {
  return { sec: Number(buf.readBigInt64LE(at)), nsec: buf.readUInt32LE(at + 8) };
}

function parseStatx(b: Buffer): Stat {
  const devMaj = b.readUInt32LE(136);
  const devMin = b.readUInt32LE(140);
  return {
    blksize: b.readUInt32LE(4),
    nlink: b.readUInt32LE(16),
    uid: b.readUInt32LE(20),
    gid: b.readUInt32LE(24),
    mode: b.readUInt16LE(28),
    ino: Number(b.readBigUInt64LE(32)),
    size: Number(b.readBigUInt64LE(40)),
    blocks: Number(b.readBigUInt64LE(48)),
    atime: timeAt(b, 64),
    ctime: timeAt(b, 96),
    mtime: timeAt(b, 112),
    rdev: makeDev(b.readUInt32LE(128), b.readUInt32LE(132)),
    dev: devMaj * 2 ** 20 + devMin,
  };
}

/** lstat of `name` in `dirfd` (never followed); "" = `dirfd` itself. */
export function statAt(dirfd: number, name: string, label = name): Stat {
  const flags = AT_SYMLINK_NOFOLLOW | (name === '' ? AT_EMPTY_PATH : 0);
  check(libc.statx(dirfd, name, flags, STATX_BASIC_STATS, statxBuffer), 'stat', label);
  return parseStatx(statxBuffer);
}

export function fstat(fd: number, label = `fd ${fd}`): Stat {
  return statAt(fd, '', label);
}

export function chownAt(dirfd: number, name: string, uid: number, gid: number, label = name): void {
  check(libc.fchownat(dirfd, name, uid >>> 0, gid >>> 0, AT_SYMLINK_NOFOLLOW | (name === '' ? AT_EMPTY_PATH : 0)), 'chown', label);
}

let haveFchmodat2 = true;

/** chmod of `name` in `dirfd`, never through a symlink (a symlink itself: EOPNOTSUPP). */
export function chmodAt(dirfd: number, name: string, mode: number, label = name): void {
  if (haveFchmodat2) {
    const rc = Number(libc.fchmodat2(SYS.fchmodat2, dirfd, name, mode & 0o7777, AT_SYMLINK_NOFOLLOW | (name === '' ? AT_EMPTY_PATH : 0)));
    if (rc === 0) return;
    if (lastErrno() !== 38 /* ENOSYS: kernel before 6.6 */) fail('chmod', label);
    haveFchmodat2 = false;
  }
  // Older kernels: through an O_PATH descriptor's /proc link, which names the object itself.
  const fd = openBeneath(dirfd, name, O_PATH);
  try {
    check(libc.fchmodat(AT_FDCWD, `/proc/self/fd/${fd}`, mode & 0o7777, 0), 'chmod', label);
  } finally {
    close(fd);
  }
}

const timesBuffer = Buffer.alloc(32);
const UTIME_NOW_NSEC = (1 << 30) - 1;
const UTIME_OMIT_NSEC = (1 << 30) - 2;

function writeTimes(atime: TimeChange, mtime: TimeChange): Buffer {
  const put = (at: number, t: TimeChange): void => {
    timesBuffer.writeBigInt64LE(typeof t === 'string' ? 0n : BigInt(t.sec), at);
    timesBuffer.writeBigInt64LE(BigInt(t === UTIME_NOW ? UTIME_NOW_NSEC : t === UTIME_OMIT ? UTIME_OMIT_NSEC : t.nsec), at + 8);
  };
  put(0, atime);
  put(16, mtime);
  return timesBuffer;
}

export function utimensAt(dirfd: number, name: string, atime: TimeChange, mtime: TimeChange, label = name): void {
  // "" = the descriptor's own object, which may be O_PATH: named through its /proc link.
  const rc = name === ''
    ? libc.utimensat(AT_FDCWD, `/proc/self/fd/${dirfd}`, writeTimes(atime, mtime), 0)
    : libc.utimensat(dirfd, name, writeTimes(atime, mtime), AT_SYMLINK_NOFOLLOW);
  check(rc, 'utimens', label);
}

export function futimens(fd: number, atime: TimeChange, mtime: TimeChange, label = `fd ${fd}`): void {
  check(libc.futimens(fd, writeTimes(atime, mtime)), 'utimens', label);
}

// ---- names ---------------------------------------------------------------------

export function mkdirAt(dirfd: number, name: string, mode: number, label = name): void {
  check(libc.mkdirat(dirfd, name, mode & 0o7777), 'mkdir', label);
}

/** Any node but a directory or symlink: regular file, fifo, socket, device (type bits in `mode`). */
export function mknodAt(dirfd: number, name: string, mode: number, major = 0, minor = 0, label = name): void {
  // glibc's 64-bit dev_t (makedev): major bits 8-19 and 44-63, minor bits 0-7 and 20-43.
  const dev = (BigInt(major & 0xfff) << 8n) | (BigInt(Math.floor(major / 4096)) << 44n)
    | BigInt(minor & 0xff) | (BigInt(Math.floor(minor / 256)) << 20n);
  check(libc.mknodat(dirfd, name, mode, dev), 'mknod', label);
}

export function symlinkAt(target: string, dirfd: number, name: string, label = name): void {
  check(libc.symlinkat(target, dirfd, name), 'symlink', label);
}

const linkBuffer = Buffer.alloc(4096);

export function readlinkAt(dirfd: number, name: string, label = name): string {
  const n = check(Number(libc.readlinkat(dirfd, name, linkBuffer, linkBuffer.length)), 'readlink', label);
  return linkBuffer.toString('utf8', 0, n);
}

/** A new name for an object; the old name is never followed. */
export function linkAt(olddirfd: number, oldname: string, newdirfd: number, newname: string, label = newname): void {
  check(libc.linkat(olddirfd, oldname, newdirfd, newname, oldname === '' ? AT_EMPTY_PATH : 0), 'link', label);
}

export function unlinkAt(dirfd: number, name: string, isDir = false, label = name): void {
  check(libc.unlinkat(dirfd, name, isDir ? AT_REMOVEDIR : 0), isDir ? 'rmdir' : 'unlink', label);
}

export function renameAt(olddirfd: number, oldname: string, newdirfd: number, newname: string, flags = 0, label = oldname): void {
  check(libc.renameat2(olddirfd, oldname, newdirfd, newname, flags), 'rename', label);
}

// ---- directories ---------------------------------------------------------------

/** Bytes as printable ASCII, every other byte as \\xNN (for messages). */
export function escapeBytes(bytes: Uint8Array): string {
  return [...bytes].map((b) => (b >= 0x20 && b < 0x7f && b !== 0x5c ? String.fromCharCode(b) : `\\x${b.toString(16).padStart(2, '0')}`)).join('');
}

export interface DirEntry { name: string; ino: number; /** DT_* type, 0 when unknown. */ type: number }

export const DT_DIR = 4;
const direntBuffer = Buffer.alloc(64 * 1024);

/** Every entry of the directory open at `fd` (a real descriptor, not O_PATH), without "." and "..". */
export function readDirFd(fd: number, label = `fd ${fd}`): DirEntry[] {
  const out: DirEntry[] = [];
  for (;;) {
    const n = check(Number(libc.getdents64(SYS.getdents64, fd, direntBuffer, direntBuffer.length)), 'readdir', label);
    if (n === 0) return out;
    for (let at = 0; at < n;) {
      const reclen = direntBuffer.readUInt16LE(at + 16);
      const nameEnd = direntBuffer.indexOf(0, at + 19);
      // layerd keeps names as UTF-8 strings: decoded, a name that is not UTF-8 would read back as another
      // (each bad byte as U+FFFD) and be reached by nobody. Refused, as the FUSE union refuses making one.
      if (!isUtf8(direntBuffer.subarray(at + 19, nameEnd))) {
        throw fsError('EILSEQ', `${label}/${escapeBytes(direntBuffer.subarray(at + 19, nameEnd))}`, 'readdir: a name that is not UTF-8');
      }
      const name = direntBuffer.toString('utf8', at + 19, nameEnd);
      if (name !== '.' && name !== '..') {
        out.push({ name, ino: Number(direntBuffer.readBigUInt64LE(at)), type: direntBuffer.readUInt8(at + 18) });
      }
      at += reclen;
    }
  }
}

// ---- extended attributes -------------------------------------------------------

let haveXattrAt = true;
let xattrBuffer = Buffer.alloc(64 * 1024);
const XATTR_SIZE_MAX = 64 * 1024;

/**
 * Run an xattr call on `name` in `dirfd` (never followed): the *xattrat
 * system calls (Linux 6.13+), else an O_PATH descriptor's /proc link.
 */
function viaProc<T>(dirfd: number, name: string, call: (procPath: string) => T): T {
  if (name === '') return call(`/proc/self/fd/${dirfd}`); // the descriptor's own object (O_PATH has no xattr calls)
  const fd = openBeneath(dirfd, name, O_PATH);
  try {
    return call(`/proc/self/fd/${fd}`);
  } finally {
    close(fd);
  }
}

function atFlags(name: string): number {
  return AT_SYMLINK_NOFOLLOW | (name === '' ? AT_EMPTY_PATH : 0);
}

function splitNames(buf: Buffer, n: number): string[] {
  const names: string[] = [];
  for (let start = 0; start < n;) {
    const end = buf.indexOf(0, start);
    if (end < 0 || end >= n) break;
    if (end > start) names.push(buf.toString('utf8', start, end));
    start = end + 1;
  }
  return names;
}

export function listXattrsAt(dirfd: number, name: string, label = name): string[] {
  if (haveXattrAt && name !== '') {
    const n = Number(libc.listxattrat(SYS.listxattrat, dirfd, name, atFlags(name), xattrBuffer, xattrBuffer.length));
    if (n >= 0) return splitNames(xattrBuffer, n);
    if (lastErrno() !== 38) fail('listxattr', label);
    haveXattrAt = false;
  }
  return viaProc(dirfd, name, (p) => splitNames(xattrBuffer, check(Number(libc.listxattr(p, xattrBuffer, xattrBuffer.length)), 'listxattr', label)));
}

/** A value, or undefined when the object has no such attribute. */
export function getXattrAt(dirfd: number, name: string, attr: string, label = name): Buffer | undefined {
  let n: number | undefined;
  if (haveXattrAt && name !== '') {
    n = Number(libc.getxattrat(SYS.getxattrat, dirfd, name, atFlags(name), attr, { value: xattrBuffer, size: XATTR_SIZE_MAX, flags: 0 }, XattrArgs.size));
    if (n < 0 && lastErrno() === 38) haveXattrAt = false;
  }
  if (n === undefined || !haveXattrAt) n = viaProc(dirfd, name, (p) => Number(libc.getxattr(p, attr, xattrBuffer, XATTR_SIZE_MAX)));
  if (n < 0) {
    if (lastErrno() === 61) return undefined; // ENODATA
    fail(`getxattr ${attr}`, label);
  }
  return Buffer.from(xattrBuffer.subarray(0, n));
}

/** Every attribute with its value. */
export function readXattrsAt(dirfd: number, name: string, label = name): Map<string, Buffer> {
  const map = new Map<string, Buffer>();
  for (const attr of listXattrsAt(dirfd, name, label)) {
    const value = getXattrAt(dirfd, name, attr, label);
    if (value !== undefined) map.set(attr, value);
  }
  return map;
}

export function setXattrAt(dirfd: number, name: string, attr: string, value: Buffer, flags = 0, label = name): void {
  if (haveXattrAt && name !== '') {
    const rc = Number(libc.setxattrat(SYS.setxattrat, dirfd, name, atFlags(name), attr, { value, size: value.length, flags }, XattrArgs.size));
    if (rc === 0) return;
    if (lastErrno() !== 38) fail(`setxattr ${attr}`, label);
    haveXattrAt = false;
  }
  viaProc(dirfd, name, (p) => check(libc.setxattr(p, attr, value, value.length, flags), `setxattr ${attr}`, label));
}

export function removeXattrAt(dirfd: number, name: string, attr: string, label = name): void {
  if (haveXattrAt && name !== '') {
    const rc = Number(libc.removexattrat(SYS.removexattrat, dirfd, name, atFlags(name), attr));
    if (rc === 0) return;
    if (lastErrno() !== 38) fail(`removexattr ${attr}`, label);
    haveXattrAt = false;
  }
  viaProc(dirfd, name, (p) => check(libc.removexattr(p, attr), `removexattr ${attr}`, label));
}

export function fsetXattr(fd: number, attr: string, value: Buffer, flags = 0, label = `fd ${fd}`): void {
  check(libc.fsetxattr(fd, attr, value, value.length, flags), `setxattr ${attr}`, label);
}

// ---- content -------------------------------------------------------------------

const offIn = [0];
const offOut = [0];

/** Copy `length` bytes between descriptors in the kernel; returns the bytes copied (short at end of file). */
export function copyFileRange(fdIn: number, inOffset: number, fdOut: number, outOffset: number, length: number, label = `fd ${fdIn}`): number {
  let done = 0;
  while (done < length) {
    offIn[0] = inOffset + done;
    offOut[0] = outOffset + done;
    const n = Number(libc.copyFileRange(fdIn, offIn, fdOut, offOut, Math.min(length - done, 1 << 30), 0));
    if (n < 0) fail('copy_file_range', label);
    if (n === 0) break;
    done += n;
  }
  return done;
}

const RWF_NOWAIT = 0x8;
const EAGAIN = 11;

/**
 * Read up to `length` bytes at `position` into `buffer` only if they are in
 * the page cache (preadv2 RWF_NOWAIT): the bytes read (short if only the
 * first part is cached, or at end of file), or undefined where reading would
 * wait for the disk. Lets a server read cached bytes at once and send only
 * real disk reads to the thread pool.
 */
export function preadCached(fd: number, buffer: Buffer, length: number, position: number, label = `fd ${fd}`): number | undefined {
  const n = Number(libc.preadv2(fd, { base: buffer, len: Math.min(length, buffer.length) }, 1, position, RWF_NOWAIT));
  if (n >= 0) return n;
  const errno = lastErrno();
  // EOPNOTSUPP: a filesystem without non-blocking reads; the caller reads the usual way.
  if (errno === EAGAIN || errnoName(errno) === 'EOPNOTSUPP') return undefined;
  return fail('preadv2', label);
}

/**
 * Flush the whole filesystem holding `fd` (syncfs: one flush for many new
 * files instead of an fsync each), on a worker thread: it may take long.
 * `fd` must be a real descriptor (not O_PATH).
 */
export function syncFilesystemOf(fd: number, label = `fd ${fd}`): Promise<void> {
  return new Promise((resolve, reject) => {
    libc.syncfs.async(fd, (err: unknown, rc: number) => {
      if (err) reject(err instanceof Error ? err : new Error(String(err)));
      else if (rc < 0) reject(fsError('EIO', label, 'syncfs'));
      else resolve();
    });
  });
}

export function ioctl(fd: number, request: number, arg: Buffer | null, label = `fd ${fd}`): number {
  return check(libc.ioctl(fd, request, arg), `ioctl ${request.toString(16)}`, label);
}

/**
 * A new open file description of what `fd` is open on, with `flags` of its
 * own (e.g. read-write where `fd` is read-only or O_APPEND). Through the
 * descriptor, not a path: it cannot reach anything else.
 */
export function reopenFd(fd: number, flags: number, label = `fd ${fd}`): number {
  try {
    return openSync(`/proc/self/fd/${fd}`, flags | O_CLOEXEC);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw fsError((code ?? 'EIO') as ErrnoName, label, 'reopen');
  }
}
