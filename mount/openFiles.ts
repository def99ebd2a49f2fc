/**
 * The table of open files: FUSE file handles → host file descriptors.
 * Reads and writes are positional (pread/pwrite) on the descriptor, so one
 * descriptor serves any number of concurrent requests.
 */
import { closeSync, fdatasync, fsync, ftruncate, read, write, writeSync } from 'node:fs';
import { preadCached } from '../common/sys/fs.js';
import { fsError } from './fsError.js';
import type { LowerObject, UnionNode } from './mergedTree.js';
import type { TarReader } from './tarReader.js';

/** `OpenFile.fd` of a file read through its layer's TarReader (no descriptor of its own). */
export const THROUGH_TAR = -2;

export interface OpenFile {
  /** Host file descriptor, -1 for an empty lower file (reads return 0 bytes), or THROUGH_TAR. */
  fd: number;
  /**
   * A store layer's file: its bytes are `range` of the layer's tar, read
   * through the mount's one descriptor of it (so the kernel's read-ahead
   * sees one reader across files). An open whose pages the kernel already
   * caches (FOPEN_KEEP_CACHE) never reads, and costs no system call here.
   */
  readonly tar?: TarReader;
  readonly node: UnionNode;
  /**
   * For a lower file that is a range of a bigger file (a store layer's
   * layer.tar): where the range starts and how long it is.
   */
  readonly range?: { offset: number; size: number };
  /** Awaited before a read of file bytes [offset, offset + length) (lazily pulled content). */
  readonly ready?: (offset: number, length: number) => Promise<void>;
  /** The lower object opened (read-only opens of lower content): what fstat describes. */
  readonly lower?: LowerObject;
  /** Opened on the upper file (so fstat of the descriptor describes it). */
  readonly upper: boolean;
  /** Opened O_SYNC or O_DSYNC: every write waits for the disk. */
  readonly durable?: boolean;
  /** Opened read-write without flags of its own (O_APPEND, O_SYNC…): the descriptor can stand behind every open of the file. */
  readonly plainReadWrite?: boolean;
}

type Callback<T> = (err: NodeJS.ErrnoException | null, value: T) => void;

export function callback<T>(fn: (cb: Callback<T>) => void): Promise<T> {
  return new Promise((resolve, reject) => fn((err, value) => (err ? reject(err) : resolve(value))));
}

function done(fn: (cb: (err: NodeJS.ErrnoException | null) => void) => void): Promise<void> {
  return callback<void>((cb) => fn((err) => cb(err, undefined)));
}

const MAX_FH = 0x7fffffff;
/**
 * File content up to this size is read or written synchronously (writes
 * here, copy-ups in upperDir.ts): between page caches that takes µs, where a
 * thread-pool round trip costs ~50–100 µs of CPU, and most files and writes
 * are small. Bigger ones go through the pool, so one large transfer does not
 * hold up the other mounts of a host.
 */
export const SYNC_IO_MAX = 64 * 1024;
/**
 * Reads up to this size are tried at once from the page cache (preadCached:
 * a copy of ≤ 256 KiB takes ~10 µs); only what would wait for the disk goes
 * to the pool. Files of this size or more are passed through when they can be.
 */
export const SYNC_READ_MAX = 256 * 1024;

export class OpenFiles {
  private readonly files = new Map<number, OpenFile>();
  private nextFh = 1;

  /** Register a descriptor; returns its file handle (never 0: FUSE's "not opened", as the directories of a mount use it). */
  add(file: OpenFile): number {
    while (this.files.has(this.nextFh)) this.nextFh = this.nextFh >= MAX_FH ? 1 : this.nextFh + 1;
    const fh = this.nextFh;
    this.nextFh = fh >= MAX_FH ? 1 : fh + 1;
    this.files.set(fh, file);
    return fh;
  }

  get(fh: number): OpenFile {
    const file = this.files.get(fh);
    if (file === undefined) throw fsError('EBADF', String(fh), 'file handle');
    return file;
  }

  get size(): number {
    return this.files.size;
  }

  read(fh: number, buffer: Buffer, length: number, position: number): Promise<number> {
    try {
      const { fd, range, ready, tar } = this.get(fh);
      if (range) {
        // Never read past the file's own bytes into the rest of the tar.
        const n = Math.min(length, range.size - position);
        if (n <= 0) return Promise.resolve(0);
        if (tar) return tar.read(buffer, n, range.offset + position);
        if (ready) return ready(position, n).then(() => callback<number>((cb) => read(fd, buffer, 0, n, range.offset + position, cb)));
        return Promise.resolve(readAt(fd, buffer, n, range.offset + position));
      }
      if (fd < 0) return Promise.resolve(0);
      return Promise.resolve(readAt(fd, buffer, length, position));
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /**
   * Write at `position`: at once up to SYNC_IO_MAX bytes. Bigger writes, and
   * those on a descriptor whose writes wait for the disk, go to the pool and
   * work on a copy: `buffer` may be reused as soon as this returns.
   */
  write(fh: number, buffer: Buffer, length: number, position: number): number | Promise<number> {
    const { fd, durable } = this.get(fh);
    if (length <= SYNC_IO_MAX && durable !== true) return writeSync(fd, buffer, 0, length, position);
    const copy = Buffer.from(buffer.subarray(0, length));
    return callback<number>((cb) => write(fd, copy, 0, length, position, cb));
  }

  truncate(fh: number, size: number): Promise<void> {
    const { fd } = this.get(fh);
    return done((cb) => ftruncate(fd, size, cb));
  }

  sync(fh: number, dataOnly: boolean): Promise<void> {
    const { fd } = this.get(fh);
    if (fd < 0) return Promise.resolve();
    return done((cb) => (dataOnly ? fdatasync : fsync)(fd, cb));
  }

  /**
   * Forget a handle and close its descriptor — synchronously: close(2) of a
   * local file takes µs, a thread-pool round trip ~50 µs of CPU.
   */
  release(fh: number): Promise<void> {
    const file = this.files.get(fh);
    this.files.delete(fh);
    if (file === undefined || file.fd < 0) return Promise.resolve();
    try {
      closeSync(file.fd);
      return Promise.resolve();
    } catch (err) {
      return Promise.reject(err);
    }
  }

  async closeAll(): Promise<void> {
    for (const fh of [...this.files.keys()]) await this.release(fh).catch(() => undefined);
  }
}

/**
 * pread: at once what the page cache holds (up to SYNC_READ_MAX), the rest
 * on the thread pool. A short read from the cache is not the end of the
 * file, only of what is cached: the pool reads on from there.
 */
export function readAt(fd: number, buffer: Buffer, length: number, position: number): number | Promise<number> {
  let cached: number | undefined;
  if (length <= SYNC_READ_MAX) {
    cached = preadCached(fd, buffer, length, position);
    if (cached === length || cached === 0) return cached;
  }
  const got = cached ?? 0;
  return callback<number>((cb) => read(fd, buffer, got, length - got, position + got, cb)).then((n) => got + n);
}
