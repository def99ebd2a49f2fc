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
import { DEFAULT_TIMEOUTS, type RegistryTimeouts, withDeadline } from './timeouts.js';

export interface PullOptions {
  platform?: PlatformSpec;
  config?: RegistriesConfig;
  onProgress?: (event: ImportProgress) => void;
  /** Layers downloaded at once (default 3). */
  concurrency?: number;
  retry?: RetryPolicy;
  /** Connect, idle and overall limits (default DEFAULT_TIMEOUTS). */
  timeouts?: RegistryTimeouts;
  /**
   * Aborting it (with an AbortCause as reason) stops every download at
   * once; the pull then fails and its ingest directory is removed.
   */
  signal?: AbortSignal;
}

export const DEFAULT_PULL_CONCURRENCY = 3;

/**
 * The registry source of a pull, under the pull's overall deadline (whose
 * timer the caller disposes when the pull ends); blobs the store already
 * has are read from it instead of fetched.
 */
export async function openPullSource(
  store: Store, reference: string, options: PullOptions,
): Promise<{ source: RegistrySource; deadline: { signal: AbortSignal; dispose(): void } }> {
  const timeouts = options.timeouts ?? DEFAULT_TIMEOUTS;
  const deadline = withDeadline(options.signal, timeouts.totalMs);
  try {
    const source = await RegistrySource.open(reference, {
      ...(options.config ? { config: options.config } : {}),
      ...(options.retry ? { retry: options.retry } : {}),
      transfer: { timeouts, signal: deadline.signal },
      localBlob: async (digest) => (store.db.getBlob(digest) ? store.readBlob(digest) : undefined),
    });
    return { source, deadline };
  } catch (err) {
    deadline.dispose();
    throw err;
  }
}

export async function pullImage(store: Store, reference: string, options: PullOptions = {}): Promise<ImportedImage[]> {
  const { source, deadline } = await openPullSource(store, reference, options);
  try {
    return await importFromSource(store, source, {
      ...(options.platform ? { platform: options.platform } : {}),
      ...(options.onProgress ? { onProgress: options.onProgress } : {}),
      concurrency: options.concurrency ?? DEFAULT_PULL_CONCURRENCY,
    });
  } finally {
    deadline.dispose();
    await source.close();
  }
}
