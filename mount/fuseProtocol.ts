/**
 * The FUSE kernel protocol (linux/fuse.h), as far as layerd speaks it:
 * opcodes, flags, and the layouts of the requests read from /dev/fuse and
 * the replies written to it. Little-endian, as on every Linux layerd runs on.
 *
 * Only encoding and decoding live here; what a request means for the union
 * is kernelFuse.ts' business.
 */
import { isUtf8 } from 'node:buffer';
import { escapeBytes, type Timespec } from '../common/sys/fs.js';
import { fsError } from '../common/sys/errors.js';
import type { UnionStat } from './nodeStats.js';

export const FUSE_KERNEL_VERSION = 7;
/** 7.31: FOPEN_CACHE_DIR, FUSE_MAX_PAGES, FUSE_CACHE_SYMLINKS, readdirplus all exist. */
export const FUSE_KERNEL_MINOR_VERSION = 31;
/**
 * 7.40: FUSE_PASSTHROUGH (backing files). Declared only to a kernel that
 * offers passthrough and only when it is wanted: everything else is served
 * as 7.31.
 */
export const FUSE_PASSTHROUGH_MINOR_VERSION = 40;
export const FUSE_ROOT_ID = 1;

export const Op = {
  LOOKUP: 1, FORGET: 2, GETATTR: 3, SETATTR: 4, READLINK: 5, SYMLINK: 6, MKNOD: 8, MKDIR: 9,
  UNLINK: 10, RMDIR: 11, RENAME: 12, LINK: 13, OPEN: 14, READ: 15, WRITE: 16, STATFS: 17,
  RELEASE: 18, FSYNC: 20, SETXATTR: 21, GETXATTR: 22, LISTXATTR: 23, REMOVEXATTR: 24, FLUSH: 25,
  INIT: 26, OPENDIR: 27, READDIR: 28, RELEASEDIR: 29, FSYNCDIR: 30, ACCESS: 34, CREATE: 35,
  INTERRUPT: 36, DESTROY: 38, BATCH_FORGET: 42, READDIRPLUS: 44, RENAME2: 45,
} as const;

/** FUSE_INIT flags. */
export const InitFlag = {
  ASYNC_READ: 1 << 0,
  BIG_WRITES: 1 << 5,
  AUTO_INVAL_DATA: 1 << 12,
  /** The kernel keeps written pages (and so size and mtime) and writes them back in batches. */
  WRITEBACK_CACHE: 1 << 16,
  DO_READDIRPLUS: 1 << 13,
  READDIRPLUS_AUTO: 1 << 14,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
  CACHE_SYMLINKS: 1 << 23,
  /** The kernel may skip OPENDIR/RELEASEDIR once OPENDIR answers ENOSYS (and then caches directories). */
  NO_OPENDIR_SUPPORT: 1 << 24,
  /**
   * The server clears suid/sgid on write, truncate and chown (told by
   * FUSE_WRITE_KILL_SUIDGID / FATTR_KILL_SUIDGID); the kernel then sets
   * SB_NOSEC, so an inode found without privileges is not asked for its
   * `security.capability` again before each write.
   */
  HANDLE_KILLPRIV_V2: 1 << 28,
  /** flags2 (the upper 32 bits of the flags) is valid in init_in and init_out. */
  INIT_EXT: 1 << 30,
} as const;

/** FUSE_INIT flags2 (bits 32–63 of the flags). */
export const InitFlag2 = {
  /** FUSE_PASSTHROUGH (bit 37): opens may name a backing file for reads, writes and mmap. */
  PASSTHROUGH: 1 << 5,
} as const;

/** open_out.open_flags. */
export const FOPEN_KEEP_CACHE = 1 << 1;
/** The open's data goes to the backing file whose id open_out.backing_id names. */
export const FOPEN_PASSTHROUGH = 1 << 7;

/** ioctls on /dev/fuse (linux/fuse.h): register a backing file (struct fuse_backing_map) and release its id. */
export const FUSE_DEV_IOC_BACKING_OPEN = 0x4010e501; // _IOW(229, 1, struct fuse_backing_map)
export const FUSE_DEV_IOC_BACKING_CLOSE = 0x4004e502; // _IOW(229, 2, uint32_t)

/** setattr_in.valid bits. */
export const Fattr = {
  MODE: 1 << 0, UID: 1 << 1, GID: 1 << 2, SIZE: 1 << 3, ATIME: 1 << 4, MTIME: 1 << 5,
  FH: 1 << 6, ATIME_NOW: 1 << 7, MTIME_NOW: 1 << 8, LOCKOWNER: 1 << 9, CTIME: 1 << 10,
  /** With HANDLE_KILLPRIV_V2: clear suid, and sgid if group-executable, after this change (chown; truncate by a caller without CAP_FSETID). */
  KILL_SUIDGID: 1 << 11,
} as const;

/** write_in.write_flags: the page cache writing back (no caller behind it), and "clear suid/sgid first". */
export const FUSE_WRITE_CACHE = 1 << 0;
export const FUSE_WRITE_KILL_SUIDGID = 1 << 2;

export const FUSE_GETATTR_FH = 1 << 0;
export const RENAME_NOREPLACE = 1 << 0;
export const RENAME_EXCHANGE = 1 << 1;

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
const ATTR_SIZE = 88;
export const ENTRY_OUT_SIZE = 40 + ATTR_SIZE;
const DIRENT_HEADER_SIZE = 24;

/** The fixed header of every request. */
export interface RequestHeader {
  opcode: number;
  /** The kernel's request number: a u64 counter, far below 2^53 in any real lifetime. */
  unique: number;
  nodeid: number;
  uid: number;
  gid: number;
  pid: number;
}

const TWO_32 = 0x1_0000_0000;

/** u64 fields as plain numbers (all of ours stay below 2^53): no BigInt on the hot path. */
export function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32LE(at) + buf.readUInt32LE(at + 4) * TWO_32;
}

export function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32LE(value % TWO_32 >>> 0, at);
  buf.writeUInt32LE(Math.floor(value / TWO_32) >>> 0, at + 4);
}

export function readHeader(buf: Buffer): RequestHeader {
  return {
    opcode: buf.readUInt32LE(4),
    unique: readU64(buf, 8),
    // Node ids are ours (see fuseNodes.ts) and stay far below 2^53.
    nodeid: readU64(buf, 16),
    uid: buf.readUInt32LE(24),
    gid: buf.readUInt32LE(28),
    pid: buf.readUInt32LE(32),
  };
}

/** Reads a request body field by field. */
export class BodyReader {
  private offset: number;

  constructor(private readonly buf: Buffer, offset = IN_HEADER_SIZE) {
    this.offset = offset;
  }

  u32(): number {
    const value = this.buf.readUInt32LE(this.offset);
    this.offset += 4;
    return value;
  }

  u64(): number {
    const value = readU64(this.buf, this.offset);
    this.offset += 8;
    return value;
  }

  /** A signed 64-bit field (times before 1970). */
  i64(): number {
    const value = Number(this.buf.readBigInt64LE(this.offset));
    this.offset += 8;
    return value;
  }

  skip(bytes: number): this {
    this.offset += bytes;
    return this;
  }

  /**
   * A NUL-terminated name. layerd keeps every path as a UTF-8 string, so a
   * name whose bytes are not UTF-8 is refused (`invalid`: EILSEQ; ENOENT
   * for a lookup, as no such name can exist): decoded, two such names would
   * become one (each bad byte read as U+FFFD), and a file made under one
   * would read back under another name.
   */
  name(invalid: 'EILSEQ' | 'ENOENT' = 'EILSEQ'): string {
    const end = this.buf.indexOf(0, this.offset);
    const stop = end < 0 ? this.buf.length : end;
    const bytes = this.buf.subarray(this.offset, stop);
    this.offset = stop + 1;
    if (!isUtf8(bytes)) throw fsError(invalid, escapeBytes(bytes), 'a name that is not UTF-8');
    return bytes.toString('utf8');
  }

  rest(length?: number): Buffer {
    const end = length === undefined ? this.buf.length : this.offset + length;
    const value = this.buf.subarray(this.offset, end);
    this.offset = end;
    return value;
  }
}

export interface SetattrIn {
  valid: number; fh: number; size: number;
  atime: Timespec; mtime: Timespec; mode: number; uid: number; gid: number;
}

export function readSetattr(buf: Buffer): SetattrIn {
  const r = new BodyReader(buf);
  const valid = r.u32();
  r.skip(4);
  const fh = r.u64();
  const size = r.u64();
  r.skip(8); // lock_owner
  const atime = r.i64();
  const mtime = r.i64();
  r.skip(8); // ctime
  const atimensec = r.u32();
  const mtimensec = r.u32();
  r.skip(4);
  const mode = r.u32();
  r.skip(4);
  const uid = r.u32();
  const gid = r.u32();
  return { valid, fh, size, atime: { sec: atime, nsec: atimensec }, mtime: { sec: mtime, nsec: mtimensec }, mode, uid, gid };
}

/** read_in, for READ, READDIR and READDIRPLUS. */
export function readReadIn(buf: Buffer): { fh: number; offset: number; size: number } {
  const r = new BodyReader(buf);
  return { fh: r.u64(), offset: r.u64(), size: r.u32() };
}

// ---- replies ------------------------------------------------------------------

export function outHeader(length: number, errno: number, unique: number): Buffer {
  const out = Buffer.allocUnsafe(OUT_HEADER_SIZE);
  writeOutHeader(out, length, errno, unique);
  return out;
}

export function writeOutHeader(out: Buffer, length: number, errno: number, unique: number): void {
  out.writeUInt32LE(length, 0);
  out.writeInt32LE(errno, 4);
  writeU64(out, unique, 8);
}

/** Unasked messages to the kernel carry their code where a reply has its error, and request number 0. */
const FUSE_NOTIFY_STORE = 4;
/** fuse_out_header, then struct fuse_notify_store_out { u64 nodeid; u64 offset; u32 size; u32 padding; }: the data follows. */
export const NOTIFY_STORE_HEADER_SIZE = OUT_HEADER_SIZE + 24;

/** The headers of a FUSE_NOTIFY_STORE of `size` bytes at offset 0 of node `nodeid`, `length` bytes in all. */
export function writeNotifyStoreHeader(out: Buffer, length: number, nodeid: number, size: number): void {
  writeOutHeader(out, length, FUSE_NOTIFY_STORE, 0);
  writeU64(out, nodeid, OUT_HEADER_SIZE);
  writeU64(out, 0, OUT_HEADER_SIZE + 8);
  out.writeUInt32LE(size, OUT_HEADER_SIZE + 16);
  out.writeUInt32LE(0, OUT_HEADER_SIZE + 20);
}

function writeTime(buf: Buffer, secondsAt: number, nsecAt: number, t: Timespec): void {
  // The kernel stores the u64 into a signed time64_t: times before 1970 travel as two's complement.
  if (t.sec >= 0) writeU64(buf, t.sec, secondsAt);
  else buf.writeBigInt64LE(BigInt(t.sec), secondsAt);
  buf.writeUInt32LE(t.nsec, nsecAt);
}

function writeAttr(buf: Buffer, at: number, st: UnionStat): void {
  writeU64(buf, st.ino, at);
  writeU64(buf, st.size, at + 8);
  writeU64(buf, st.blocks, at + 16);
  writeTime(buf, at + 24, at + 48, st.atime);
  writeTime(buf, at + 32, at + 52, st.mtime);
  writeTime(buf, at + 40, at + 56, st.ctime);
  buf.writeUInt32LE(st.mode >>> 0, at + 60);
  buf.writeUInt32LE(st.nlink, at + 64);
  buf.writeUInt32LE(st.uid >>> 0, at + 68);
  buf.writeUInt32LE(st.gid >>> 0, at + 72);
  buf.writeUInt32LE(st.rdev >>> 0, at + 76);
  buf.writeUInt32LE(st.blksize, at + 80);
  buf.writeUInt32LE(0, at + 84);
}

function writeValid(buf: Buffer, secondsAt: number, nsecAt: number, seconds: number): void {
  const whole = Math.floor(seconds);
  writeU64(buf, whole, secondsAt);
  buf.writeUInt32LE(Math.round((seconds - whole) * 1e9), nsecAt);
}

/** fuse_entry_out at `at`; nodeid 0 with a timeout is a cached "no such name". */
export function writeEntry(buf: Buffer, at: number, nodeid: number, st: UnionStat | undefined, entrySeconds: number, attrSeconds: number): void {
  writeU64(buf, nodeid, at);
  writeU64(buf, 0, at + 8); // generation: node ids are never reused
  writeValid(buf, at + 16, at + 32, entrySeconds);
  writeValid(buf, at + 24, at + 36, attrSeconds);
  if (st) writeAttr(buf, at + 40, st);
  else buf.fill(0, at + 40, at + ENTRY_OUT_SIZE);
}

export function entryOut(nodeid: number, st: UnionStat | undefined, entrySeconds: number, attrSeconds: number): Buffer {
  const buf = Buffer.allocUnsafe(ENTRY_OUT_SIZE);
  writeEntry(buf, 0, nodeid, st, entrySeconds, attrSeconds);
  return buf;
}

export function attrOut(st: UnionStat, attrSeconds: number): Buffer {
  const buf = Buffer.allocUnsafe(16 + ATTR_SIZE);
  writeValid(buf, 0, 8, attrSeconds);
  buf.writeUInt32LE(0, 12);
  writeAttr(buf, 16, st);
  return buf;
}

/** fuse_open_out; `backingId` with FOPEN_PASSTHROUGH. */
export function openOut(fh: number, openFlags: number, backingId = 0): Buffer {
  const buf = Buffer.alloc(16);
  writeU64(buf, fh, 0);
  buf.writeUInt32LE(openFlags, 8);
  buf.writeInt32LE(backingId, 12);
  return buf;
}

export function u32Out(value: number): Buffer {
  const buf = Buffer.alloc(8);
  buf.writeUInt32LE(value, 0);
  return buf;
}

export interface KStatfs {
  blocks: number; bfree: number; bavail: number; files: number; ffree: number;
  bsize: number; namelen: number; frsize: number;
}

export function statfsOut(st: KStatfs): Buffer {
  const buf = Buffer.alloc(80);
  [st.blocks, st.bfree, st.bavail, st.files, st.ffree].forEach((v, i) => writeU64(buf, Math.max(0, Math.floor(v)), i * 8));
  buf.writeUInt32LE(st.bsize, 40);
  buf.writeUInt32LE(st.namelen, 44);
  buf.writeUInt32LE(st.frsize, 48);
  return buf;
}

export interface InitIn { major: number; minor: number; maxReadahead: number; flags: number; flags2: number }

export function readInit(buf: Buffer): InitIn {
  const r = new BodyReader(buf);
  const init = { major: r.u32(), minor: r.u32(), maxReadahead: r.u32(), flags: r.u32(), flags2: 0 };
  // 7.36+: flags2 follows (the kernel sends the long init_in then).
  if ((init.flags & InitFlag.INIT_EXT) !== 0 && buf.length >= IN_HEADER_SIZE + 20) init.flags2 = r.u32();
  return init;
}

export interface InitOut {
  maxReadahead: number; flags: number; maxBackground: number; congestionThreshold: number;
  maxWrite: number; timeGran: number; maxPages: number;
  /** Declared protocol minor (FUSE_KERNEL_MINOR_VERSION unless passthrough is taken). */
  minor?: number;
  flags2?: number;
  /** With passthrough: how deep backing filesystems may be stacked below this one. */
  maxStackDepth?: number;
}

export function initOut(init: InitOut): Buffer {
  const buf = Buffer.alloc(64);
  buf.writeUInt32LE(FUSE_KERNEL_VERSION, 0);
  buf.writeUInt32LE(init.minor ?? FUSE_KERNEL_MINOR_VERSION, 4);
  buf.writeUInt32LE(init.maxReadahead, 8);
  buf.writeUInt32LE(init.flags >>> 0, 12);
  buf.writeUInt16LE(init.maxBackground, 16);
  buf.writeUInt16LE(init.congestionThreshold, 18);
  buf.writeUInt32LE(init.maxWrite, 20);
  buf.writeUInt32LE(init.timeGran, 24);
  buf.writeUInt16LE(init.maxPages, 28);
  // 30: map_alignment (DAX only)
  buf.writeUInt32LE((init.flags2 ?? 0) >>> 0, 32);
  buf.writeUInt32LE(init.maxStackDepth ?? 0, 36);
  return buf;
}

/** Size of one fuse_dirent (or fuse_direntplus) record for `name`, padded to 8 bytes. */
export function direntSize(name: string, plus: boolean): number {
  const bytes = DIRENT_HEADER_SIZE + Buffer.byteLength(name);
  return (plus ? ENTRY_OUT_SIZE : 0) + ((bytes + 7) & ~7);
}

/** Write one fuse_dirent at `at`; `next` is the offset the kernel passes back to continue after it. */
export function writeDirent(buf: Buffer, at: number, ino: number, next: number, mode: number, name: string): number {
  const length = Buffer.byteLength(name);
  writeU64(buf, ino, at);
  writeU64(buf, next, at + 8);
  buf.writeUInt32LE(length, at + 16);
  buf.writeUInt32LE((mode & 0o170000) >>> 12, at + 20);
  buf.write(name, at + DIRENT_HEADER_SIZE, 'utf8');
  const end = at + DIRENT_HEADER_SIZE + length;
  const padded = (end - at + 7) & ~7;
  buf.fill(0, end, at + padded);
  return at + padded;
}
