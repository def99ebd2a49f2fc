/**
 * Splitting an uncompressed layer tar, as it streams by, into its skeleton
 * (storage/tarSkeleton.ts) and its files' bytes: small files into the
 * layer's `inline` file, every other file into a content-addressed object
 * staged in the import's own area (deduplicated against the objects the
 * store and this import already have: a file whose digest is known is not
 * written again). The bytes are passed on unchanged (to the indexer).
 *
 * The splitter walks the tar's 512-byte blocks itself, the way tar-stream
 * (the indexer's parser) does: the same rules for sizes (octal, base-256,
 * PAX `size`), for which headers carry no data (directories), and for
 * zero blocks. Where a regular file's bytes start is recorded by tar
 * offset; the indexer's offsets must all be found here, or the import is
 * refused (storage/layerIngest.ts), so a tar the two would read
 * differently never becomes a layer.
 */
import { createHash, type Hash } from 'node:crypto';
import { createWriteStream, type WriteStream, writeFileSync } from 'node:fs';
import { type FileHandle, open, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform, type TransformCallback } from 'node:stream';
import { createGzip, type Gzip } from 'node:zlib';
import { type DiskGuard } from './diskSpace.js';
import { INLINE_FILE, INLINE_MAX_SIZE, SKELETON_FILE, encodeInline, encodeObject, encodeRaw } from './tarSkeleton.js';

/** Where an import stages new objects, and which it need not write. */
export interface ObjectStaging {
  /** A directory of the import's own area for new object files. */
  readonly dir: string;
  /** Whether the object of `digest` is in the store or staged by this import already. */
  has(digest: string): boolean;
  /** Take a staged file as the object of `digest`; false when another was taken meanwhile (remove this one). */
  add(digest: string, path: string): boolean;
  /** A fresh file name in `dir`. */
  nextName(): string;
}

export interface SplitResult {
  /** Tar offset of a regular file's bytes → the digest of its object. */
  objects: Map<number, string>;
  /** Tar offset of a small file's bytes → where they are in `inline`. */
  inline: Map<number, number>;
  /** Bytes of the skeleton (compressed) and of `inline`. */
  skeletonBytes: number;
  inlineBytes: number;
  /** Objects this layer wrote (the others were in the store or the import already). */
  objectsWritten: number;
  objectBytesWritten: number;
}

/** Files up to this size are hashed in memory first, and written only when their object is new. */
const BUFFER_MAX = 1024 * 1024;
/** Objects up to this size are written synchronously (as the mount writes small files: mount/openFiles.ts SYNC_IO_MAX). */
const SYNC_WRITE_MAX = 64 * 1024;
/** Kept bytes gathered into one record before it goes to the skeleton. */
const RAW_RECORD = 256 * 1024;
/** Object writes in flight before the stream waits for them. */
const MAX_PENDING_WRITES = 64;
const MAX_PENDING_BYTES = 64 * 1024 * 1024;

type State = 'header' | 'meta' | 'file' | 'data' | 'pad';

export class TarSplitter extends Transform {
  private state: State = 'header';
  private readonly header = Buffer.alloc(512);
  private headerFill = 0;
  private remaining = 0;
  private padding = 0;
  /** Offset in the tar of the next byte. */
  private pos = 0;

  private metaKind: 'pax' | 'globalPax' | 'other' = 'other';
  private metaChunks: Buffer[] = [];
  private localPaxSize: string | undefined;
  private localPax = false;
  private globalPaxSize: string | undefined;

  private rawChunks: Buffer[] = [];
  private rawBytes = 0;
  private records: Buffer[] = [];
  private recordBytes = 0;

  // The file whose bytes are streaming by.
  private fileOffset = 0;
  private fileSize = 0;
  private fileHash: Hash | undefined;
  private fileChunks: Buffer[] = [];
  private fileOut: { path: string; handle: Promise<FileHandle>; writes: Promise<unknown> } | undefined;

  private gzip!: Gzip;
  private skeletonOut!: WriteStream;
  private skeletonDone!: Promise<void>;
  private inlineChunks: Buffer[] = [];
  private inlineBuffered = 0;
  private inlineHandle: FileHandle | undefined;
  private inlineWrites: Promise<unknown> = Promise.resolve();

  private pending = new Set<Promise<unknown>>();
  private pendingBytes = 0;
  private failure: unknown;

  readonly result: SplitResult = { objects: new Map(), inline: new Map(), skeletonBytes: 0, inlineBytes: 0, objectsWritten: 0, objectBytesWritten: 0 };

  constructor(private readonly layerDir: string, private readonly staging: ObjectStaging, private readonly disk?: DiskGuard) {
    super({ highWaterMark: 1024 * 1024 });
  }

  override _construct(callback: (error?: Error | null) => void): void {
    this.gzip = createGzip({ level: 6 });
    this.skeletonOut = createWriteStream(join(this.layerDir, SKELETON_FILE), { flags: 'wx', mode: 0o600 });
    this.skeletonDone = new Promise((resolve, reject) => {
      this.skeletonOut.once('finish', resolve);
      this.skeletonOut.once('error', reject);
      this.gzip.once('error', reject);
    });
    this.skeletonDone.catch(() => undefined);
    this.gzip.pipe(this.skeletonOut);
    open(join(this.layerDir, INLINE_FILE), 'wx', 0o600).then((h) => { this.inlineHandle = h; callback(); }, callback);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, callback: TransformCallback): void {
    this.push(chunk);
    try {
      this.consume(chunk);
    } catch (err) {
      callback(err as Error);
      return;
    }
    this.waitForRoom().then(() => callback(), callback);
  }

  override _flush(callback: TransformCallback): void {
    (async () => {
      if (this.state === 'header' && this.headerFill > 0) this.keep(Buffer.from(this.header.subarray(0, this.headerFill)));
      // A file cut short by the end of the stream: the indexer refuses the tar; keep the bytes so the rest is consistent.
      if (this.state === 'file') this.abandonFile();
      this.flushRaw();
      this.flushRecords();
      this.flushInline();
      await Promise.all([...this.pending]);
      if (this.failure !== undefined) throw this.failure;
      await this.inlineWrites;
      await this.inlineHandle?.close();
      this.inlineHandle = undefined;
      this.gzip.end();
      await this.skeletonDone;
      this.result.skeletonBytes = this.skeletonOut.bytesWritten;
    })().then(() => callback(), callback);
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    const inline = this.inlineHandle;
    this.inlineHandle = undefined;
    this.gzip?.destroy();
    this.skeletonOut?.destroy();
    void Promise.allSettled([...this.pending]).then(() => this.fileOut?.handle.then((h) => h.close()).catch(() => undefined));
    if (inline) inline.close().then(() => callback(error), () => callback(error));
    else callback(error);
  }

  private consume(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length) {
      const rest = chunk.length - at;
      switch (this.state) {
        case 'header': {
          const n = Math.min(512 - this.headerFill, rest);
          chunk.copy(this.header, this.headerFill, at, at + n);
          this.headerFill += n;
          at += n;
          this.pos += n;
          if (this.headerFill === 512) {
            this.headerFill = 0;
            this.onHeader();
          }
          break;
        }
        case 'pad':
        case 'meta':
        case 'data':
        case 'file': {
          const n = Math.min(this.remaining, rest);
          const part = chunk.subarray(at, at + n);
          at += n;
          this.pos += n;
          this.remaining -= n;
          // Chunks are never reused by the streams that give them: parts are kept by reference.
          if (this.state === 'file') this.fileBytes(part);
          else {
            this.keep(part);
            if (this.state === 'meta') this.metaChunks.push(part);
          }
          if (this.remaining === 0) this.endData();
          break;
        }
      }
    }
  }

  /** A complete 512-byte header block: kept, and what follows it decided as tar-stream decides it. */
  private onHeader(): void {
    const h = Buffer.from(this.header);
    this.keep(h);
    if (checksumOf(h) === 8 * 32) return; // a zero block: tar-stream reads on after it, and so does this
    const typeflag = h[156] === 0 ? 0 : h[156]! - 48;
    let size = decodeNumber(h, 124, 12);
    if (size === undefined || !(size >= 0)) { this.giveUp(); return; }
    if (typeflag === 72 || typeflag === 55 || typeflag === 27 || typeflag === 28 || typeflag === 30) {
      this.metaKind = typeflag === 72 ? 'pax' : typeflag === 55 ? 'globalPax' : 'other';
      this.metaChunks = [];
      this.startData('meta', size);
      return;
    }
    if (this.localPax) {
      const paxSize = this.localPaxSize ?? this.globalPaxSize;
      if (paxSize) size = parseInt(paxSize, 10);
      this.localPax = false;
      this.localPaxSize = undefined;
      if (!(size >= 0)) { this.giveUp(); return; }
    }
    const directory = typeflag === 5 || (typeflag === 0 && nameEndsWithSlash(h));
    if (directory || size === 0) return;
    if (typeflag === 0 || typeflag === 7) {
      this.fileOffset = this.pos;
      this.fileSize = size;
      this.startFile();
      this.startData('file', size);
    } else {
      this.startData('data', size);
    }
  }

  private startData(state: 'meta' | 'file' | 'data', size: number): void {
    this.padding = (size & 511) === 0 ? 0 : 512 - (size % 512);
    this.remaining = size;
    this.state = state;
    if (size === 0) this.endData();
  }

  private endData(): void {
    if (this.state === 'meta') this.endMeta();
    else if (this.state === 'file') this.endFile();
    if (this.state !== 'pad' && this.padding > 0) {
      this.state = 'pad';
      this.remaining = this.padding;
      this.padding = 0;
      return;
    }
    this.state = 'header';
  }

  private endMeta(): void {
    if (this.metaKind === 'other') return;
    const size = paxSizeOf(Buffer.concat(this.metaChunks));
    this.metaChunks = [];
    if (this.metaKind === 'pax') {
      this.localPax = true;
      this.localPaxSize = size;
    } else {
      this.globalPaxSize = size;
    }
  }

  /** A header this cannot read: everything after it is kept as it is (the indexer will refuse the tar). */
  private giveUp(): void {
    this.state = 'data';
    this.remaining = Number.POSITIVE_INFINITY;
  }

  // --- files --------------------------------------------------------------

  private startFile(): void {
    this.fileHash = createHash('sha256');
    this.fileChunks = [];
    this.fileOut = undefined;
    if (this.fileSize > BUFFER_MAX) {
      const path = join(this.staging.dir, this.staging.nextName());
      this.fileOut = { path, handle: open(path, 'wx', 0o444), writes: Promise.resolve() };
      this.fileOut.handle.catch(() => undefined);
    }
  }

  private fileBytes(part: Buffer): void {
    if (this.fileSize < INLINE_MAX_SIZE) { this.fileChunks.push(part); return; }
    this.fileHash!.update(part);
    if (this.fileOut === undefined) { this.fileChunks.push(part); return; }
    const out = this.fileOut;
    const copy = part;
    out.writes = out.writes.then(async () => {
      if (this.disk) await this.disk.wrote(copy.length);
      const h = await out.handle;
      let done = 0;
      while (done < copy.length) done += (await h.write(copy, done, copy.length - done)).bytesWritten;
    });
    this.track(out.writes, copy.length);
  }

  private endFile(): void {
    const offset = this.fileOffset;
    if (this.fileSize < INLINE_MAX_SIZE) {
      const bytes = Buffer.concat(this.fileChunks);
      this.fileChunks = [];
      this.result.inline.set(offset, this.result.inlineBytes);
      this.result.inlineBytes += bytes.length;
      this.keepRecord(encodeInline(bytes.length));
      this.inlineChunks.push(bytes);
      this.inlineBuffered += bytes.length;
      if (this.inlineBuffered >= RAW_RECORD) this.flushInline();
      return;
    }
    const digest = `sha256:${this.fileHash!.digest('hex')}`;
    this.fileHash = undefined;
    this.result.objects.set(offset, digest);
    this.keepRecord(encodeObject(this.fileSize, digest));
    const size = this.fileSize;
    const out = this.fileOut;
    this.fileOut = undefined;
    if (out !== undefined) {
      // Written while it streamed by: keep it only if the object is new.
      const done = out.writes.then(async () => {
        await (await out.handle).close();
        if (!this.staging.has(digest) && this.staging.add(digest, out.path)) {
          this.result.objectsWritten++;
          this.result.objectBytesWritten += size;
        } else {
          await unlink(out.path);
        }
      });
      this.track(done, 0);
      return;
    }
    const bytes = this.fileChunks.length === 1 ? this.fileChunks[0]! : Buffer.concat(this.fileChunks);
    this.fileChunks = [];
    if (this.staging.has(digest)) return;
    const path = join(this.staging.dir, this.staging.nextName());
    // Claimed before it is written: another layer of this import finds it staged and does not write it too.
    this.staging.add(digest, path);
    this.result.objectsWritten++;
    this.result.objectBytesWritten += size;
    if (size <= SYNC_WRITE_MAX) {
      // Into the page cache in µs, where a thread-pool round trip per call costs more (the import area is the store's
      // own). The disk reserve is counted alongside: it is checked every few MiB, far more than one such file.
      writeFileSync(path, bytes, { flag: 'wx', mode: 0o444 });
      if (this.disk) this.track(this.disk.wrote(size), 0);
      return;
    }
    const write = (this.disk ? this.disk.wrote(size) : Promise.resolve()).then(() => writeFile(path, bytes, { flag: 'wx', mode: 0o444 }));
    this.track(write, size);
  }

  /** The stream ended inside a file (a truncated tar, which the indexer refuses): its bytes are dropped. */
  private abandonFile(): void {
    const out = this.fileOut;
    this.fileOut = undefined;
    this.fileChunks = [];
    if (out) this.track(out.writes.then(async () => { await (await out.handle).close(); await unlink(out.path); }), 0);
  }

  private track(p: Promise<unknown>, bytes: number): void {
    const tracked = p.then(() => undefined, (err: unknown) => { this.failure ??= err; });
    this.pending.add(tracked);
    this.pendingBytes += bytes;
    void tracked.finally(() => { this.pending.delete(tracked); this.pendingBytes -= bytes; });
  }

  private async waitForRoom(): Promise<void> {
    while (this.pending.size > MAX_PENDING_WRITES || this.pendingBytes > MAX_PENDING_BYTES) await Promise.race([...this.pending]);
    if (this.failure !== undefined) throw this.failure;
    if (this.gzip.writableNeedDrain) await new Promise<void>((resolve) => this.gzip.once('drain', resolve));
  }

  // --- the skeleton -------------------------------------------------------

  /** Tar bytes kept as they are. */
  private keep(bytes: Buffer): void {
    this.rawChunks.push(bytes);
    this.rawBytes += bytes.length;
    if (this.rawBytes >= RAW_RECORD) this.flushRaw();
  }

  private keepRecord(record: Buffer): void {
    this.flushRaw();
    this.record(record);
  }

  private flushRaw(): void {
    if (this.rawBytes === 0) return;
    this.record(encodeRaw(Buffer.concat(this.rawChunks, this.rawBytes)));
    this.rawChunks = [];
    this.rawBytes = 0;
  }

  /** Records go to the compressor in large pieces: each write is a job on the thread pool. */
  private record(bytes: Buffer): void {
    this.records.push(bytes);
    this.recordBytes += bytes.length;
    if (this.recordBytes >= RAW_RECORD) this.flushRecords();
  }

  private flushRecords(): void {
    if (this.recordBytes === 0) return;
    this.gzip.write(Buffer.concat(this.records, this.recordBytes));
    this.records = [];
    this.recordBytes = 0;
  }

  private flushInline(): void {
    if (this.inlineBuffered === 0) return;
    const bytes = Buffer.concat(this.inlineChunks, this.inlineBuffered);
    this.inlineChunks = [];
    this.inlineBuffered = 0;
    this.inlineWrites = this.inlineWrites.then(async () => {
      if (this.disk) await this.disk.wrote(bytes.length);
      let done = 0;
      while (done < bytes.length) done += (await this.inlineHandle!.write(bytes, done, bytes.length - done)).bytesWritten;
    });
    this.track(this.inlineWrites, bytes.length);
  }
}

/** tar-stream's header checksum (the checksum field counted as spaces): 256 for a block of zeros. */
function checksumOf(block: Buffer): number {
  let sum = 8 * 32;
  for (let i = 0; i < 148; i++) sum += block[i]!;
  for (let i = 156; i < 512; i++) sum += block[i]!;
  return sum;
}

/** A numeric header field as tar-stream reads it: base-256 when the top bit is set, else octal after spaces and NULs. */
function decodeNumber(block: Buffer, offset: number, length: number): number | undefined {
  const val = block.subarray(offset, offset + length);
  if ((val[0]! & 0x80) !== 0) {
    const positive = val[0] === 0x80;
    if (!positive && val[0] !== 0xff) return undefined;
    let sum = 0;
    for (let i = 1; i < val.length; i++) sum = sum * 256 + (positive ? val[i]! : 0xff - val[i]!);
    return positive ? sum : -sum;
  }
  let i = 0;
  while (i < val.length && val[i] === 32) i++;
  let end = i;
  while (end < val.length && val[end] !== 32) end++;
  while (i < end && val[i] === 0) i++;
  if (end === i) return 0;
  return parseInt(val.subarray(i, end).toString('latin1'), 8);
}

/** Whether the header's name (with its ustar prefix) ends in '/' (old tars mark directories so). */
function nameEndsWithSlash(block: Buffer): boolean {
  let nameEnd = block.indexOf(0, 0);
  if (nameEnd < 0 || nameEnd > 100) nameEnd = 100;
  const hasPrefix = block.subarray(257, 263).toString('latin1') === 'ustar\0' && block[345] !== 0;
  if (nameEnd > 0) return block[nameEnd - 1] === 0x2f;
  return hasPrefix; // prefix + '/' + ''
}

/** The `size` record of PAX data, as tar-stream decodes it (undefined when there is none). */
function paxSizeOf(buf: Buffer): string | undefined {
  let size: string | undefined;
  while (buf.length > 0) {
    let i = 0;
    while (i < buf.length && buf[i] !== 32) i++;
    const len = parseInt(buf.subarray(0, i).toString('latin1'), 10);
    if (!len) return size;
    const record = buf.subarray(i + 1, len - 1).toString('utf8');
    const eq = record.indexOf('=');
    if (eq === -1) return size;
    if (record.slice(0, eq) === 'size') size = record.slice(eq + 1);
    buf = buf.subarray(len);
  }
  return size;
}
