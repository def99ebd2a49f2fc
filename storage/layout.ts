/**
 * Where things live under a store root. Only this module (and objectStore.ts,
 * for objects/) builds paths inside the store; every name it builds comes
 * from a validated digest or from an id layerd generated itself, never from
 * archive content.
 *
 *   <root>/metadata.db              image records, tags, layer and blob records
 *   <root>/blobs/sha256/<hex>       blobs by distribution digest (layers, configs, manifests)
 *   <root>/layers/sha256/<hex>/     layers by diffID: layer.tar (sha256 = diffID) + index.json
 *   <root>/objects/sha256/<xx>/<hex> regular files' bytes by sha256 (storage/objectStore.ts builds these
 *                                   names, relative to the root, for openat2 beneath it)
 *   <root>/lazy/sha256/<hex>/       layers pulled lazily, by diffID: index.json + lazy.json + content (docs/lazy.md)
 *   <root>/lazy/stats/              lazy-read counters of the processes serving them (for /metrics)
 *   <root>/tmp/<pid>-<rand>/        ingest area: becomes visible only by rename
 *   <root>/containers/<id>/         a container's writable layer (upper/) and FUSE statistics
 *   <root>/hosts/<key>.{sock,log}   mount hosts: one process per layer stack serving its mounts
 */
import { join } from 'node:path';
import { type Digest, digestHex } from './digest.js';
import { LAYER_TAR } from './layerIndex.js';

export const DEFAULT_ROOT = '/var/lib/layerd';

export class StoreLayout {
  constructor(readonly root: string) {}

  get metadataDb(): string { return join(this.root, 'metadata.db'); }
  get blobsDir(): string { return join(this.root, 'blobs', 'sha256'); }
  get layersDir(): string { return join(this.root, 'layers', 'sha256'); }
  get tmpDir(): string { return join(this.root, 'tmp'); }
  get lazyDir(): string { return join(this.root, 'lazy', 'sha256'); }
  /** Lazy-read counters of the processes serving lazy layers (storage/lazy/lazyLayer.ts lazyStatsDir: the same place). */
  get lazyStatsDir(): string { return join(this.root, 'lazy', 'stats'); }
  /** Where processes serving lazy layers say that reads wait (storage/lazy/readDemand.ts demandDirOf: the same place). */
  get lazyDemandDir(): string { return join(this.root, 'lazy', 'demand'); }

  get containersDir(): string { return join(this.root, 'containers'); }
  containerDir(id: string): string { return join(this.containersDir, id); }
  hostsDir(): string { return join(this.root, 'hosts'); }

  blobPath(digest: Digest): string { return join(this.blobsDir, digestHex(digest)); }
  layerDir(diffId: Digest): string { return join(this.layersDir, digestHex(diffId)); }
  lazyLayerDir(diffId: Digest): string { return join(this.lazyDir, digestHex(diffId)); }
  layerIndexPath(diffId: Digest): string { return join(this.layerDir(diffId), 'index.json'); }
  layerTarPath(diffId: Digest): string { return join(this.layerDir(diffId), LAYER_TAR); }
}

/** The root from --root, then LAYERD_ROOT, then the default. */
export function resolveRoot(flag?: string): string {
  return flag ?? process.env['LAYERD_ROOT'] ?? DEFAULT_ROOT;
}
