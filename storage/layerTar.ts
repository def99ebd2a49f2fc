/**
 * A stored layer's uncompressed tar as a stream, whichever way the layer is
 * kept: `layer.tar` read as it is, or a skeleton with its objects spliced
 * back in (storage/tarSkeleton.ts). Its sha256 is the layer's diffID (fsck
 * checks it; push compresses it when the original blob is gone).
 */
import { createReadStream } from 'node:fs';
import { join } from 'node:path';
import { type Readable } from 'node:stream';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type Digest } from './digest.js';
import { type LayerIndex } from './layerIndex.js';
import { ObjectStore, objectRelPath } from './objectStore.js';
import { INLINE_FILE, SKELETON_FILE, type SkeletonParts, layerTarStream } from './tarSkeleton.js';
import { type Store } from './store.js';

/** The parts of a skeleton layer in `layerDir`, its objects in `objects`. */
export function skeletonParts(objects: ObjectStore, layerDir: string): SkeletonParts {
  return {
    skeletonPath: join(layerDir, SKELETON_FILE),
    inlinePath: join(layerDir, INLINE_FILE),
    openObject: (digest) => {
      const rel = objectRelPath(digest);
      if (rel === undefined) throw new LayerdError(ErrorCodes.ECORRUPT, `layer skeleton names ${digest}, not an object`, { digest });
      try {
        return objects.openInStore(rel);
      } catch (err) {
        throw new LayerdError(ErrorCodes.ECORRUPT, `object ${digest} of a layer is missing or unreadable: ${(err as Error).message}`, { digest }, { cause: err });
      }
    },
  };
}

/** The exact tar bytes of a stored (complete) layer. */
export function openLayerTar(store: Store, diffId: Digest, index: LayerIndex): Readable {
  if (index.storage === 'skeleton') return layerTarStream(skeletonParts(store.objects, store.layout.layerDir(diffId)));
  return createReadStream(store.layout.layerTarPath(diffId), { highWaterMark: 1024 * 1024 });
}
