/**
 * The writable upper directory: a real directory tree that, together with the
 * `.wh.` whiteouts and `.wh..wh..opq` markers written into it, is an OCI
 * changeset of the lower layers. This module only touches the disk; which
 * paths to touch is decided by the union core.
 *
 * Metadata system calls here (mkdir, chown, chmod, utimes, stat, link,
 * unlink, ...) are made synchronously: on a local upper dir each takes a few
 * µs, while a round trip through libuv's thread pool costs ~50 µs of CPU
 * (measured on the 2-core bench machines) — most of the cost of a copy-up
 * or a create. File content (which can be big or miss the page cache) is
 * still copied on the thread pool.
 */
import { execFile } from 'node:child_process';
import {
  closeSync, copyFile, fchmodSync, fchownSync, fstatSync, futimesSync, lchownSync, chmodSync, lstatSync, lutimesSync,
  mkdirSync, openSync, read, readSync, rmSync, symlinkSync, unlinkSync, write, writeSync, constants as fsConstants,
} from 'node:fs';
import { type ContentRef, type EntryKind, type LayerEntry, xattrBytes } from '../storage/layerIndex.js';
import { FsError } from './fsError.js';
import { SYNC_IO_MAX, callback as call } from './openFiles.js';
import { OPAQUE_MARKER, WHITEOUT_PREFIX, baseName, parentOf } from './paths.js';
import { writeXattrs } from './xattrTool.js';

export type NodeKind = 'fifo' | 'char' | 'block' | 'socket';

const NEW_FILE_FLAGS = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_TRUNC;

/** Create (or empty) a marker file. */
function writeEmptyFile(path: string): void {
  closeSync(openSync(path, NEW_FILE_FLAGS, 0o600));
}

export class UpperDir {
  constructor(readonly root: string) {}

  pathOf(path: string): string {
    return path === '' ? this.root : `${this.root}/${path}`;
  }

  whiteoutPathOf(path: string): string {
    const parent = parentOf(path);
    return `${this.pathOf(parent)}/${WHITEOUT_PREFIX}${baseName(path)}`;
  }

  writeWhiteout(path: string): void {
    writeEmptyFile(this.whiteoutPathOf(path));
  }

  writeOpaqueMarker(dirPath: string): void {
    writeEmptyFile(`${this.pathOf(dirPath)}/${OPAQUE_MARKER}`);
  }

  /** Remove a whiteout in either on-disk style. */
  removeWhiteout(path: string, style: 'oci' | 'overlay'): void {
    unlinkSync(style === 'oci' ? this.whiteoutPathOf(path) : this.pathOf(path));
  }

  /** Remove a directory the union shows as empty (so it holds only markers). */
  removeDir(path: string): void {
    rmSync(this.pathOf(path), { recursive: true, force: false });
  }

  /** Special files: Node has no mknod(2), coreutils' mknod does it. */
  async mknod(path: string, kind: NodeKind, mode: number, major = 0, minor = 0): Promise<void> {
    const type = kind === 'fifo' ? ['p'] : [kind === 'char' ? 'c' : 'b', String(major), String(minor)];
    const args = ['-m', (mode & 0o7777).toString(8), '--', this.pathOf(path), ...type];
    await new Promise<void>((resolve, reject) => {
      execFile('mknod', args, (err, _stdout, stderr) => {
        if (!err) return resolve();
        reject(new FsError(/exists/.test(stderr) ? 'EEXIST' : /not permitted/.test(stderr) ? 'EPERM' : 'EIO', path, 'mknod'));
      });
    });
  }

  /**
   * Copy a lower object into the upper at `path` with all its attributes:
   * owner first (chown clears setuid and capabilities), then xattrs, then
   * mode, then times (last, since every other change touches ctime/mtime).
   * Returns the new upper object's st_ino.
   */
  async copyUpObject(path: string, kind: EntryKind, entry: LayerEntry, content: ContentRef | undefined): Promise<number> {
    const dest = this.pathOf(path);
    if (kind === 'file') return this.copyUpFile(dest, entry, content);
    switch (kind) {
      case 'dir': mkdirSync(dest, { mode: 0o700 }); break;
      case 'symlink': symlinkSync(entry.target ?? '', dest); break;
      default: await this.mknod(path, kind, 0o600, entry.devMajor ?? 0, entry.devMinor ?? 0);
    }
    lchownSync(dest, entry.uid, entry.gid);
    await writeXattrs(dest, entryXattrs(entry));
    if (kind !== 'symlink') chmodSync(dest, entry.mode & 0o7777);
    lutimesSync(dest, entry.mtime, entry.mtime);
    return lstatSync(dest).ino;
  }

  /** A regular file: content and attributes through one descriptor. */
  private async copyUpFile(dest: string, entry: LayerEntry, content: ContentRef | undefined): Promise<number> {
    // A whole file (a directory layer's) is copied in the kernel; a range of layer.tar by positioned reads.
    const whole = content !== undefined && content.offset === 0;
    if (whole) await call<void>((cb) => copyFile(content.path, dest, (err) => cb(err, undefined)));
    // After copyFile the file has the lower mode, maybe read-only: the f-calls below need no write access.
    const fd = openSync(dest, whole ? fsConstants.O_RDONLY : NEW_FILE_FLAGS, 0o600);
    try {
      if (content !== undefined && !whole) await copyRange(content, fd, dest);
      fchownSync(fd, entry.uid, entry.gid);
      await writeXattrs(dest, entryXattrs(entry));
      fchmodSync(fd, entry.mode & 0o7777);
      futimesSync(fd, entry.mtime, entry.mtime);
      return fstatSync(fd).ino;
    } finally {
      closeSync(fd);
    }
  }
}

function entryXattrs(entry: LayerEntry): Array<[string, Buffer]> {
  return Object.keys(entry.xattrs ?? {}).map((name) => [name, xattrBytes(entry, name)!]);
}

const COPY_CHUNK = 1 << 20;

/** Copy `content` (a range of a bigger file) to the start of `destFd`. */
async function copyRange(content: ContentRef, destFd: number, dest: string): Promise<void> {
  const srcFd = openSync(content.path, fsConstants.O_RDONLY);
  try {
    if (content.size <= SYNC_IO_MAX) { // copied at once, as small writes are
      const buffer = Buffer.allocUnsafe(content.size);
      if (readSync(srcFd, buffer, 0, content.size, content.offset) !== content.size) {
        throw new FsError('EIO', dest, `copy-up: ${content.path} ends before its entry`);
      }
      for (let written = 0; written < content.size;) written += writeSync(destFd, buffer, written, content.size - written, written);
      return;
    }
    const buffer = Buffer.allocUnsafe(Math.min(content.size, COPY_CHUNK));
    for (let done = 0; done < content.size;) {
      const want = Math.min(buffer.length, content.size - done);
      const got = await call<number>((cb) => read(srcFd, buffer, 0, want, content.offset + done, cb));
      if (got === 0) throw new FsError('EIO', dest, `copy-up: ${content.path} ends before its entry`);
      for (let written = 0; written < got;) {
        written += await call<number>((cb) => write(destFd, buffer, written, got - written, done + written, cb));
      }
      done += got;
    }
  } finally {
    closeSync(srcFd);
  }
}
