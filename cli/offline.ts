/**
 * The offline backend: the CLI works on a store directly, for debugging a
 * store with no daemon. It refuses (EBUSY) while a daemon holds the store.
 */
import { type Logger } from '../common/log.js';
import { fsck } from '../storage/fsck.js';
import { prune, removeImage, tagImage } from '../storage/gc.js';
import { importFromSource, importRawLayer, type ImportProgress } from '../storage/importer.js';
import { parsePlatform } from '../storage/platform.js';
import { detectSource } from '../storage/sources/detect.js';
import { Store } from '../storage/store.js';
import { inspectImage, listImages, listLayers } from '../storage/views.js';
import { type Backend, type ImportRequest } from './backend.js';

export async function openOfflineBackend(root: string, logger: Logger): Promise<Backend> {
  const store = await Store.open(root, { logger });
  return {
    async importPath(request: ImportRequest, onProgress?: (event: ImportProgress) => void) {
      const options = {
        ...(request.platform ? { platform: parsePlatform(request.platform) } : {}),
        ...(onProgress ? { onProgress } : {}),
      };
      const detected = await detectSource(request.path, {
        ...(request.name ? { name: request.name } : {}),
        ...(request.format ? { format: request.format } : {}),
      });
      if (detected.kind === 'layer') return importRawLayer(store, detected.path, detected.name, options);
      try {
        return await importFromSource(store, detected.source, options);
      } finally {
        await detected.source.close();
      }
    },
    images: async () => listImages(store),
    layers: async () => listLayers(store),
    inspect: (ref) => inspectImage(store, ref),
    tag: async (source, target) => tagImage(store, source, target),
    removeImage: (ref, force) => removeImage(store, ref, { force }),
    prune: () => prune(store),
    fsck: () => fsck(store),
    close: async () => store.close(),
  };
}
