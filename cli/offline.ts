/**
 * The offline backend: the CLI works on a store directly, for debugging a
 * store with no daemon. It refuses (EBUSY) while a daemon holds the store.
 */
import { type Logger } from '../common/log.js';
import { commitLayerDirectory } from '../mount/directoryLayer.js';
import { StoreOperations } from '../storage/operations.js';
import { Store } from '../storage/store.js';
import { type Backend } from './backend.js';

export async function openOfflineBackend(root: string, logger: Logger): Promise<Backend> {
  const store = await Store.open(root, { logger });
  const ops = new StoreOperations(store);
  return {
    importPath: (request, onProgress) => ops.importPath(request, onProgress),
    images: () => ops.images(),
    layers: () => ops.layers(),
    diskUsage: () => ops.diskUsage(),
    inspect: (ref) => ops.inspect(ref),
    tag: (source, target) => ops.tag(source, target),
    removeImage: (ref, force) => ops.removeImage(ref, force),
    prune: () => ops.prune(),
    fsck: () => ops.fsck(),
    which: (ref, path) => ops.which(ref, path),
    history: (ref) => ops.history(ref),
    layerDiff: (ref, layer) => ops.layerDiff(ref, layer),
    tree: (ref, path, depth) => ops.tree(ref, path, depth),
    efficiency: (ref) => ops.efficiency(ref),
    report: (ref) => ops.report(ref),
    commitLayerDir: (image, dir, ref) => commitLayerDirectory(store, image, dir, ref !== undefined ? { ref } : {}),
    close: async () => store.close(),
  };
}
