/**
 * A layer kept as its *tar skeleton* plus content-addressed objects, instead
 * of its whole uncompressed tar (issue 17, "one copy of each file"; the idea
 * of containers/storage's tar-split):
 *
 *   <layer dir>/skeleton   gzip of a record stream: every byte of the tar that
 *                          is not a regular file's content (headers, PAX and
 *                          GNU long-name records, padding, end blocks, any
 *                          trailing bytes), in order, and a reference per file
 *   <layer dir>/inline     the bytes of files smaller than INLINE_MAX_SIZE,
 *                          concatenated in tar order (uncompressed, so a mount
 *                          reads them with pread at the offset the index records)
 *   objects/sha256/xx/hex  every other file's bytes, once per store
 *
 * Records (big-endian):
 *   'R' u32 length, bytes        tar bytes kept as they are
 *   'O' u64 size, 32-byte sha256 a file's bytes: the object of that digest
 *   'I' u64 size                 a file's bytes: the next `size` bytes of `inline`
 *
 * `layerTarStream` splices them back into exactly the tar the layer was
 * imported from: its sha256 is the diffID (fsck re-derives it, push
 * recompresses it when the compressed blob is gone). Writing a skeleton
 * happens at import, in the same pass as the digests (storage/tarSplit.ts).
 */
import { closeSync, constants as fsConstants, createReadStream, openSync, read } from 'node:fs';
import { Readable } from 'node:stream';
import { createGunzip } from 'node:zlib';
import { ErrorCodes, LayerdError } from '../common/errors.js';

/** The skeleton's file name in a layer directory. */
export const SKELETON_FILE = 'skeleton';
/** Small files' bytes, concatenated, in a layer directory (storage/layerIndex.ts skeletonContent reads it by the same name). */
export const INLINE_FILE = 'inline';
/**
 * Files below this size stay in the layer's `inline` file instead of
 * becoming objects: an object costs an inode and a whole filesystem block
 * (4 KiB on ext4) however small it is, and a commit per file to make;
 * measured in docs/storage.md ("How much one copy saves").
 */
export const INLINE_MAX_SIZE = 4096;

export const RECORD_RAW = 0x52; // 'R'
export const RECORD_OBJECT = 0x4f; // 'O'
export const RECORD_INLINE = 0x49; // 'I'

/** Where the parts of a skeleton layer are and how to open an object. */
export interface SkeletonParts {
  skeletonPath: string;
  inlinePath: string;
  /** A readable descriptor of the object of `digest` (the caller closes it); throws when there is none. */
  openObject: (digest: string) => number;
}

/** One record of a skeleton, decoded. */
export type SkeletonRecord =
  | { kind: 'raw'; bytes: Buffer }
  | { kind: 'object'; size: number; digest: string }
  | { kind: 'inline'; size: number };

/** Encodes records into the skeleton's (uncompressed) byte stream. */
export function encodeRaw(bytes: Buffer): Buffer {
  const head = Buffer.allocUnsafe(5);
  head[0] = RECORD_RAW;
  head.writeUInt32BE(bytes.length, 1);
  return Buffer.concat([head, bytes]);
}

export function encodeObject(size: number, digest: string): Buffer {
  const out = Buffer.allocUnsafe(41);
  out[0] = RECORD_OBJECT;
  out.writeBigUInt64BE(BigInt(size), 1);
  Buffer.from(digest.slice('sha256:'.length), 'hex').copy(out, 9);
  return out;
}

export function encodeInline(size: number): Buffer {
  const out = Buffer.allocUnsafe(9);
  out[0] = RECORD_INLINE;
  out.writeBigUInt64BE(BigInt(size), 1);
  return out;
}

/** Decodes the skeleton's record stream (after gunzip) as chunks arrive. */
export class SkeletonDecoder {
  private pending: Buffer = Buffer.alloc(0);

  /** The complete records in `chunk` and what came before it; keeps a partial record for the next call. */
  push(chunk: Buffer): SkeletonRecord[] {
    let buf = this.pending.length > 0 ? Buffer.concat([this.pending, chunk]) : chunk;
    const out: SkeletonRecord[] = [];
    for (;;) {
      if (buf.length < 1) break;
      const tag = buf[0];
      if (tag === RECORD_RAW) {
        if (buf.length < 5) break;
        const len = buf.readUInt32BE(1);
        if (buf.length < 5 + len) break;
        out.push({ kind: 'raw', bytes: buf.subarray(5, 5 + len) });
        buf = buf.subarray(5 + len);
      } else if (tag === RECORD_OBJECT) {
        if (buf.length < 41) break;
        out.push({ kind: 'object', size: safeSize(buf.readBigUInt64BE(1)), digest: `sha256:${buf.subarray(9, 41).toString('hex')}` });
        buf = buf.subarray(41);
      } else if (tag === RECORD_INLINE) {
        if (buf.length < 9) break;
        out.push({ kind: 'inline', size: safeSize(buf.readBigUInt64BE(1)) });
        buf = buf.subarray(9);
      } else {
        throw corrupt(`unknown record type ${String(tag)}`);
      }
    }
    // Copy what is left: `chunk` may be reused by the stream that gave it.
    this.pending = Buffer.from(buf);
    return out;
  }

  /** Throws if the stream ended inside a record. */
  end(): void {
    if (this.pending.length > 0) throw corrupt(`the skeleton ends inside a record (${this.pending.length} bytes left)`);
  }
}

const CHUNK = 1024 * 1024;

/**
 * The layer's exact tar bytes, streamed: the skeleton's kept bytes with each
 * file's bytes read from its object or from `inline` in between. Fails
 * (ECORRUPT) when an object or `inline` is shorter than the skeleton says;
 * whether the bytes are right is the caller's to check (sha256 = diffID).
 */
export function layerTarStream(parts: SkeletonParts): Readable {
  return Readable.from(generateTar(parts), { objectMode: false, highWaterMark: CHUNK });
}

async function* generateTar(parts: SkeletonParts): AsyncGenerator<Buffer> {
  const decoder = new SkeletonDecoder();
  let inlineFd: number | undefined;
  let inlinePos = 0;
  try {
    for await (const chunk of createReadStream(parts.skeletonPath, { highWaterMark: CHUNK }).pipe(createGunzip())) {
      for (const record of decoder.push(chunk as Buffer)) {
        if (record.kind === 'raw') {
          if (record.bytes.length > 0) yield Buffer.from(record.bytes);
        } else if (record.kind === 'inline') {
          inlineFd ??= openReadOnly(parts.inlinePath);
          yield* readRange(inlineFd, inlinePos, record.size, 'inline');
          inlinePos += record.size;
        } else {
          const fd = parts.openObject(record.digest);
          try {
            yield* readRange(fd, 0, record.size, `object ${record.digest}`);
          } finally {
            closeSync(fd);
          }
        }
      }
    }
    decoder.end();
  } finally {
    if (inlineFd !== undefined) closeSync(inlineFd);
  }
}

async function* readRange(fd: number, offset: number, size: number, what: string): AsyncGenerator<Buffer> {
  let done = 0;
  while (done < size) {
    const buffer = Buffer.allocUnsafe(Math.min(CHUNK, size - done));
    const n = await new Promise<number>((resolve, reject) => read(fd, buffer, 0, buffer.length, offset + done, (err, got) => (err ? reject(err) : resolve(got))));
    if (n === 0) throw corrupt(`${what} ends after ${done} of the ${size} bytes the skeleton names`);
    done += n;
    yield n === buffer.length ? buffer : buffer.subarray(0, n);
  }
}

function openReadOnly(path: string): number {
  return openSync(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
}

function safeSize(n: bigint): number {
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`a size of ${n} bytes`);
  return Number(n);
}

function corrupt(message: string): LayerdError {
  return new LayerdError(ErrorCodes.ECORRUPT, `layer skeleton: ${message}`);
}
