/**
 * Importing images into the store from any ImageSource: choose the
 * platform from an index, verify the manifest, the config and every layer
 * (distribution digest AND diffID), unpack what the store lacks, and commit
 * it all at once. A failed import leaves no trace.
 */
import { createReadStream } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type Digest, digestOf, verifyDigest } from './digest.js';
import { DiskGuard, noSpaceError } from './diskSpace.js';
import { type IngestLimits, type IngestedLayer, ingestLayer } from './layerIngest.js';
import { layerMediaType } from './compression.js';
import {
  type Descriptor, type ImageConfig, type ImageManifest, LAYER_MEDIA_TYPES,
  MAX_DOCUMENT_BYTES, MediaTypes, parseImageConfig, parseManifestOrIndex,
} from './oci.js';
import { type PlatformSpec, formatPlatform, hostPlatform, normalizePlatform, selectPlatform } from './platform.js';
import { formatRef, isValidName } from './references.js';
import { type ImageSource } from './sources/source.js';
import { type LazyLayerRow } from './metadata.js';
import { type StagedItem, type Store } from './store.js';
import { type ObjectStaging } from './tarSplit.js';

export type ImportProgress =
  | { type: 'layer-start'; digest: Digest; size: number; index: number; count: number }
  | { type: 'layer-progress'; digest: Digest; bytes: number; size: number }
  | { type: 'layer-done'; digest: Digest; diffId: Digest }
  | { type: 'layer-exists'; digest: Digest; diffId: Digest };

export interface ImportOptions {
  /** Platform to pick from indexes; the host's by default. */
  platform?: PlatformSpec;
  onProgress?: (event: ImportProgress) => void;
  limits?: IngestLimits;
  /**
   * How many layers to fetch and unpack at once (default 1). Worth raising
   * for sources where fetching is the slow part (registries).
   */
  concurrency?: number;
}

export interface ImportedImage {
  id: Digest;
  refs: string[];
  platform: string;
  layers: number;
}

/** Everything one image import has verified and staged, not yet committed. */
export interface StagedImage {
  manifestDigest: Digest;
  manifestMediaType: string;
  configDigest: Digest;
  config: ImageConfig;
  indexDigest: Digest | null;
  layers: { diffId: Digest; blobDigest: Digest | null; mediaType: string; size: number }[];
  refs: { name: string; tag: string }[];
}

/** What one import (or commit) stages; all of it becomes visible in one commit. */
export class Transaction {
  readonly staged: StagedItem[] = [];
  readonly blobs = new Map<Digest, { size: number; mediaType: string }>();
  readonly layers = new Map<Digest, { size: number; fileBytes: number; entries: number }>();
  readonly images = new Map<Digest, StagedImage>();
  /** Layers staged lazily (storage/lazy/): their `layers` rows (sizes not known yet) and lazy_layers rows. */
  readonly lazyLayers = new Map<Digest, { row: Omit<LazyLayerRow, 'created_at' | 'diff_id'>; fileBytes: number; entries: number }>();
  /** Manifests passed over because they are for another platform. */
  readonly skipped: { digest: Digest; platform: string }[] = [];
  /** Keeps the store's disk reserve free while this transaction writes. */
  readonly disk: DiskGuard;
  private seq = 0;
  /** Objects this transaction's layers staged (skeleton layers), by digest. */
  private readonly stagedObjects = new Map<string, string>();
  /** Of those, the ones already in `staged`. */
  private readonly publishedObjects = new Set<string>();
  private objectDir: string | undefined;
  private objectSeq = 0;

  constructor(readonly store: Store, readonly workDir: string) {
    this.disk = new DiskGuard(workDir, store.diskReserveBytes);
  }

  /**
   * Where this transaction's layers stage their files' objects, when the
   * store keeps new layers as skeleton + objects (undefined: as `layer.tar`).
   */
  async objectStaging(): Promise<ObjectStaging | undefined> {
    if (this.store.layerFormat !== 'skeleton') return undefined;
    if (this.objectDir === undefined) {
      this.objectDir = join(this.workDir, 'objects');
      await mkdir(this.objectDir, { recursive: true });
    }
    const objects = this.store.objects;
    return {
      dir: this.objectDir,
      has: (digest) => this.stagedObjects.has(digest) || objects.has(digest),
      add: (digest, path) => {
        if (this.stagedObjects.has(digest)) return false;
        this.stagedObjects.set(digest, path);
        return true;
      },
      nextName: () => String(this.objectSeq++),
    };
  }

  /** A blob this transaction already ingested (another image shares it). */
  stagedBlobPath(digest: Digest): string | undefined {
    return this.staged.find((item) => item.kind === 'blob' && item.digest === digest)?.path;
  }

  nextDir(): string {
    return join(this.workDir, String(this.seq++));
  }

  /** Stage a small document (manifest, config, index) as a blob. */
  async stageDocument(digest: Digest, bytes: Buffer, mediaType: string): Promise<void> {
    if (this.blobs.has(digest)) return;
    this.blobs.set(digest, { size: bytes.length, mediaType });
    if (this.store.db.getBlob(digest)) return;
    const path = join(this.workDir, `doc-${this.seq++}`);
    await writeFile(path, bytes, { mode: 0o600 });
    this.staged.push({ kind: 'blob', digest, path });
  }

  /**
   * Verify and index a layer file on this machine (a tar, compressed or
   * not) in this transaction's work area. `storedBlob`: the file itself is
   * the layer's blob (it is not copied). The unpacked layer of a diffID the
   * store already has is dropped, so staging it adds nothing twice.
   */
  async ingestLayerFile(path: string, options: { storedBlob?: boolean; limits?: IngestLimits } = {}): Promise<IngestedLayer> {
    const workDir = this.nextDir();
    await mkdir(workDir);
    const objects = await this.objectStaging();
    const ingested = await ingestLayer(async () => createReadStream(path, { highWaterMark: 1024 * 1024 }), {}, {
      workDir, unpack: true, flushEarly: this.store.durable, disk: this.disk,
      // A stored plain tar (a commit's) is not kept as a blob: it is split too.
      ...(objects ? { objects, splitPlain: options.storedBlob === true } : {}),
      ...(options.storedBlob ? { storedBlob: path } : {}), ...(options.limits ? { limits: options.limits } : {}),
    });
    if (this.store.db.getLayer(ingested.diffId) !== undefined) {
      delete ingested.layerDir;
      delete ingested.index;
    }
    return ingested;
  }

  stageLayer(layer: IngestedLayer, mediaType: string): void {
    if (layer.blobPath) {
      this.staged.push({ kind: 'blob', digest: layer.digest, path: layer.blobPath });
      this.blobs.set(layer.digest, { size: layer.size, mediaType });
    }
    if (layer.objects !== undefined) {
      // The objects staged so far (this layer's among them) go with it, whoever commits `staged`.
      for (const [digest, path] of this.stagedObjects) {
        if (this.publishedObjects.has(digest)) continue;
        this.publishedObjects.add(digest);
        this.staged.push({ kind: 'object', digest, path });
      }
    }
    if (layer.layerDir && layer.index) {
      this.staged.push(layer.objects !== undefined
        ? { kind: 'skeleton', diffId: layer.diffId, path: layer.layerDir, objects: layer.objects }
        : { kind: 'layer', diffId: layer.diffId, path: layer.layerDir });
      this.layers.set(layer.diffId, { size: layer.diffSize, fileBytes: layer.fileBytes, entries: layer.index.entries.length });
    }
  }

  async commit(): Promise<void> {
    await this.store.commit(this.workDir, this.staged, (db) => {
      for (const [digest, b] of this.blobs) db.putBlob({ digest, size: b.size, media_type: b.mediaType });
      for (const [diffId, l] of this.layers) db.putLayer({ diff_id: diffId, size: l.size, file_bytes: l.fileBytes, entries: l.entries });
      for (const [diffId, l] of this.lazyLayers) {
        if (db.getLayer(diffId)) continue; // stored (or lazy) already
        db.putLayer({ diff_id: diffId, size: 0, file_bytes: l.fileBytes, entries: l.entries });
        db.putLazyLayer({ diff_id: diffId, ...l.row });
      }
      for (const img of this.images.values()) {
        db.putImage(
          {
            id: img.manifestDigest, media_type: img.manifestMediaType, config_digest: img.configDigest,
            os: img.config.os, architecture: img.config.architecture, variant: img.config.variant ?? null,
            index_digest: img.indexDigest, created: img.config.created ?? null,
          },
          img.layers.map((l, position) => ({ position, diff_id: l.diffId, blob_digest: l.blobDigest, media_type: l.mediaType, blob_size: l.size })),
        );
        for (const r of img.refs) db.setTag(r.name, r.tag, img.manifestDigest);
      }
    });
  }
}

export async function importFromSource(store: Store, source: ImageSource, options: ImportOptions = {}): Promise<ImportedImage[]> {
  const images = await source.images();
  if (images.length === 0) throw new LayerdError(ErrorCodes.EFORMAT, `${source.description}: the source offers no images`);
  const workDir = await store.newWorkDir();
  try {
    const tx = new Transaction(store, workDir);
    await tx.disk.check();
    for (const image of images) {
      await importImage(tx, source, image.descriptor, image.refs, options);
    }
    if (tx.images.size === 0 && tx.skipped.length > 0) {
      const wanted = formatPlatform(normalizePlatform(options.platform ?? hostPlatform()));
      throw new LayerdError(
        ErrorCodes.EPLATFORM,
        `${source.description}: no image for platform ${wanted} (found: ${[...new Set(tx.skipped.map((s) => s.platform))].join(', ')})`,
        { platform: wanted },
      );
    }
    await tx.commit();
    return [...tx.images.values()].map((img) => ({
      id: img.manifestDigest,
      refs: img.refs.map((r) => formatRef(r.name, r.tag)),
      platform: formatPlatform(normalizePlatform({ os: img.config.os, architecture: img.config.architecture, ...(img.config.variant ? { variant: img.config.variant } : {}) })),
      layers: img.layers.length,
    }));
  } catch (err) {
    throw noSpaceError(err, `importing ${source.description}`) ?? err;
  } finally {
    await store.releaseWorkDir(workDir);
  }
}

export async function readDocument(source: ImageSource, desc: Descriptor, what: string): Promise<Buffer> {
  if (desc.size > MAX_DOCUMENT_BYTES) {
    throw new LayerdError(ErrorCodes.ELIMIT, `${what} ${desc.digest} is ${desc.size} bytes, over ${MAX_DOCUMENT_BYTES}`, { digest: desc.digest });
  }
  const bytes = await source.readBlob(desc.digest, MAX_DOCUMENT_BYTES);
  verifyDigest(what, { digest: desc.digest, size: desc.size }, { digest: digestOf(bytes), size: bytes.length });
  return bytes;
}

async function importImage(
  tx: Transaction, source: ImageSource, top: Descriptor, refs: { name: string; tag: string }[], options: ImportOptions,
): Promise<void> {
  const wanted = options.platform ?? hostPlatform();
  // Walk down nested indexes to one manifest (the "fat manifest" choice).
  let desc = top;
  let indexDigest: Digest | null = null;
  for (let depth = 0; ; depth++) {
    if (depth > 8) throw new LayerdError(ErrorCodes.EBADJSON, `${source.description}: indexes nested too deeply`, { digest: top.digest });
    const bytes = await readDocument(source, desc, 'manifest');
    const parsed = parseManifestOrIndex(bytes, `${source.description}: ${desc.digest}`, desc.mediaType);
    if (parsed.kind === 'index') {
      await tx.stageDocument(desc.digest, bytes, parsed.mediaType);
      indexDigest ??= desc.digest;
      desc = selectPlatform(parsed.index.manifests, wanted, `${source.description}: index ${desc.digest}`);
      continue;
    }
    await tx.stageDocument(desc.digest, bytes, parsed.mediaType);
    const existing = tx.images.get(desc.digest);
    if (existing) {
      existing.refs.push(...refs);
      return;
    }
    await importManifest(tx, source, desc.digest, parsed.mediaType, parsed.manifest, indexDigest, refs, options);
    return;
  }
}

async function importManifest(
  tx: Transaction, source: ImageSource, manifestDigest: Digest, mediaType: string, manifest: ImageManifest,
  indexDigest: Digest | null, refs: { name: string; tag: string }[], options: ImportOptions,
): Promise<void> {
  const what = `${source.description}: manifest ${manifestDigest}`;
  const configBytes = await readDocument(source, manifest.config, 'image config');
  const config = parseImageConfig(configBytes, `${source.description}: config ${manifest.config.digest}`);
  await tx.stageDocument(manifest.config.digest, configBytes, manifest.config.mediaType);
  if (config.rootfs.diff_ids.length !== manifest.layers.length) {
    throw new LayerdError(ErrorCodes.EBADJSON, `${what}: ${manifest.layers.length} layers but the config lists ${config.rootfs.diff_ids.length} diff_ids`, { digest: manifestDigest });
  }
  if (options.platform && indexDigest === null) {
    // A tag that names a manifest directly: with an explicit platform, only
    // the images for that platform are wanted.
    const want = normalizePlatform(options.platform);
    const have = normalizePlatform({ os: config.os, architecture: config.architecture, ...(config.variant ? { variant: config.variant } : {}) });
    if (want.os !== have.os || want.architecture !== have.architecture || (want.variant ?? '') !== (have.variant ?? '')) {
      tx.skipped.push({ digest: manifestDigest, platform: formatPlatform(have) });
      return;
    }
  }

  for (const layer of manifest.layers) {
    if (!LAYER_MEDIA_TYPES.includes(layer.mediaType)) {
      throw new LayerdError(ErrorCodes.EUNSUPPORTED, `${what}: layer ${layer.digest} has unsupported media type ${layer.mediaType}`, { digest: layer.digest, mediaType: layer.mediaType });
    }
  }
  // Layers are ingested up to `concurrency` at a time. Two positions that
  // share a blob or a diffID wait for each other, so each is ingested once.
  const inFlight = new Map<Digest, Promise<void>>();
  await forEachBounded(manifest.layers, options.concurrency ?? 1, async (layer, i) => {
    const diffId = config.rootfs.diff_ids[i]!;
    const earlier = [inFlight.get(layer.digest), inFlight.get(diffId)].filter((p): p is Promise<void> => p !== undefined);
    const work = (async () => {
      await Promise.allSettled(earlier);
      await ingestManifestLayer(tx, source, layer, diffId, i, manifest.layers.length, options);
    })();
    inFlight.set(layer.digest, work);
    inFlight.set(diffId, work);
    await work;
  });
  const layers: StagedImage['layers'] = manifest.layers.map((layer, i) => (
    { diffId: config.rootfs.diff_ids[i]!, blobDigest: layer.digest, mediaType: layer.mediaType, size: layer.size }
  ));
  tx.images.set(manifestDigest, {
    manifestDigest, manifestMediaType: mediaType, configDigest: manifest.config.digest, config, indexDigest, layers, refs: [...refs],
  });
}

async function ingestManifestLayer(
  tx: Transaction, source: ImageSource, layer: Descriptor, diffId: Digest, i: number, count: number, options: ImportOptions,
): Promise<void> {
  const haveLayer = tx.store.db.getLayer(diffId) !== undefined || tx.layers.has(diffId);
  const haveBlob = tx.store.db.getBlob(layer.digest) !== undefined || tx.blobs.has(layer.digest);
  if (haveLayer && haveBlob) {
    options.onProgress?.({ type: 'layer-exists', digest: layer.digest, diffId });
    return;
  }
  options.onProgress?.({ type: 'layer-start', digest: layer.digest, size: layer.size, index: i, count });
  const workDir = tx.nextDir();
  await mkdir(workDir);
  const storedBlob = tx.store.db.getBlob(layer.digest) ? tx.store.layout.blobPath(layer.digest) : tx.stagedBlobPath(layer.digest);
  const objects = haveLayer ? undefined : await tx.objectStaging();
  const ingested = await ingestLayer(
    () => source.openBlob(layer.digest),
    { digest: layer.digest, size: layer.size, diffId },
    {
      workDir,
      ...(storedBlob ? { storedBlob } : {}),
      unpack: !haveLayer,
      ...(objects ? { objects } : {}),
      flushEarly: tx.store.durable,
      disk: tx.disk,
      ...(options.limits ? { limits: options.limits } : {}),
      ...(options.onProgress ? { onProgress: (bytes: number) => options.onProgress!({ type: 'layer-progress', digest: layer.digest, bytes, size: layer.size }) } : {}),
    },
  );
  tx.stageLayer(ingested, layer.mediaType);
  options.onProgress?.({ type: 'layer-done', digest: layer.digest, diffId });
}

/**
 * Run `fn` over `items`, at most `limit` at a time. After the first failure
 * no new item starts; the ones running are awaited (they write into the
 * ingest area, which the caller removes), then the first error is thrown.
 */
export async function forEachBounded<T>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: { error: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (failure === undefined && next < items.length) {
      const i = next++;
      try {
        await fn(items[i]!, i);
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  if (failure) throw failure.error;
}

/**
 * A raw layer tar (compressed or not) on its own becomes a one-layer image,
 * as `docker import` does: the config is written for this host's platform.
 */
export async function importRawLayer(store: Store, path: string, name: string, options: ImportOptions = {}): Promise<ImportedImage[]> {
  if (!isValidName(name)) throw new LayerdError(ErrorCodes.EINVAL, `invalid image name '${name}'`, { name });
  const workDir = await store.newWorkDir();
  try {
    const tx = new Transaction(store, workDir);
    await tx.disk.check();
    const ingested = await tx.ingestLayerFile(path, options.limits ? { limits: options.limits } : {});
    const mediaType = layerMediaType(ingested.compression);
    if (store.db.getBlob(ingested.digest) !== undefined) delete ingested.blobPath;
    tx.stageLayer(ingested, mediaType);
    const platform = options.platform ?? hostPlatform();
    const created = new Date().toISOString();
    const config: ImageConfig = {
      created,
      architecture: platform.architecture,
      os: platform.os,
      ...(platform.variant ? { variant: platform.variant } : {}),
      config: {},
      rootfs: { type: 'layers', diff_ids: [ingested.diffId] },
      history: [{ created, created_by: `layerctl import ${basename(path)}` }],
    };
    const configBytes = Buffer.from(JSON.stringify(config));
    const configDigest = digestOf(configBytes);
    await tx.stageDocument(configDigest, configBytes, MediaTypes.ociConfig);
    const manifest: ImageManifest = {
      schemaVersion: 2,
      mediaType: MediaTypes.ociManifest,
      config: { mediaType: MediaTypes.ociConfig, digest: configDigest, size: configBytes.length },
      layers: [{ mediaType, digest: ingested.digest, size: ingested.size }],
    };
    const manifestBytes = Buffer.from(JSON.stringify(manifest));
    const manifestDigest = digestOf(manifestBytes);
    await tx.stageDocument(manifestDigest, manifestBytes, MediaTypes.ociManifest);
    tx.images.set(manifestDigest, {
      manifestDigest, manifestMediaType: MediaTypes.ociManifest, configDigest, config, indexDigest: null,
      layers: [{ diffId: ingested.diffId, blobDigest: ingested.digest, mediaType, size: ingested.size }],
      refs: [{ name, tag: 'latest' }],
    });
    await tx.commit();
    return [{ id: manifestDigest, refs: [formatRef(name, 'latest')], platform: formatPlatform(platform), layers: 1 }];
  } catch (err) {
    throw noSpaceError(err, `importing ${path}`, { path }) ?? err;
  } finally {
    await store.releaseWorkDir(workDir);
  }
}
