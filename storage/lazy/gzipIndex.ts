/**
 * The seekable index of an unmodified gzip layer: where inflating can start
 * again in the middle of the blob, and what comes out.
 *
 * While the blob is read once from start to end, inflate stops at every
 * deflate block boundary (Z_BLOCK); after about 2 MiB of tar (and at least
 * 512 KiB of blob: spanOutBytes, minSpanBytes; at most spanBytes of blob)
 * such a boundary becomes a **checkpoint**: the blob offset of its first
 * whole byte (`in`), how many bits of the byte before belong to it (`bits`),
 * its offset in the uncompressed tar (`out`) and the 32 KiB of output before
 * it (the window later back-references reach into) — none if stored deflate
 * blocks follow for 32 KiB (EMPTY_WINDOW). The uncompressed bytes
 * between one checkpoint and the next are a **span**, with its sha256. The
 * layer's **file table** is the layer index a full pull builds (the same
 * LayerUnpacker), whose file offsets are offsets in the uncompressed tar.
 *
 * So a file's bytes can be served from the spans that cover them: fetch the
 * compressed range from the span's checkpoint to the next, prime the
 * inflater with the split byte's bits and the window, inflate, and check the
 * span's digest (inflateSpan). The method is the one of zlib's
 * examples/zran.c; the format is layerd's (docs/lazy.md says why not SOCI's).
 */
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { setImmediate } from 'node:timers/promises';
import { deflateRawSync, inflateRawSync } from 'node:zlib';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { INFLATE_WINDOW, RawInflater } from '../../common/sys/zlib.js';
import { type Digest, isDigest } from '../digest.js';
import { type LayerIndex } from '../layerIndex.js';
import { DEFAULT_UNPACK_LIMITS, LayerUnpacker, type UnpackLimits } from '../layerUnpack.js';

export const GZIP_INDEX_MEDIA_TYPE = 'application/vnd.layerd.gzip-index.v1+json';
export const GZIP_INDEX_VERSION = 1 as const;
/** Compressed bytes between checkpoints at most, by default (with the default DEFAULT_SPAN_OUT_BYTES, spans end sooner). */
export const DEFAULT_SPAN_BYTES = 4 * 1024 * 1024;
/**
 * Uncompressed bytes a span ends after, by default, once it has
 * DEFAULT_MIN_SPAN_BYTES of compressed data: where data compresses well (a
 * directory of small files) a span is a fraction of that in the blob — a
 * read fetches and inflates less than with spans of fixed compressed size —
 * and its window (deflated) costs the index as little. Spans used to be
 * 4 MiB of the blob: python's start in the lazy benchmark needed 33.7 MB of
 * them, now 15.9 MB (docs/lazy.md).
 */
export const DEFAULT_SPAN_OUT_BYTES = 2 * 1024 * 1024;
export const DEFAULT_MIN_SPAN_BYTES = 512 * 1024;
/**
 * The window of a checkpoint that needs none: the deflate blocks after it are
 * stored (uncompressed, no back-references) for at least 32 KiB of output, so
 * no later back-reference reaches before it — incompressible data, where a
 * window would cost 32 KiB of the index per span. An empty window, deflated:
 * a reader that sets it as the dictionary sets nothing (older layerds too).
 */
export const EMPTY_WINDOW = deflateRawSync(Buffer.alloc(0)).toString('base64');
/** An index document larger than this is refused. */
export const MAX_GZIP_INDEX_BYTES = 512 * 1024 * 1024;

export interface GzipCheckpoint {
  /** Blob offset of the first whole byte after the point. */
  in: number;
  /** Bits (0–7) at the top of the byte before `in` that belong after the point. */
  bits: number;
  /** Offset in the uncompressed tar. */
  out: number;
  /** The output before `out` (at most 32 KiB), deflate-raw compressed, base64. */
  window: string;
}

export interface GzipSpan {
  checkpoint: GzipCheckpoint;
  /** Uncompressed bytes: the tar's bytes [checkpoint.out, checkpoint.out + length). */
  length: number;
  /** Where the compressed bytes needed for the span end in the blob (exclusive). */
  end: number;
  digest: Digest;
}

export interface GzipIndex {
  version: typeof GZIP_INDEX_VERSION;
  /** The gzip layer blob it indexes. */
  layer: { digest: Digest; size: number; diffId: Digest; tarSize: number };
  spans: GzipSpan[];
  /** The file table: the layer index, file offsets in the uncompressed tar. */
  index: LayerIndex;
}

/** Offset of the first byte a fetch for `span` starts at (the split byte, if any). */
export function spanFetchStart(span: GzipSpan): number {
  return span.checkpoint.in - (span.checkpoint.bits > 0 ? 1 : 0);
}

/**
 * Length of the gzip member header at `at` (RFC 1952), or undefined if
 * `buf` ends before it does.
 */
export function gzipHeaderLength(buf: Buffer, at: number, what: string): number | undefined {
  if (buf.length - at < 10) return undefined;
  if (buf[at] !== 0x1f || buf[at + 1] !== 0x8b || buf[at + 2] !== 8) throw new LayerdError(ErrorCodes.EFORMAT, `${what}: not a gzip member at byte ${at}`);
  const flags = buf[at + 3]!;
  let p = at + 10;
  if (flags & 4) {
    if (buf.length < p + 2) return undefined;
    p += 2 + buf.readUInt16LE(p);
  }
  for (const bit of [8, 16]) {
    if (flags & bit) {
      const nul = buf.indexOf(0, p);
      if (nul < 0) return undefined;
      p = nul + 1;
    }
  }
  if (flags & 2) p += 2;
  return p <= buf.length ? p - at : undefined;
}

export interface BuildOptions {
  /** Compressed bytes between checkpoints at most. */
  spanBytes?: number;
  /** A checkpoint also comes after this many uncompressed bytes… */
  spanOutBytes?: number;
  /** …once the span has this many compressed bytes. */
  minSpanBytes?: number;
  limits?: UnpackLimits;
  /** The blob's digest and size, when known: checked. */
  expected?: { digest?: Digest; size?: number; diffId?: Digest };
}

/** Read a gzip layer blob once and index it. */
export async function buildGzipIndex(blob: AsyncIterable<Buffer>, what: string, options: BuildOptions = {}): Promise<GzipIndex> {
  const spanBytes = options.spanBytes ?? DEFAULT_SPAN_BYTES;
  const spanOutBytes = options.spanOutBytes ?? (options.spanBytes === undefined ? DEFAULT_SPAN_OUT_BYTES : Infinity);
  const minSpanBytes = Math.min(spanBytes, options.minSpanBytes ?? DEFAULT_MIN_SPAN_BYTES);
  const blobHash = createHash('sha256');
  const tarHash = createHash('sha256');
  const unpacker = new LayerUnpacker(options.limits ?? DEFAULT_UNPACK_LIMITS);
  unpacker.done.catch(() => undefined);
  const inflater = new RawInflater();
  const checkpoints: GzipCheckpoint[] = [];
  const spans: Omit<GzipSpan, 'end'>[] = [];
  let spanHash = createHash('sha256');
  let window: Buffer = Buffer.alloc(0);
  let pending: Buffer = Buffer.alloc(0);
  /** Blob offset of pending[0]. */
  let base = 0;
  let blobSize = 0;
  let out = 0;
  let state: 'header' | 'deflate' | 'trailer' = 'header';
  let members = 0;
  /** The last byte inflate consumed: at a block boundary, its top `unusedBits` bits begin the next block's header. */
  let lastByte = 0;
  /** The newest checkpoint while it may need no window: only stored blocks followed it so far. */
  let windowless: { checkpoint: GzipCheckpoint; stored: boolean } | undefined;
  const emit = async (bytes: Buffer): Promise<void> => {
    if (bytes.length === 0) return;
    tarHash.update(bytes);
    spanHash.update(bytes);
    out += bytes.length;
    window = bytes.length >= INFLATE_WINDOW ? bytes.subarray(bytes.length - INFLATE_WINDOW) : Buffer.concat([window, bytes]).subarray(-INFLATE_WINDOW);
    if (!unpacker.writable.write(bytes)) await Promise.race([once(unpacker.writable, 'drain'), unpacker.done]);
  };
  const checkpoint = (at: number, bits: number): void => {
    const previous = checkpoints[checkpoints.length - 1];
    if (previous) spans.push({ checkpoint: previous, length: out - previous.out, digest: `sha256:${spanHash.digest('hex')}` });
    spanHash = createHash('sha256');
    checkpoints.push({ in: at, bits, out, window: out === 0 ? EMPTY_WINDOW : deflateRawSync(window).toString('base64') });
  };
  try {
    const drain = async (): Promise<void> => {
      for (;;) {
        if (state === 'header') {
          if (pending.length === 0) return;
          const length = gzipHeaderLength(pending, 0, what);
          if (length === undefined) return;
          pending = pending.subarray(length);
          base += length;
          if (members++ > 0) inflater.reset();
          state = 'deflate';
          if (checkpoints.length === 0) checkpoint(base, 0);
        } else if (state === 'deflate') {
          if (pending.length === 0) return;
          const step = inflater.step(pending, true);
          if (step.consumed > 0) lastByte = pending[step.consumed - 1]!;
          pending = pending.subarray(step.consumed);
          base += step.consumed;
          await emit(step.output);
          if (step.streamEnd) {
            // The next member starts afresh (inflateSpan resets there): nothing after reaches back.
            if (windowless?.stored) windowless.checkpoint.window = EMPTY_WINDOW;
            windowless = undefined;
            state = 'trailer';
            continue;
          }
          if (step.atBlockBoundary) {
            const nextStored = storedBlockNext(lastByte, step.unusedBits, pending);
            if (windowless !== undefined) {
              if (windowless.stored && out - windowless.checkpoint.out >= INFLATE_WINDOW) windowless.checkpoint.window = EMPTY_WINDOW;
              if (!windowless.stored || out - windowless.checkpoint.out >= INFLATE_WINDOW) windowless = undefined;
              else windowless.stored = nextStored;
            }
            const last = checkpoints[checkpoints.length - 1]!;
            const compressed = base - last.in;
            if (compressed >= spanBytes || (compressed >= minSpanBytes && out - last.out >= spanOutBytes)) {
              checkpoint(base, step.unusedBits);
              windowless = { checkpoint: checkpoints[checkpoints.length - 1]!, stored: nextStored };
            }
          }
          if (step.consumed === 0 && step.output.length === 0) return; // needs more input
        } else {
          if (pending.length < 8) return;
          pending = pending.subarray(8);
          base += 8;
          state = 'header';
        }
      }
    };
    for await (const chunk of blob) {
      blobHash.update(chunk);
      blobSize += chunk.length;
      pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
      await drain();
    }
    if (state !== 'header' || pending.length > 0 || members === 0) throw new LayerdError(ErrorCodes.EFORMAT, `${what}: the gzip stream ends early or has trailing bytes`);
    unpacker.writable.end();
    const { index } = await unpacker.done;
    const last = checkpoints[checkpoints.length - 1]!;
    spans.push({ checkpoint: last, length: out - last.out, digest: `sha256:${spanHash.digest('hex')}` });
    const digest: Digest = `sha256:${blobHash.digest('hex')}`;
    const diffId: Digest = `sha256:${tarHash.digest('hex')}`;
    const expected = options.expected ?? {};
    if ((expected.digest && expected.digest !== digest) || (expected.size !== undefined && expected.size !== blobSize)) {
      throw new LayerdError(ErrorCodes.EDIGEST, `${what}: the blob is ${digest} (${blobSize} bytes), not ${expected.digest ?? '?'} (${expected.size ?? '?'} bytes)`, { digest, expected: expected.digest });
    }
    if (expected.diffId && expected.diffId !== diffId) {
      throw new LayerdError(ErrorCodes.EDIGEST, `${what}: the uncompressed layer is ${diffId}, the config says ${expected.diffId}`, { digest: diffId, expected: expected.diffId });
    }
    return {
      version: GZIP_INDEX_VERSION,
      layer: { digest, size: blobSize, diffId, tarSize: out },
      spans: spans.map((s, i) => ({ ...s, end: i + 1 < spans.length ? spans[i + 1]!.checkpoint.in : blobSize })),
      index: { ...index, id: diffId },
    };
  } finally {
    inflater.end();
    if (!unpacker.writable.writableEnded) unpacker.writable.destroy();
  }
}

/**
 * Whether the deflate block that starts at a block boundary is a stored one
 * (RFC 1951: BFINAL, then BTYPE 00), from the bits of `lastByte` that belong
 * to it (the top `bits`) and the bytes after; false when they do not say.
 */
function storedBlockNext(lastByte: number, bits: number, next: Buffer): boolean {
  let header = bits > 0 ? lastByte >> (8 - bits) : 0;
  if (bits < 3) {
    if (next.length === 0) return false;
    header |= next[0]! << bits;
  }
  return ((header >> 1) & 3) === 0;
}

/** What inflating a span needs of its checkpoint. */
export type ResumePoint = Pick<GzipCheckpoint, 'bits' | 'window'>;

/**
 * The first `length` bytes inflated from `compressed` (the blob's bytes from
 * spanFetchStart(span) to span.end) resuming at `point`. Not verified here:
 * the caller hashes. Yields to the event loop every 2 MiB of output: a mount
 * host inflating a span keeps answering other requests meanwhile.
 */
export async function inflateSpan(point: ResumePoint, length: number, compressed: Buffer, what: string): Promise<Buffer> {
  const { bits } = point;
  const inflater = new RawInflater();
  try {
    if (bits > 0) {
      if (compressed.length === 0) throw new LayerdError(ErrorCodes.EFORMAT, `${what}: no bytes`);
      inflater.prime(bits, compressed[0]! >> (8 - bits));
    }
    const window = inflateRawSync(Buffer.from(point.window, 'base64'), { maxOutputLength: INFLATE_WINDOW });
    if (window.length > 0) inflater.setDictionary(window);
    let input: Buffer = compressed.subarray(bits > 0 ? 1 : 0);
    const parts: Buffer[] = [];
    let have = 0;
    let steps = 0;
    while (have < length) {
      const step = inflater.step(input, false);
      input = input.subarray(step.consumed);
      parts.push(step.output);
      have += step.output.length;
      if (++steps % 8 === 0) await setImmediate();
      if (step.streamEnd) {
        // The next gzip member, if the span goes on into one.
        const header = input.length >= 8 ? gzipHeaderLength(input, 8, what) : undefined;
        if (header === undefined) break;
        input = input.subarray(8 + header);
        inflater.reset();
      } else if (step.consumed === 0 && step.output.length === 0) break;
    }
    if (have < length) throw new LayerdError(ErrorCodes.EFORMAT, `${what}: the span inflates to ${have} bytes, not ${length}`);
    return Buffer.concat(parts, have).subarray(0, length);
  } finally {
    inflater.end();
  }
}

/** Parse and check an index document (it comes from a registry: untrusted until its spans verify). */
export function parseGzipIndex(bytes: Buffer, what: string): GzipIndex {
  let doc: unknown;
  try {
    doc = JSON.parse(bytes.toString('utf8'));
  } catch (err) {
    throw new LayerdError(ErrorCodes.EBADJSON, `${what}: not JSON: ${(err as Error).message}`, {}, { cause: err });
  }
  const bad = (why: string): LayerdError => new LayerdError(ErrorCodes.EFORMAT, `${what}: not a version-${GZIP_INDEX_VERSION} gzip index (${why})`);
  const index = doc as Partial<GzipIndex>;
  if (index?.version !== GZIP_INDEX_VERSION) throw bad('version');
  const layer = index.layer;
  if (!layer || !isDigest(layer.digest) || !isDigest(layer.diffId) || !Number.isSafeInteger(layer.size) || !Number.isSafeInteger(layer.tarSize)) throw bad('layer');
  if (!Array.isArray(index.spans) || index.spans.length === 0) throw bad('spans');
  let out = 0;
  for (const s of index.spans) {
    const cp = s?.checkpoint;
    if (!cp || !isDigest(s.digest) || typeof cp.window !== 'string' || cp.out !== out || !Number.isSafeInteger(s.length) || s.length < 0
      || !Number.isInteger(cp.bits) || cp.bits < 0 || cp.bits > 7 || !Number.isSafeInteger(cp.in) || cp.in < 1 || s.end > layer.size || s.end < cp.in) throw bad(`span at ${out}`);
    out += s.length;
  }
  if (out !== layer.tarSize) throw bad('spans do not cover the tar');
  const table = index.index;
  if (!table || table.version !== 1 || !Array.isArray(table.entries) || !Array.isArray(table.whiteouts) || !Array.isArray(table.opaques)) throw bad('file table');
  for (const e of table.entries) {
    if (e.kind === 'file' && e.size > 0 && (e.offset === undefined || e.offset < 0 || e.offset + e.size > layer.tarSize)) throw bad(`file ${e.path} outside the tar`);
  }
  return { ...(index as GzipIndex), index: { ...table, id: layer.diffId } };
}
