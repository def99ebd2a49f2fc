/**
 * A lazily pulled unmodified gzip layer, staged from its gzip index
 * (gzipIndex.ts, found by gzipArtifact.ts): the same lazy directory as an
 * eStargz layer (lazyLayer.ts), where
 *
 * - `index.json` is the index's file table: file offsets are offsets in the
 *   uncompressed tar;
 * - `content` is the uncompressed tar itself, sparse, filled span by span;
 * - `lazy.json` has format `gzip-index` and one LazyFile — the whole tar —
 *   whose chunks are the spans: the compressed range from a span's
 *   checkpoint to the next, the checkpoint (split bits, window), the span's
 *   length and digest.
 *
 * Serving, verification, EIO bounds and the background fill are those of
 * eStargz layers; only inflating a chunk differs (from a checkpoint).
 */
import { mkdir, open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest } from '../digest.js';
import { type LayerIndex } from '../layerIndex.js';
import { type Transaction } from '../importer.js';
import { type Descriptor } from '../oci.js';
import { type RegistrySource } from '../registry/source.js';
import { type Chunk, type LazyFile } from './estargz.js';
import { type GzipIndex, spanFetchStart } from './gzipIndex.js';
import { LAZY_CONTENT, LAZY_FORMAT_VERSION, LAZY_JSON, type LazyLayerInfo } from './lazyLayer.js';

export const GZIP_INDEX_FORMAT = 'gzip-index' as const;

/** The chunk table of a gzip-index layer: one file (the tar), one chunk per non-empty span. */
export function gzipLazyFiles(index: GzipIndex): LazyFile[] {
  const chunks: Chunk[] = index.spans.filter((s) => s.length > 0).map((s) => ({
    fileOffset: s.checkpoint.out, length: s.length, start: spanFetchStart(s), end: s.end, digest: s.digest,
    checkpoint: { bits: s.checkpoint.bits, window: s.checkpoint.window },
  }));
  return [{ offset: 0, size: index.layer.tarSize, chunks }];
}

/** Index, description and an empty (sparse) content file, in a directory of the ingest area. */
export async function stageGzipLazyLayer(
  tx: Transaction, source: RegistrySource, layer: Descriptor, diffId: Digest, found: { index: GzipIndex; blob: Descriptor }, registriesConfig: string | undefined,
): Promise<void> {
  const { index } = found;
  const dir = join(tx.nextDir(), 'lazy');
  await mkdir(dir, { recursive: true });
  const info: LazyLayerInfo = {
    version: LAZY_FORMAT_VERSION, format: GZIP_INDEX_FORMAT, diffId, registry: source.ref.registry, repository: source.ref.repository,
    blobDigest: layer.digest, blobSize: layer.size, mediaType: layer.mediaType, tocDigest: found.blob.digest,
    ...(registriesConfig !== undefined ? { registriesConfig } : {}), contentSize: index.layer.tarSize, files: gzipLazyFiles(index),
  };
  await writeFile(join(dir, 'index.json'), JSON.stringify({ ...index.index, id: diffId }), { mode: 0o600 });
  await writeFile(join(dir, LAZY_JSON), JSON.stringify(info), { mode: 0o600 });
  const content = await open(join(dir, LAZY_CONTENT), 'wx', 0o600);
  try {
    await content.truncate(index.layer.tarSize);
  } finally {
    await content.close();
  }
  tx.staged.push({ kind: 'lazy', diffId, path: dir });
  tx.lazyLayers.set(diffId, {
    row: { blob_digest: layer.digest, media_type: layer.mediaType, blob_size: layer.size, format: GZIP_INDEX_FORMAT, state: 'lazy', filled_bytes: 0, error: null },
    fileBytes: index.index.entries.reduce((n, e) => n + (e.kind === 'file' && e.link === undefined ? e.size : 0), 0),
    entries: index.index.entries.length,
  });
}

/**
 * The file table a gzip-index layer was served with must be the one its
 * verified tar gives: it came from the registry unverified (docs/lazy.md,
 * "Trust"). Called by the fill before the layer is committed; a difference
 * is EDIGEST, which marks the layer broken.
 */
export async function checkGzipFileTable(lazyDir: string, verified: LayerIndex): Promise<void> {
  const served = JSON.parse(await readFile(join(lazyDir, 'index.json'), 'utf8')) as LayerIndex;
  // File digests (objects' names) are not compared: the verified index computes its own, and a
  // table published by a layerd that recorded none (or fewer) describes the same layer.
  if (JSON.stringify(withoutDigests({ ...served, id: verified.id })) !== JSON.stringify(withoutDigests(verified))) {
    throw new LayerdError(ErrorCodes.EDIGEST, `layer ${verified.id}: the file table of its gzip index is not the one the verified layer gives (a forged or broken index)`, { diffId: verified.id });
  }
}

function withoutDigests(index: LayerIndex): LayerIndex {
  return { ...index, entries: index.entries.map(({ digest: _digest, ...entry }) => entry) };
}
