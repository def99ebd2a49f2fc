/**
 * Ingesting one layer blob in one pass over its bytes:
 *
 *   source → sha256 + size → the blob file in the ingest area
 *          ↘ sniff + decompress → sha256 (diffID) → `layer.tar` + the layer
 *            index, in the ingest area
 *
 * The distribution digest and size are checked when the blob has been read
 * to its end, and the diffID after that; only then is the result handed to
 * the caller, who renames it into the store (Store.commit). So bytes that do
 * not match the manifest are decompressed and parsed, but only into this
 * ingest directory, and nothing unverified is ever visible. When the tar or
 * the compression is broken, the rest of the blob is still read and hashed:
 * a blob that does not match its digest is reported as EDIGEST, never as
 * the parse error its wrong bytes caused (docs/storage.md).
 */
import { createReadStream } from 'node:fs';
import { link, mkdir, open, writeFile } from 'node:fs/promises';
import { type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { type Readable, Transform, Writable, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type Compression, createDecompressor, sniffCompression } from './compression.js';
import { type Digest, DigestingStream, verifyDigest } from './digest.js';
import { type DiskGuard, noSpaceError } from './diskSpace.js';
import { type Downstream, IngestFeed } from './ingestFeed.js';
import { LAYER_TAR, type LayerIndex } from './layerIndex.js';
import { DEFAULT_UNPACK_LIMITS, LayerUnpacker, type UnpackLimits } from './layerUnpack.js';
import { type ObjectStaging, type SplitResult, TarSplitter } from './tarSplit.js';

export interface IngestLimits extends UnpackLimits {
  /** Largest uncompressed layer tar (decompression bombs stop here). */
  maxLayerBytes: number;
  /** Largest compressed blob. */
  maxBlobBytes: number;
  /**
   * Most uncompressed bytes per compressed byte read, once past
   * `expansionSlackBytes` (20 GiB of zeros fit in a 90 MB gzip; real layers
   * stay far below 100:1).
   */
  maxExpansionRatio?: number;
  expansionSlackBytes?: number;
}

export const DEFAULT_INGEST_LIMITS: IngestLimits = {
  ...DEFAULT_UNPACK_LIMITS,
  maxLayerBytes: 256 * 1024 ** 3,
  maxBlobBytes: 256 * 1024 ** 3,
  maxExpansionRatio: 100,
  expansionSlackBytes: 1024 ** 3,
};

export interface LayerExpectation {
  /** Distribution digest and size from the manifest, when known. */
  digest?: Digest | undefined;
  size?: number | undefined;
  /** diffID from the image config, when known. */
  diffId?: Digest | undefined;
}

export interface IngestedLayer {
  digest: Digest;
  size: number;
  diffId: Digest;
  diffSize: number;
  compression: Compression;
  /** The verified blob in the ingest area, when the blob was ingested. */
  blobPath?: string;
  /** The verified unpacked layer directory in the ingest area, when unpacked. */
  layerDir?: string;
  index?: LayerIndex;
  fileBytes: number;
  /** A layer kept as skeleton + objects: the objects its skeleton names (all present or staged). */
  objects?: Set<string>;
}

export interface IngestOptions {
  /** A fresh private directory in the store's ingest area. */
  workDir: string;
  /**
   * Where the blob already is, verified (the store's copy). Without it the
   * blob is read from the source and kept in the ingest area.
   */
  storedBlob?: string;
  unpack: boolean;
  limits?: IngestLimits;
  /** Called with the number of compressed bytes read so far. */
  onProgress?: (bytes: number) => void;
  /**
   * Start writing each file to disk as soon as it is complete (for a store
   * that syncs before it commits: that sync then finds the pages written).
   */
  flushEarly?: boolean;
  /** Keeps the store's disk reserve free while the ingest writes. */
  disk?: DiskGuard;
  /**
   * Keep the layer as a tar skeleton + objects (storage/tarSkeleton.ts)
   * instead of `layer.tar`, staging new objects here. An uncompressed blob
   * the store keeps stays the layer's `layer.tar` (a hard link: one copy
   * already) unless `splitPlain`: the blob is not kept (a commit's tar).
   */
  objects?: ObjectStaging;
  splitPlain?: boolean;
}

export async function ingestLayer(source: () => Promise<Readable>, expected: LayerExpectation, options: IngestOptions): Promise<IngestedLayer> {
  const limits = options.limits ?? DEFAULT_INGEST_LIMITS;
  const stored = options.storedBlob;
  const blobPath = stored ?? join(options.workDir, 'blob');
  const layerDir = options.unpack ? join(options.workDir, 'layer') : undefined;
  if (layerDir) await mkdir(layerDir);

  // The second pipeline: the tar inside, hashed as the diffID and indexed.
  // The layer keeps the uncompressed tar as `layer.tar`: for an uncompressed
  // blob that is the blob itself (a hard link once it is complete, no copy).
  const diffHasher = new DigestingStream(limits.maxLayerBytes, 'uncompressed layer');
  let compression: Compression = 'none';
  let splitter: TarSplitter | undefined;
  let unpacker: LayerUnpacker | undefined;
  const openDownstream = (head: Buffer): Downstream => {
    compression = sniffCompression(head);
    const split = layerDir !== undefined && options.objects !== undefined && (compression !== 'none' || options.splitPlain === true);
    // A split layer's files are all hashed by the splitter: the indexer need not hash the big ones too.
    unpacker = layerDir ? new LayerUnpacker(limits, { digests: !split }) : undefined;
    const stages: unknown[] = [];
    if (compression !== 'none') stages.push(createDecompressor(compression), expansionBound(limits, () => compressedBytes));
    stages.push(diffHasher);
    if (split) stages.push(splitter = new TarSplitter(layerDir, options.objects!, options.disk));
    else if (layerDir && compression !== 'none') stages.push(new FileTee(join(layerDir, LAYER_TAR), options.flushEarly === true, options.disk));
    stages.push(unpacker ? unpacker.writable : discard());
    const done = (pipeline as (...s: unknown[]) => Promise<void>)(...stages).then(async () => { if (unpacker) await unpacker.done; });
    return { head: stages[0] as Writable, done };
  };

  // The first pipeline: the blob's bytes, hashed and kept (unless the store
  // has them already, verified), feeding the second as they arrive.
  const hasher = stored ? undefined : expected.size !== undefined
    ? new DigestingStream(expected.size, `layer blob ${expected.digest ?? ''}`, ErrorCodes.EDIGEST)
    : new DigestingStream(limits.maxBlobBytes, 'layer blob');
  const feed = new IngestFeed(openDownstream, hasher !== undefined && expected.digest !== undefined);
  const stages: unknown[] = [stored ? createReadStream(stored, { highWaterMark: 1024 * 1024 }) : await source()];
  if (hasher) stages.push(hasher);
  let compressedBytes = 0;
  stages.push(progressStream((bytes) => { compressedBytes = bytes; if (!stored) options.onProgress?.(bytes); }));
  if (!stored) stages.push(new FileTee(blobPath, options.flushEarly === true, options.disk));
  stages.push(feed);
  const [read, parsed] = await Promise.allSettled([(pipeline as (...s: unknown[]) => Promise<void>)(...stages), feed.done]);

  // The blob's own digest decides first: bytes that are not what the
  // manifest names fail as EDIGEST, whatever they did to the parser.
  if (read.status === 'rejected') throw mapStreamError(read.reason, expected);
  let blob: { digest: Digest; size: number } | undefined;
  if (hasher) {
    blob = hasher.result();
    if (expected.digest) verifyDigest('layer blob', { digest: expected.digest, size: expected.size }, blob);
  }
  if (parsed.status === 'rejected') throw mapStreamError(parsed.reason, expected);
  const diff = diffHasher.result();
  // A stored uncompressed blob is its own tar: its digest is the diffID.
  blob ??= expected.digest ? { digest: expected.digest, size: expected.size ?? 0 } : { digest: diff.digest, size: diff.size };
  if (expected.diffId) verifyDigest(`layer ${blob.digest} uncompressed`, { digest: expected.diffId }, diff, { blob: blob.digest });
  if (!endsWithZeroBlock(diffHasher.tail())) {
    throw new LayerdError(ErrorCodes.EBADTAR, `layer ${blob.digest}: the tar archive has no end-of-archive marker (truncated?)`, { digest: blob.digest });
  }

  const result: IngestedLayer = {
    digest: blob.digest, size: blob.size, diffId: diff.digest, diffSize: diff.size, compression, fileBytes: 0,
  };
  if (!stored) result.blobPath = blobPath;
  const indexer = unpacker as LayerUnpacker | undefined;
  if (indexer && layerDir) {
    if (compression === 'none' && splitter === undefined) await link(blobPath, join(layerDir, LAYER_TAR));
    const { index, fileBytes } = await indexer.done;
    result.index = { ...index, id: diff.digest };
    if (splitter !== undefined) result.objects = placeFiles(result.index, splitter.result, blob.digest);
    result.fileBytes = fileBytes;
    result.layerDir = layerDir;
    await writeFile(join(layerDir, 'index.json'), JSON.stringify(result.index), { mode: 0o600 });
  }
  return result;
}

/**
 * Point a split layer's index at where its files' bytes now are: each
 * file's object digest, or its offset in the layer's `inline` file. The
 * indexer and the splitter each walked the tar; a file the splitter did
 * not find where the indexer did means they read it differently, and such
 * a tar is refused rather than kept in a form that would not read back.
 */
function placeFiles(index: LayerIndex, split: SplitResult, blob: Digest): Set<string> {
  const named = new Set<string>();
  for (const entry of index.entries) {
    if (entry.kind !== 'file' || entry.size === 0 || entry.offset === undefined) continue;
    const digest = split.objects.get(entry.offset);
    const inline = split.inline.get(entry.offset);
    if (digest !== undefined) {
      entry.digest = digest;
      delete entry.offset;
      named.add(digest);
    } else if (inline !== undefined) {
      entry.offset = inline;
      delete entry.digest;
    } else {
      throw new LayerdError(ErrorCodes.EBADTAR, `layer ${blob}: the bytes of /${entry.path} are not where the archive's headers put them`, { digest: blob, path: entry.path });
    }
  }
  index.storage = 'skeleton';
  return named;
}

/**
 * Writes the bytes into a new file and passes them on. No fsync waited for
 * here: the store syncs the whole filesystem once before an import becomes
 * visible (Store.commit), which is one flush instead of one per layer. With
 * `flushEarly`, an fdatasync of the complete file is started in the
 * background, so that flush runs while the rest of the import does (a
 * durable import of debian-multi: ~100 ms less, docs/performance.md).
 */
class FileTee extends Transform {
  private handle: FileHandle | undefined;

  constructor(private readonly path: string, private readonly flushEarly: boolean, private readonly disk: DiskGuard | undefined) {
    super({ highWaterMark: 1024 * 1024 });
  }

  override _construct(callback: (error?: Error | null) => void): void {
    open(this.path, 'wx', 0o600).then((h) => { this.handle = h; callback(); }, callback);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, callback: TransformCallback): void {
    // Hand the bytes on at once (the index is built while the write runs);
    // the next chunk waits for this write, so writes stay in order.
    this.push(chunk);
    const write = (): Promise<unknown> => this.handle!.write(chunk);
    (this.disk ? this.disk.wrote(chunk.length).then(write) : write()).then(() => callback(), callback);
  }

  override _flush(callback: TransformCallback): void {
    const h = this.handle!;
    this.handle = undefined;
    if (this.flushEarly) {
      // The file is complete: it may be renamed or removed while this runs. Errors are the store sync's to report.
      void h.datasync().catch(() => undefined).finally(() => h.close().catch(() => undefined));
      callback();
      return;
    }
    h.close().then(() => callback(), callback);
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    const h = this.handle;
    this.handle = undefined;
    if (!h) { callback(error); return; }
    h.close().then(() => callback(error), () => callback(error));
  }
}

function progressStream(onProgress: (bytes: number) => void): Transform {
  let bytes = 0;
  return new Transform({
    transform(chunk: Buffer, _enc, callback) {
      bytes += chunk.length;
      onProgress(bytes);
      callback(null, chunk);
    },
  });
}

/** Refuses (ELIMIT) a stream that decompresses to far more than it was (a decompression bomb). */
function expansionBound(limits: IngestLimits, compressedBytes: () => number): Transform {
  const ratio = limits.maxExpansionRatio ?? DEFAULT_INGEST_LIMITS.maxExpansionRatio!;
  const slack = limits.expansionSlackBytes ?? DEFAULT_INGEST_LIMITS.expansionSlackBytes!;
  let bytes = 0;
  return new Transform({
    transform(chunk: Buffer, _enc, callback) {
      bytes += chunk.length;
      const compressed = compressedBytes();
      if (bytes > slack && bytes > ratio * compressed) {
        callback(new LayerdError(
          ErrorCodes.ELIMIT,
          `layer expands to over ${bytes} bytes from ${compressed} compressed bytes, more than the limit (maxExpansionRatio) of ${ratio}:1`,
          { limit: 'maxExpansionRatio', ratio, bytes, compressedBytes: compressed },
        ));
        return;
      }
      callback(null, chunk);
    },
  });
}

function discard(): Writable {
  return new Writable({ write(_chunk, _enc, callback) { callback(); } });
}

function endsWithZeroBlock(tail: Buffer): boolean {
  if (tail.length < 512) return false;
  const last = tail.subarray(tail.length - 512);
  for (const b of last) if (b !== 0) return false;
  return true;
}

function mapStreamError(err: unknown, expected: LayerExpectation): LayerdError {
  if (err instanceof LayerdError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: string }).code ?? '';
  const context = expected.digest ? { digest: expected.digest } : {};
  const full = noSpaceError(err, `layer ${expected.digest ?? ''}`.trim(), context);
  if (full) return full;
  // tar-stream's bound on one PAX/long-name header (a header bomb).
  if (/exceeds max size/i.test(message)) {
    return new LayerdError(ErrorCodes.ELIMIT, `layer${expected.digest ? ` ${expected.digest}` : ''}: a tar header is over the size limit: ${message}`, { ...context, limit: 'tar header size' }, { cause: err });
  }
  if (code.startsWith('Z_') || /zstd|incorrect header|invalid|unexpected end|corrupt/i.test(message)) {
    return new LayerdError(ErrorCodes.EBADTAR, `layer ${expected.digest ?? ''} is corrupt: ${message}`.replace('  ', ' '), context, { cause: err });
  }
  return new LayerdError(ErrorCodes.EIO, `reading layer ${expected.digest ?? ''} failed: ${message}`, context, { cause: err });
}
