/**
 * `push`: an image from the store to a registry repository.
 *
 * A manifest names its layers by their *distribution* digests (the
 * compressed blobs), never by diffID. For each layer the stored blob is
 * used when the store has it compressed; otherwise (no blob, or an
 * uncompressed one such as a docker-save import keeps) the layer's
 * `layer.tar` is compressed into the ingest area and the manifest is
 * rewritten to name the new blob — its config, and so its diff_ids, stay
 * as they are, which is why the pushed manifest's digest can differ from
 * the image id.
 *
 * Blobs the repository has are skipped (HEAD); a blob the store knows from
 * another repository of the same registry is mounted from there; the rest
 * is uploaded. Then the config, then the manifest, and — when the store
 * has the image's whole multi-platform index — every child manifest by
 * digest and the index under the tag.
 */
import { createReadStream, createWriteStream } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Compression, SNIFF_BYTES, createCompressor, layerMediaType, sniffCompression } from '../compression.js';
import { type Digest, DigestingStream, digestOf } from '../digest.js';
import { type Descriptor, INDEX_MEDIA_TYPES, MediaTypes, parseJsonObject, parseManifestOrIndex } from '../oci.js';
import { forEachBounded } from '../importer.js';
import { type ImageRow } from '../metadata.js';
import { type Store } from '../store.js';
import { openLayerTar } from '../layerTar.js';
import { repositoryScope } from './auth.js';
import { DEFAULT_RETRY, RegistryClient, type RetryPolicy, headerValue } from './client.js';
import { EMPTY_CONFIG, type RegistriesConfig, endpointsFor } from './config.js';
import { registryError } from './errors.js';
import { type RegistryRef, formatRegistryRef, parseRegistryRef } from './reference.js';
import { DEFAULT_TIMEOUTS, type RegistryTimeouts, withDeadline } from './timeouts.js';
import { type BlobOutcome, BlobUploader, DEFAULT_UPLOAD, type LocalBlob } from './upload.js';
import { type ReferrersVia, publishImageGzipIndexes } from '../lazy/gzipArtifact.js';

export type PushCompression = Exclude<Compression, 'none'>;

export type PushProgress =
  | { type: 'blob-start'; digest: Digest; size: number }
  | { type: 'blob-progress'; digest: Digest; bytes: number; size: number }
  | { type: 'blob-done'; digest: Digest; outcome: BlobOutcome; from?: string }
  | { type: 'layer-compressed'; diffId: Digest; digest: Digest; size: number }
  | { type: 'manifest-pushed'; digest: Digest; mediaType: string; reference: string };

export interface PushOptions {
  config?: RegistriesConfig;
  /** For layers that have no compressed blob in the store (default gzip). */
  compression?: PushCompression;
  onProgress?: (event: PushProgress) => void;
  retry?: RetryPolicy;
  chunkThreshold?: number;
  chunkSize?: number;
  /** Blobs uploaded at once (default 3). */
  concurrency?: number;
  /** Connect, idle and overall limits (default DEFAULT_TIMEOUTS). */
  timeouts?: RegistryTimeouts;
  /** Aborting it (with an AbortCause as reason) stops every upload at once. */
  signal?: AbortSignal;
  /** Publish the seekable index of the gzip layers as an artifact of each manifest (default true; storage/lazy/gzipArtifact.ts). */
  gzipIndex?: boolean;
}

export interface PushedBlob {
  digest: Digest;
  size: number;
  outcome: BlobOutcome;
}

export interface PushResult {
  /** The reference pushed to. */
  ref: string;
  /** Digest of what the tag now names: the manifest, or the index. */
  digest: Digest;
  mediaType: string;
  manifests: { digest: Digest; platform: string; rewritten: boolean }[];
  blobs: PushedBlob[];
  /** The gzip-index artifacts published, by the manifest they refer to. */
  /** `listedBy`: the registry's referrers API, or the `sha256-<hex>` referrers tag layerd wrote. */
  gzipIndexes?: { manifest: Digest; artifact: Digest; layers: number; listedBy: ReferrersVia }[];
}

export async function pushImage(store: Store, image: string, target: string, options: PushOptions = {}): Promise<PushResult> {
  const row = store.resolveImage(image);
  const ref = parseRegistryRef(target);
  if (ref.digest || !ref.tag) {
    throw new LayerdError(ErrorCodes.EINVAL, `push needs a tag to push to, not a digest: ${target}`, { ref: target });
  }
  const [endpoint] = await endpointsFor(options.config ?? EMPTY_CONFIG, ref.registry, false);
  const timeouts = options.timeouts ?? DEFAULT_TIMEOUTS;
  const deadline = withDeadline(options.signal, timeouts.totalMs);
  const client = new RegistryClient(endpoint!, options.retry ?? DEFAULT_RETRY, { timeouts, signal: deadline.signal });
  try {
    const workDir = await store.newWorkDir();
    try {
      return await new Pusher(store, client, ref, workDir, options).push(row);
    } finally {
      await store.releaseWorkDir(workDir);
    }
  } finally {
    deadline.dispose();
    client.close();
  }
}

interface PushedManifest {
  descriptor: Descriptor;
  rewritten: boolean;
}

class Pusher {
  private readonly scopes: string[];
  /** Blobs already made present in the target repository during this push. */
  private readonly done = new Map<Digest, Promise<PushedBlob>>();
  /** Layers compressed during this push, by diffID (children of an index share layers). */
  private readonly compressed = new Map<Digest, Promise<LocalBlob>>();
  private readonly mountSources: Map<Digest, string[]>;
  private seq = 0;
  private readonly gzipIndexes: NonNullable<PushResult['gzipIndexes']> = [];

  constructor(
    private readonly store: Store,
    private readonly client: RegistryClient,
    private readonly ref: RegistryRef,
    private readonly workDir: string,
    private readonly options: PushOptions,
  ) {
    this.scopes = [repositoryScope(ref.repository, 'pull,push')];
    this.mountSources = this.findMountSources();
  }

  async push(row: ImageRow): Promise<PushResult> {
    const tag = this.ref.tag!;
    const index = await this.wholeIndex(row);
    if (!index) {
      const pushed = await this.pushManifest(row, tag);
      return this.result(pushed.descriptor, [{ row, pushed }]);
    }
    const children: { row: ImageRow; pushed: PushedManifest }[] = [];
    for (const child of index.children) {
      children.push({ row: child, pushed: await this.pushManifest(child, undefined) });
    }
    let bytes = index.bytes;
    let mediaType = index.mediaType;
    if (children.some((c) => c.pushed.rewritten)) {
      // Point the index at the rewritten manifests; an OCI manifest inside a Docker list is not allowed.
      const doc = parseJsonObject(index.bytes, `index ${index.digest}`);
      const byOld = new Map(children.map((c) => [c.row.id, c.pushed.descriptor]));
      const entries = (doc['manifests'] as Record<string, unknown>[]).map((m) => {
        const now = byOld.get(m['digest'] as Digest);
        return now ? { ...m, mediaType: now.mediaType, digest: now.digest, size: now.size } : m;
      });
      if (mediaType === MediaTypes.dockerList && children.some((c) => c.pushed.descriptor.mediaType === MediaTypes.ociManifest)) {
        mediaType = MediaTypes.ociIndex;
      }
      bytes = Buffer.from(JSON.stringify({ ...doc, ...(doc['mediaType'] ? { mediaType } : {}), manifests: entries }));
    }
    const descriptor = await this.putManifest(bytes, mediaType, tag);
    return this.result(descriptor, children);
  }

  private async result(top: Descriptor, manifests: { row: ImageRow; pushed: PushedManifest }[]): Promise<PushResult> {
    return {
      ref: formatRegistryRef(this.ref),
      digest: top.digest,
      mediaType: top.mediaType,
      manifests: manifests.map((m) => ({
        digest: m.pushed.descriptor.digest,
        platform: [m.row.os, m.row.architecture, m.row.variant].filter(Boolean).join('/'),
        rewritten: m.pushed.rewritten,
      })),
      blobs: await Promise.all(this.done.values()),
      ...(this.gzipIndexes.length > 0 ? { gzipIndexes: this.gzipIndexes } : {}),
    };
  }

  /**
   * The image's index, if the store holds it and every manifest it lists
   * (so a single-platform pull of a multi-platform image pushes only the
   * one manifest).
   */
  private async wholeIndex(row: ImageRow): Promise<{ digest: Digest; bytes: Buffer; mediaType: string; children: ImageRow[] } | undefined> {
    if (!row.index_digest || !this.store.db.getBlob(row.index_digest)) return undefined;
    const bytes = await this.store.readBlob(row.index_digest);
    const parsed = parseManifestOrIndex(bytes, `index ${row.index_digest}`);
    if (parsed.kind !== 'index' || !INDEX_MEDIA_TYPES.includes(parsed.mediaType)) return undefined;
    const children: ImageRow[] = [];
    for (const entry of parsed.index.manifests) {
      const child = this.store.db.getImage(entry.digest);
      if (!child) return undefined;
      children.push(child);
    }
    return { digest: row.index_digest, bytes, mediaType: parsed.mediaType, children };
  }

  /** Push one image's blobs and manifest (by `tag`, or by digest when part of an index). */
  private async pushManifest(row: ImageRow, tag: string | undefined): Promise<PushedManifest> {
    const original = await this.store.readBlob(row.id);
    const parsed = parseManifestOrIndex(original, `manifest ${row.id}`, row.media_type);
    if (parsed.kind !== 'manifest') throw new LayerdError(ErrorCodes.EINTERNAL, `image ${row.id} is not a manifest`, { digest: row.id });
    const manifest = parsed.manifest;
    const layerRows = this.store.db.imageLayers(row.id);
    for (const l of layerRows) this.store.requireComplete(l.diff_id, `push ${row.id}`);
    if (layerRows.length !== manifest.layers.length) {
      throw new LayerdError(ErrorCodes.ECORRUPT, `image ${row.id}: ${layerRows.length} layer records for ${manifest.layers.length} manifest layers`, { digest: row.id });
    }
    // Which blob to send for each layer.
    const blobs: { desc: Descriptor; blob: LocalBlob; changed: boolean }[] = [];
    for (const [i, desc] of manifest.layers.entries()) {
      const stored = await this.compressedStoredBlob(desc.digest);
      if (stored) {
        blobs.push({ desc, blob: stored, changed: false });
        continue;
      }
      const blob = await this.compressLayer(layerRows[i]!.diff_id);
      blobs.push({ desc, blob, changed: true });
    }
    const rewritten = blobs.some((b) => b.changed);
    const compression = this.options.compression ?? 'gzip';
    const toOci = rewritten && parsed.mediaType === MediaTypes.dockerManifest && compression === 'zstd';
    const mediaType = toOci ? MediaTypes.ociManifest : parsed.mediaType;

    const config: LocalBlob = { digest: manifest.config.digest, size: manifest.config.size, path: this.store.layout.blobPath(manifest.config.digest) };
    await Promise.all([
      this.putBlob(config),
      forEachBounded(blobs, this.options.concurrency ?? 3, (b) => this.putBlob(b.blob).then(() => undefined)),
    ]);

    let bytes = original;
    if (rewritten) {
      const doc = parseJsonObject(original, `manifest ${row.id}`);
      const layers = (doc['layers'] as Record<string, unknown>[]).map((l, i) => {
        const b = blobs[i]!;
        const layerType = b.changed ? rewrittenLayerType(mediaType, compression) : toOci ? ociLayerType(b.desc.mediaType) : b.desc.mediaType;
        return { ...l, mediaType: layerType, digest: b.blob.digest, size: b.blob.size };
      });
      const configDesc = doc['config'] as Record<string, unknown>;
      bytes = Buffer.from(JSON.stringify({
        ...doc,
        ...(doc['mediaType'] || toOci ? { mediaType } : {}),
        config: toOci && configDesc['mediaType'] === MediaTypes.dockerConfig ? { ...configDesc, mediaType: MediaTypes.ociConfig } : configDesc,
        layers,
      }));
    }
    const descriptor = await this.putManifest(bytes, mediaType, tag);
    if (this.options.gzipIndex !== false) {
      const layers = parseManifestOrIndex(bytes, `manifest ${descriptor.digest}`, mediaType);
      if (layers.kind === 'manifest') {
        const published = await publishImageGzipIndexes(this.client, this.ref.repository, descriptor, layers.manifest.layers.map((desc, i) => ({
          descriptor: desc, diffId: layerRows[i]!.diff_id, open: () => createReadStream(blobs[i]!.blob.path, { highWaterMark: 1024 * 1024 }),
        })), this.workDir);
        if (published) this.gzipIndexes.push({ manifest: descriptor.digest, artifact: published.digest, layers: published.layers.length, listedBy: published.listedBy });
      }
    }
    return { descriptor: { ...descriptor, platform: platformOf(row) }, rewritten };
  }

  private async putManifest(bytes: Buffer, mediaType: string, tag: string | undefined): Promise<Descriptor> {
    const digest = digestOf(bytes);
    const reference = tag ?? digest;
    const res = await this.client.requestBuffer({
      method: 'PUT', path: `/v2/${this.ref.repository}/manifests/${reference}`,
      headers: { 'content-type': mediaType }, body: bytes, scopes: this.scopes, expect: [201],
      context: { repository: this.ref.repository, digest, ref: reference },
    }, 64 * 1024);
    const stored = headerValue(res.headers['docker-content-digest']);
    if (stored && stored !== digest) {
      throw registryError('protocol', `registry ${this.ref.registry}: pushed manifest ${digest} but the registry stored ${stored}`,
        { registry: this.ref.registry, repository: this.ref.repository, digest });
    }
    this.options.onProgress?.({ type: 'manifest-pushed', digest, mediaType, reference });
    return { mediaType, digest, size: bytes.length };
  }

  private putBlob(blob: LocalBlob): Promise<PushedBlob> {
    let pending = this.done.get(blob.digest);
    if (!pending) {
      pending = (async () => {
        const onProgress = this.options.onProgress;
        onProgress?.({ type: 'blob-start', digest: blob.digest, size: blob.size });
        const uploader = new BlobUploader(this.client, this.ref.repository, this.scopes, {
          chunkThreshold: this.options.chunkThreshold ?? DEFAULT_UPLOAD.chunkThreshold,
          chunkSize: this.options.chunkSize ?? DEFAULT_UPLOAD.chunkSize,
          ...(onProgress ? { onProgress: (bytes: number) => onProgress({ type: 'blob-progress', digest: blob.digest, bytes, size: blob.size }) } : {}),
        });
        const from = this.mountSources.get(blob.digest)?.[0];
        const outcome = await uploader.put(blob, from);
        onProgress?.({ type: 'blob-done', digest: blob.digest, outcome, ...(outcome === 'mounted' && from ? { from } : {}) });
        return { digest: blob.digest, size: blob.size, outcome };
      })();
      this.done.set(blob.digest, pending);
    }
    return pending;
  }

  /** The store's blob for a layer, if it has one and it is compressed. */
  private async compressedStoredBlob(digest: Digest): Promise<LocalBlob | undefined> {
    const row = this.store.db.getBlob(digest);
    if (!row) return undefined;
    const path = this.store.layout.blobPath(digest);
    const handle = await open(path, 'r');
    try {
      const head = Buffer.alloc(SNIFF_BYTES);
      const { bytesRead } = await handle.read(head, 0, SNIFF_BYTES, 0);
      if (sniffCompression(head.subarray(0, bytesRead)) === 'none') return undefined;
    } finally {
      await handle.close();
    }
    return { digest, size: row.size, path };
  }

  /** Compress a layer's tar (layer.tar, or rebuilt from its skeleton) into the ingest area; its digest is the new distribution digest. */
  private compressLayer(diffId: Digest): Promise<LocalBlob> {
    let pending = this.compressed.get(diffId);
    if (!pending) {
      pending = (async () => {
        if (!this.store.db.getLayer(diffId)) {
          throw new LayerdError(ErrorCodes.ECORRUPT, `layer ${diffId} is missing from the store`, { diffId });
        }
        const compression = this.options.compression ?? 'gzip';
        const path = join(this.workDir, `layer-${this.seq++}.${compression}`);
        const hasher = new DigestingStream();
        await pipeline(
          openLayerTar(this.store, diffId, await this.store.layerIndex(diffId)),
          createCompressor(compression), hasher, createWriteStream(path, { mode: 0o600 }),
        );
        const { digest, size } = hasher.result();
        this.options.onProgress?.({ type: 'layer-compressed', diffId, digest, size });
        return { digest, size, path };
      })();
      this.compressed.set(diffId, pending);
    }
    return pending;
  }

  /** Repositories of the target registry that the store's tags say hold each blob. */
  private findMountSources(): Map<Digest, string[]> {
    const sources = new Map<Digest, string[]>();
    for (const tag of this.store.db.listTags()) {
      let from: RegistryRef;
      try {
        from = parseRegistryRef(tag.name);
      } catch {
        continue;
      }
      if (from.registry !== this.ref.registry || from.repository === this.ref.repository) continue;
      const image = this.store.db.getImage(tag.image_id);
      if (!image) continue;
      const digests = [image.config_digest, ...this.store.db.imageLayers(image.id).map((l) => l.blob_digest)];
      for (const d of digests) {
        if (!d) continue;
        const list = sources.get(d) ?? [];
        if (!list.includes(from.repository)) list.push(from.repository);
        sources.set(d, list);
      }
    }
    return sources;
  }
}

function rewrittenLayerType(manifestType: string, compression: PushCompression): string {
  if (manifestType === MediaTypes.dockerManifest) return MediaTypes.dockerLayer; // gzip: zstd turns the manifest into OCI
  return layerMediaType(compression);
}

function ociLayerType(mediaType: string): string {
  switch (mediaType) {
    case MediaTypes.dockerLayer: return MediaTypes.ociLayerGzip;
    case 'application/vnd.docker.image.rootfs.diff.tar': return MediaTypes.ociLayer;
    case MediaTypes.dockerForeignLayer: return `${MediaTypes.ociLayerNondistributable}+gzip`;
    default: return mediaType;
  }
}

function platformOf(row: ImageRow): Descriptor['platform'] {
  return { os: row.os, architecture: row.architecture, ...(row.variant ? { variant: row.variant } : {}) };
}
