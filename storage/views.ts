/**
 * Read-only views of the store for people and scripts: image and layer
 * listings and `inspect` (shaped like `docker image inspect`).
 */
import { type Digest } from './digest.js';
import { type HistoryEntry, parseImageConfig } from './oci.js';
import { formatPlatform, normalizePlatform } from './platform.js';
import { formatRef } from './references.js';
import { type Store } from './store.js';
import { type ImageRow } from './metadata.js';
import { snapshotLayerUseCounts } from './snapshots.js';

export interface ImageSummary {
  id: Digest;
  refs: string[];
  platform: string;
  layers: number;
  /** Bytes of the layers' uncompressed tars (0 for a lazy layer until it is complete). */
  size: number;
  /** 'complete' when every layer is; else the least complete layer's state ('broken', 'lazy', 'filling N %'). */
  state: string;
  created: string | null;
  importedAt: string;
}

export interface LayerSummary {
  diffId: Digest;
  size: number;
  fileBytes: number;
  entries: number;
  /** Blobs (distribution digests) stored for this layer. */
  blobs: Digest[];
  /** Images and committed containerd snapshots that use it. */
  usedBy: number;
}

export interface InspectLayer {
  position: number;
  diffId: Digest;
  digest: Digest | null;
  mediaType: string;
  size: number;
  uncompressedSize: number;
  entries: number;
  /** 'complete', or for a lazily pulled layer: 'lazy', 'filling' (see `filled`), 'broken' (see `error`). */
  state: LayerState;
  /** Percent of the blob the background fill has fetched (lazy layers). */
  filled?: number;
  error?: string;
}

export type LayerState = 'complete' | 'lazy' | 'filling' | 'broken';

/** A layer's state as `images` and `inspect` show it. */
export function layerState(store: Store, diffId: Digest): { state: LayerState; filled?: number; error?: string } {
  const lazy = store.db.getLazyLayer(diffId);
  if (!lazy) return { state: 'complete' };
  const filled = lazy.blob_size > 0 ? Math.min(100, Math.floor((100 * lazy.filled_bytes) / lazy.blob_size)) : 0;
  return { state: lazy.state, filled, ...(lazy.error ? { error: lazy.error } : {}) };
}

export interface ImageInspect {
  Id: Digest;
  RepoTags: string[];
  MediaType: string;
  ConfigDigest: Digest;
  IndexDigest: Digest | null;
  Created: string | null;
  Author: string | null;
  Os: string;
  Architecture: string;
  Variant: string | null;
  Platform: string;
  Config: Record<string, unknown>;
  RootFS: { Type: string; Layers: Digest[] };
  Layers: InspectLayer[];
  History: HistoryEntry[];
  Size: number;
  CompressedSize: number;
}

function platformOf(row: ImageRow): string {
  return formatPlatform(normalizePlatform({ os: row.os, architecture: row.architecture, ...(row.variant ? { variant: row.variant } : {}) }));
}

function imageState(layers: { state: LayerState; filled?: number }[]): string {
  if (layers.some((l) => l.state === 'broken')) return 'broken';
  if (layers.some((l) => l.state === 'lazy')) return 'lazy';
  const filling = layers.filter((l) => l.state === 'filling');
  if (filling.length === 0) return 'complete';
  return `filling ${Math.min(...filling.map((l) => l.filled ?? 0))} %`;
}

export function listImages(store: Store): ImageSummary[] {
  return store.db.listImages().map((row) => {
    const layers = store.db.imageLayers(row.id);
    const size = layers.reduce((n, l) => n + (store.db.getLayer(l.diff_id)?.size ?? 0), 0);
    return {
      id: row.id,
      refs: store.db.tagsOf(row.id).map((t) => formatRef(t.name, t.tag)),
      platform: platformOf(row),
      layers: layers.length,
      size,
      state: imageState(layers.map((l) => layerState(store, l.diff_id))),
      created: row.created,
      importedAt: new Date(row.imported_at).toISOString(),
    };
  });
}

export function listLayers(store: Store): LayerSummary[] {
  const uses = store.db.layerUseCounts();
  // containerd snapshots (committed ones) are users too: such a layer is not garbage.
  for (const [diffId, n] of snapshotLayerUseCounts(store.db)) uses.set(diffId, (uses.get(diffId) ?? 0) + n);
  const blobsByLayer = new Map<Digest, Set<Digest>>();
  for (const image of store.db.listImages()) {
    for (const l of store.db.imageLayers(image.id)) {
      if (!l.blob_digest || !store.db.getBlob(l.blob_digest)) continue;
      let set = blobsByLayer.get(l.diff_id);
      if (!set) blobsByLayer.set(l.diff_id, (set = new Set()));
      set.add(l.blob_digest);
    }
  }
  return store.db.listLayers().map((row) => ({
    diffId: row.diff_id,
    size: row.size,
    fileBytes: row.file_bytes,
    entries: row.entries,
    blobs: [...(blobsByLayer.get(row.diff_id) ?? [])].sort(),
    usedBy: uses.get(row.diff_id) ?? 0,
  }));
}

export async function inspectImage(store: Store, ref: string): Promise<ImageInspect> {
  const row = store.resolveImage(ref);
  const config = parseImageConfig(await store.readBlob(row.config_digest), `config ${row.config_digest}`);
  const layers: InspectLayer[] = store.db.imageLayers(row.id).map((l) => {
    const layer = store.db.getLayer(l.diff_id);
    return {
      position: l.position + 1,
      diffId: l.diff_id,
      digest: l.blob_digest,
      mediaType: l.media_type,
      size: l.blob_size,
      uncompressedSize: layer?.size ?? 0,
      entries: layer?.entries ?? 0,
      ...layerState(store, l.diff_id),
    };
  });
  return {
    Id: row.id,
    RepoTags: store.db.tagsOf(row.id).map((t) => formatRef(t.name, t.tag)),
    MediaType: row.media_type,
    ConfigDigest: row.config_digest,
    IndexDigest: row.index_digest,
    Created: config.created ?? null,
    Author: config.author ?? null,
    Os: config.os,
    Architecture: config.architecture,
    Variant: config.variant ?? null,
    Platform: platformOf(row),
    Config: config.config ?? {},
    RootFS: { Type: config.rootfs.type, Layers: config.rootfs.diff_ids },
    Layers: layers,
    History: config.history ?? [],
    Size: layers.reduce((n, l) => n + l.uncompressedSize, 0),
    CompressedSize: layers.reduce((n, l) => n + l.size, 0),
  };
}
