/**
 * `layerctl df`: what the store keeps on disk and how much of it images
 * share. A layer is stored once however many images and containerd
 * snapshots use it; this says how many bytes that saves, and which bytes
 * each image holds alone (what removing it alone would free).
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { type Digest } from './digest.js';
import { INLINE_FILE, SKELETON_FILE } from './tarSkeleton.js';
import { listObjects, objectSize } from './objectStore.js';
import { formatRef } from './references.js';
import { snapshotLayerUseCounts } from './snapshots.js';
import { type Store } from './store.js';

export interface ImageUsage {
  id: Digest;
  refs: string[];
  layers: number;
  /** Bytes of its layers (uncompressed tars), each distinct layer once. */
  size: number;
  /** Of those, bytes in layers no other image and no snapshot uses. */
  unique: number;
  /** size − unique: bytes in layers it shares. */
  shared: number;
}

export interface DiskUsage {
  /** Bytes of the layers' own files, the compressed blobs kept for pushes, and file objects. */
  storedBytes: number;
  /**
   * `bytes`: what the layers' own files take: `layer.tar` of a tar layer, skeleton + inline
   * bytes of a skeleton layer (its other files are objects); `tarBytes`: their uncompressed tars' sizes.
   */
  layers: { count: number; bytes: number; tarBytes: number; skeletons: number; unused: number; unusedBytes: number };
  blobs: { count: number; bytes: number };
  /**
   * Files' bytes by content (storage/objectStore.ts), each distinct content once: the files
   * of skeleton layers, and of tar layers those kept whole for FUSE passthrough. `savedByDedup`:
   * what keeping each once saves over one copy per layer naming it.
   */
  objects: { count: number; bytes: number; savedByDedup: number };
  /** Committed containerd snapshots (each holds one layer). */
  snapshots: { count: number };
  /** What images and snapshots would take if each kept its own copy of its layers. */
  referencedBytes: number;
  /** referencedBytes − the bytes of the layers they use: what storing each layer once saves. */
  savedBySharing: number;
  images: ImageUsage[];
}

export async function diskUsage(store: Store): Promise<DiskUsage> {
  const layerSize = new Map(store.db.listLayers().map((l) => [l.diff_id, l.size]));
  const sizeOf = (d: Digest): number => layerSize.get(d) ?? 0;
  const snapshotUses = snapshotLayerUseCounts(store.db);
  const imageLayers = store.db.listImages().map((image) => ({ image, diffIds: [...new Set(store.db.imageLayers(image.id).map((l) => l.diff_id))] }));
  // Users of each layer: images (once each) and committed snapshots.
  const users = new Map<Digest, number>(snapshotUses);
  for (const { diffIds } of imageLayers) for (const d of diffIds) users.set(d, (users.get(d) ?? 0) + 1);

  const images: ImageUsage[] = imageLayers.map(({ image, diffIds }) => {
    const size = diffIds.reduce((n, d) => n + sizeOf(d), 0);
    const unique = diffIds.filter((d) => users.get(d) === 1).reduce((n, d) => n + sizeOf(d), 0);
    return { id: image.id, refs: store.db.tagsOf(image.id).map((t) => formatRef(t.name, t.tag)), layers: diffIds.length, size, unique, shared: size - unique };
  });
  let referencedBytes = 0;
  let usedLayerBytes = 0;
  for (const [d, n] of users) {
    if (!layerSize.has(d)) continue;
    referencedBytes += n * sizeOf(d);
    usedLayerBytes += sizeOf(d);
  }
  const layerBytes = [...layerSize.values()].reduce((n, s) => n + s, 0);
  const unused = [...layerSize.keys()].filter((d) => !users.has(d));
  const blobs = store.db.listBlobs();
  const blobBytes = blobs.reduce((n, b) => n + b.size, 0);
  const objects = listObjects(store.layout.root);
  const objectSizes = new Map(objects.map((d) => [d, objectSize(store.layout.root, d)]));
  const objectBytes = [...objectSizes.values()].reduce((n, s) => n + s, 0);
  // What the layers' own files take, and how many layers name each object.
  let layerFileBytes = 0;
  let skeletons = 0;
  const namedBy = new Map<string, number>();
  for (const diffId of layerSize.keys()) {
    if (store.isLazy(diffId)) continue; // its bytes are counted by its lazy state (docs/lazy.md), not here
    const index = await store.layerIndex(diffId).catch(() => undefined);
    if (index?.storage === 'skeleton') {
      skeletons++;
      for (const name of [SKELETON_FILE, INLINE_FILE]) layerFileBytes += (await stat(join(store.layout.layerDir(diffId), name)).catch(() => undefined))?.size ?? 0;
    } else {
      layerFileBytes += sizeOf(diffId);
    }
    const digests = new Set<string>();
    for (const e of index?.entries ?? []) if (e.digest !== undefined) digests.add(e.digest);
    for (const d of digests) namedBy.set(d, (namedBy.get(d) ?? 0) + 1);
  }
  let savedByDedup = 0;
  for (const [d, size] of objectSizes) savedByDedup += size * Math.max(0, (namedBy.get(d) ?? 1) - 1);
  return {
    storedBytes: layerFileBytes + blobBytes + objectBytes,
    layers: {
      count: layerSize.size, bytes: layerFileBytes, tarBytes: layerBytes, skeletons, unused: unused.length, unusedBytes: unused.reduce((n, d) => n + sizeOf(d), 0),
    },
    blobs: { count: blobs.length, bytes: blobBytes },
    objects: { count: objects.length, bytes: objectBytes, savedByDedup },
    snapshots: { count: [...snapshotUses.values()].reduce((n, c) => n + c, 0) },
    referencedBytes,
    savedBySharing: referencedBytes - usedLayerBytes,
    images,
  };
}
