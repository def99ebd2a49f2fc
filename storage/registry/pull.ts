/**
 * `pull`: import an image from a registry into the store, through the same
 * importer as local imports (platform choice, verification, one commit).
 * Blobs the store already has are read from the store, not the registry.
 */
import { type ImportProgress, type ImportedImage, importFromSource } from '../importer.js';
import { type PlatformSpec } from '../platform.js';
import { type Store } from '../store.js';
import { type RetryPolicy } from './client.js';
import { type RegistriesConfig } from './config.js';
import { RegistrySource } from './source.js';

export interface PullOptions {
  platform?: PlatformSpec;
  config?: RegistriesConfig;
  onProgress?: (event: ImportProgress) => void;
  /** Layers downloaded at once (default 3). */
  concurrency?: number;
  retry?: RetryPolicy;
}

export const DEFAULT_PULL_CONCURRENCY = 3;

export async function pullImage(store: Store, reference: string, options: PullOptions = {}): Promise<ImportedImage[]> {
  const source = await RegistrySource.open(reference, {
    ...(options.config ? { config: options.config } : {}),
    ...(options.retry ? { retry: options.retry } : {}),
    localBlob: async (digest) => (store.db.getBlob(digest) ? store.readBlob(digest) : undefined),
  });
  try {
    return await importFromSource(store, source, {
      ...(options.platform ? { platform: options.platform } : {}),
      ...(options.onProgress ? { onProgress: options.onProgress } : {}),
      concurrency: options.concurrency ?? DEFAULT_PULL_CONCURRENCY,
    });
  } finally {
    await source.close();
  }
}
