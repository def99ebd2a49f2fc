/**
 * Read-only access to the files of an image source, whether they lie in a
 * directory or inside a tar archive. Names are archive-style relative paths
 * (`blobs/sha256/<hex>`, `manifest.json`), always normalised and checked.
 */
import { createReadStream } from 'node:fs';
import { lstat, open, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { type Readable } from 'node:stream';
import { ErrorCodes, LayerdError, errnoCode } from '../../common/errors.js';
import { normalizeTarPath } from '../tarPaths.js';
import { type ArchiveMember, indexTarArchive } from './tarArchive.js';

export interface FileTree {
  readonly description: string;
  /** Size of a regular file, or undefined if there is none by that name. */
  size(name: string): Promise<number | undefined>;
  /** The whole file, refusing files over `maxBytes`. */
  read(name: string, maxBytes: number): Promise<Buffer>;
  open(name: string): Readable;
}

function tooLarge(description: string, name: string, size: number, maxBytes: number): LayerdError {
  return new LayerdError(ErrorCodes.ELIMIT, `${description}: ${name} is ${size} bytes, more than the ${maxBytes} allowed`, { path: name, size });
}

export class DirectoryTree implements FileTree {
  constructor(readonly dir: string) {}

  get description(): string { return this.dir; }

  private path(name: string): string {
    return join(this.dir, normalizeTarPath(name, 'file name'));
  }

  async size(name: string): Promise<number | undefined> {
    try {
      const st = await stat(this.path(name));
      return st.isFile() ? st.size : undefined;
    } catch (err) {
      if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return undefined;
      throw err;
    }
  }

  async read(name: string, maxBytes: number): Promise<Buffer> {
    const path = this.path(name);
    const handle = await open(path, 'r').catch((err: unknown) => {
      if (errnoCode(err) === 'ENOENT') throw new LayerdError(ErrorCodes.ENOTFOUND, `${this.dir}: no file ${name}`, { path: name });
      throw err;
    });
    try {
      const st = await handle.stat();
      if (st.size > maxBytes) throw tooLarge(this.description, name, st.size, maxBytes);
      return await handle.readFile();
    } finally {
      await handle.close();
    }
  }

  open(name: string): Readable {
    return createReadStream(this.path(name), { highWaterMark: 1024 * 1024 });
  }

  /** True if `dir` looks like a directory at all (for source detection). */
  static async isDirectory(path: string): Promise<boolean> {
    try {
      return (await lstat(path)).isDirectory() || (await stat(path)).isDirectory();
    } catch {
      return false;
    }
  }

  static async readIfExists(path: string): Promise<Buffer | undefined> {
    try {
      return await readFile(path);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return undefined;
      throw err;
    }
  }
}

/**
 * The members of an uncompressed tar archive, read in place by offset: an
 * archive is scanned once for its table of contents, and each member is
 * then read straight from the archive file without being copied out.
 */
export class TarTree implements FileTree {
  private constructor(readonly archive: string, private readonly members: Map<string, ArchiveMember>) {}

  static async open(archive: string): Promise<TarTree> {
    return new TarTree(archive, await indexTarArchive(archive));
  }

  get description(): string { return this.archive; }

  names(): string[] {
    return [...this.members.keys()];
  }

  private member(name: string): ArchiveMember | undefined {
    return this.members.get(normalizeTarPath(name, 'file name'));
  }

  async size(name: string): Promise<number | undefined> {
    return this.member(name)?.size;
  }

  async read(name: string, maxBytes: number): Promise<Buffer> {
    const m = this.member(name);
    if (!m) throw new LayerdError(ErrorCodes.ENOTFOUND, `${this.archive}: no member ${name}`, { path: name });
    if (m.size > maxBytes) throw tooLarge(this.description, name, m.size, maxBytes);
    const handle = await open(this.archive, 'r');
    try {
      const buf = Buffer.alloc(m.size);
      const { bytesRead } = await handle.read(buf, 0, m.size, m.offset);
      if (bytesRead !== m.size) throw new LayerdError(ErrorCodes.EBADTAR, `${this.archive}: member ${name} is truncated`, { path: name });
      return buf;
    } finally {
      await handle.close();
    }
  }

  open(name: string): Readable {
    const m = this.member(name);
    if (!m) throw new LayerdError(ErrorCodes.ENOTFOUND, `${this.archive}: no member ${name}`, { path: name });
    if (m.size === 0) return createReadStream(this.archive, { start: 1, end: 0 });
    return createReadStream(this.archive, { start: m.offset, end: m.offset + m.size - 1, highWaterMark: 1024 * 1024 });
  }
}
