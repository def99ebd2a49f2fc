/**
 * Reads of one store layer's `layer.tar` for a mount, through one
 * descriptor of it.
 *
 * A store layer's small files are ranges of its tar, and a reader that
 * walks a tree (tar, cp -r, a package manager's scan) asks for them roughly
 * in tar order: file after file, each a READ of a few KiB at an offset a
 * little past the last one. Opening the tar for each file cost an open(2)
 * and close(2) per file, and hid that stream from the kernel's read-ahead:
 * each open started its read-ahead state from nothing, so, cold, every
 * small file was a disk read of its own on the thread pool. Through one
 * descriptor the kernel sees one reader going forward and reads ahead of
 * it (up to the disk's read_ahead_kb); the reads then find their bytes in
 * the page cache and are done at once (openFiles.ts readAt).
 *
 * The descriptor is opened at the first read, so opens whose pages the
 * kernel already caches (FOPEN_KEEP_CACHE) cost no system call, and closed
 * with the mount, once no read on the pool still uses it.
 */
import { closeSync, openSync } from 'node:fs';
import { fsError } from './fsError.js';
import { readAt } from './openFiles.js';

export class TarReader {
  /** -1: not opened yet. */
  private fd = -1;
  /** Reads still running on the pool with the descriptor: it stays open until they return. */
  private pending = 0;
  private closed = false;

  constructor(private readonly path: string) {}

  /** Read `length` bytes of the tar at `position` (a range of one file: never past the tar's end). */
  read(buffer: Buffer, length: number, position: number): Promise<number> {
    try {
      if (this.closed) throw fsError('EBADF', this.path, 'read of a closed layer tar');
      if (this.fd === -1) this.fd = openSync(this.path, 'r');
      const read = readAt(this.fd, buffer, length, position);
      if (typeof read === 'number') return Promise.resolve(read);
      this.pending++;
      return read.finally(() => {
        this.pending--;
        this.closeIfIdle();
      });
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** Stop; the descriptor is closed once nothing runs on it. */
  close(): void {
    this.closed = true;
    this.closeIfIdle();
  }

  private closeIfIdle(): void {
    if (!this.closed || this.pending > 0 || this.fd < 0) return;
    closeSync(this.fd);
    this.fd = -1;
  }
}
