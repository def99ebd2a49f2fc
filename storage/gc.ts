/**
 * Removing images and collecting garbage. Content goes only when no image
 * record refers to it any more; the rows go in one write transaction and the
 * files are moved aside inside it, then deleted, so a crash half-way leaves
 * either the old state or orphans that recovery removes.
 */
import { readFileSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type Digest } from './digest.js';
import { type LayerIndex } from './layerIndex.js';
import { listObjects, objectSize, removeObject } from './objectStore.js';
import { formatRef, parseImageRef, splitNameTag } from './references.js';
import { snapshotBlobRefs, snapshotLayerRefs } from './snapshots.js';
import { type Store } from './store.js';

export interface RemoveResult {
  untagged: string[];
  deleted: Digest[];
  gc: GcResult;
}

export interface GcResult {
  blobs: Digest[];
  layers: Digest[];
  /** How many file objects (storage/objectStore.ts) no stored layer names any more were removed. */
  objects: number;
  bytes: number;
}

/** Give an existing image another NAME:TAG. */
export function tagImage(store: Store, source: string, target: string): { id: Digest; ref: string } {
  const image = store.resolveImage(source);
  const { name, tag } = splitNameTag(target);
  store.db.write(() => store.db.setTag(name, tag, image.id));
  return { id: image.id, ref: formatRef(name, tag) };
}

/**
 * `rmi`: by NAME:TAG removes that tag (and the image once no tag is left);
 * by digest removes the image and its tags, refusing an image with several
 * tags unless forced, as Docker does.
 */
export async function removeImage(store: Store, ref: string, options: { force?: boolean } = {}): Promise<RemoveResult> {
  const image = store.resolveImage(ref);
  const parsed = parseImageRef(ref);
  const tags = store.db.tagsOf(image.id);
  const byTag = parsed.kind === 'tag' && tags.some((t) => t.name === parsed.name && t.tag === parsed.tag);
  if (!byTag && tags.length > 1 && !options.force) {
    throw new LayerdError(
      ErrorCodes.ECONFLICT,
      `image ${image.id} is tagged ${tags.map((t) => formatRef(t.name, t.tag)).join(', ')}; remove by tag or force`,
      { image: image.id },
    );
  }
  const untagged: string[] = [];
  const deleted: Digest[] = [];
  const lastTag = byTag && tags.length === 1;
  const users = store.db.containersOfImage(image.id);
  if ((lastTag || !byTag) && users.length > 0) {
    throw new LayerdError(ErrorCodes.ECONFLICT, `image ${image.id} is used by container(s) ${users.map((c) => c.id).join(', ')}`, { image: image.id });
  }
  store.db.write(() => {
    if (byTag && parsed.kind === 'tag') {
      store.db.deleteTag(parsed.name, parsed.tag);
      untagged.push(formatRef(parsed.name, parsed.tag));
      if (store.db.tagsOf(image.id).length > 0) return;
    } else {
      untagged.push(...tags.map((t) => formatRef(t.name, t.tag)));
    }
    store.db.deleteImage(image.id);
    deleted.push(image.id);
  });
  return { untagged, deleted, gc: await collectGarbage(store) };
}

/** `prune`: drop images no tag names, then everything nothing refers to. */
export async function prune(store: Store): Promise<{ images: Digest[]; gc: GcResult; tmpDirs: number }> {
  const images: Digest[] = [];
  store.db.write(() => {
    for (const row of store.db.untaggedImages()) {
      store.db.deleteImage(row.id);
      images.push(row.id);
    }
  });
  const recovered = await store.recover();
  return { images, gc: await collectGarbage(store), tmpDirs: recovered.tmpDirs };
}

export async function collectGarbage(store: Store): Promise<GcResult> {
  const workDir = await store.newWorkDir();
  const result: GcResult = { blobs: [], layers: [], objects: 0, bytes: 0 };
  try {
    let n = 0;
    store.db.write(() => {
      const blobs = store.db.referencedBlobs();
      for (const d of snapshotBlobRefs(store.db)) blobs.add(d); // original blobs of committed containerd snapshots' layers
      const layers = store.db.referencedLayers();
      for (const d of snapshotLayerRefs(store.db)) layers.add(d); // committed containerd snapshots
      for (const row of store.db.listBlobs()) {
        if (blobs.has(row.digest)) continue;
        store.db.deleteBlob(row.digest);
        renameSync(store.layout.blobPath(row.digest), join(workDir, String(n++)));
        result.blobs.push(row.digest);
        result.bytes += row.size;
      }
      for (const row of store.db.listLayers()) {
        if (layers.has(row.diff_id)) continue;
        if (store.db.getLazyLayer(row.diff_id)) {
          // Still lazy: its directory is the lazy one (a fill running now finds its row gone and gives up).
          store.db.deleteLazyLayer(row.diff_id);
          store.db.deleteLayer(row.diff_id);
          renameSync(store.layout.lazyLayerDir(row.diff_id), join(workDir, String(n++)));
        } else {
          store.db.deleteLayer(row.diff_id);
          renameSync(store.layout.layerDir(row.diff_id), join(workDir, String(n++)));
        }
        store.forgetLayerIndex(row.diff_id);
        result.layers.push(row.diff_id);
        result.bytes += row.file_bytes;
      }
    });
  } finally {
    await store.releaseWorkDir(workDir);
  }
  const objects = await collectObjects(store);
  result.objects = objects.count;
  result.bytes += objects.bytes;
  return result;
}

/**
 * Remove the file objects no layer's index names (a lazy layer's too: its
 * fetched files become objects, storage/lazy/lazyLayer.ts): mark (every
 * layer's index) and sweep, the sweep inside a write transaction. Objects
 * have no rows (an object's name is its content), but an import renames the
 * objects of a skeleton layer into place inside the transaction that adds
 * the layer's row (Store.commit), so no commit can slip in between the last
 * look at the layers and the removals: layers whose rows appeared since the
 * first (asynchronous) pass are read again in the transaction. A crash half
 * way leaves only unnamed objects, which the next GC removes. A mount host's
 * open descriptors of a removed object keep working.
 */
async function collectObjects(store: Store): Promise<{ count: number; bytes: number }> {
  const named = new Set<string>();
  const seen = new Set<string>();
  const mark = (index: LayerIndex): void => {
    for (const entry of index.entries) if (entry.digest !== undefined) named.add(entry.digest);
  };
  for (const row of store.db.listLayers()) {
    try {
      mark(await store.layerIndex(row.diff_id));
    } catch {
      return { count: 0, bytes: 0 }; // what it names cannot be known: keep every object (fsck reports the layer)
    }
    seen.add(row.diff_id);
  }
  let count = 0;
  let bytes = 0;
  store.db.write(() => {
    for (const row of store.db.listLayers()) {
      if (seen.has(row.diff_id)) continue;
      try {
        // Synchronous on purpose: inside the transaction, so that no commit comes between.
        mark(JSON.parse(readFileSync(join(store.layerDirFor(row.diff_id), 'index.json'), 'utf8')) as LayerIndex);
      } catch {
        return; // unreadable: keep every object (fsck reports the layer)
      }
    }
    for (const digest of listObjects(store.layout.root)) {
      if (named.has(digest)) continue;
      const size = objectSize(store.layout.root, digest);
      if (removeObject(store.layout.root, digest)) {
        count++;
        bytes += size;
      }
    }
  });
  return { count, bytes };
}
