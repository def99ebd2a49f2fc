/**
 * `pullLayer`: one layer blob from a registry into the store, as a layer of
 * no image (the containerd snapshotter's self-fetching path: containerd names
 * a layer by its distribution digest and image reference, and layerd fetches
 * it instead of containerd). The blob is streamed through the same one-pass
 * ingest as a pull (digest checked, decompressed, indexed, resumable
 * download, mirrors, auth); only the layer is kept, not the compressed blob.
 *
 * `options.accept` runs inside the write transaction that makes the layer
 * visible: a caller records what uses the layer in the same step (so no GC
 * can find it unused in between), or throws to refuse it (then nothing is
 * stored).
 */
import { mkdir } from 'node:fs/promises';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, isDigest } from '../digest.js';
import { Transaction } from '../importer.js';
import { ingestLayer } from '../layerIngest.js';
import { type MetadataDb } from '../metadata.js';
import { MediaTypes } from '../oci.js';
import { type Store } from '../store.js';
import { type RetryPolicy } from './client.js';
import { type RegistriesConfig } from './config.js';
import { parseRegistryRef } from './reference.js';
import { RegistrySource } from './source.js';
import { DEFAULT_TIMEOUTS, type RegistryTimeouts, withDeadline } from './timeouts.js';

export interface PullLayerOptions {
  config?: RegistriesConfig;
  retry?: RetryPolicy;
  timeouts?: RegistryTimeouts;
  signal?: AbortSignal;
  accept?: (db: MetadataDb, diffId: Digest) => void;
}

export interface PulledLayer {
  diffId: Digest;
  /** Bytes of the compressed blob read from the registry. */
  blobBytes: number;
  /** Whether the store had the layer already (nothing new was stored). */
  existed: boolean;
}

/**
 * Fetch blob `digest` of the repository `reference` names (its tag or digest
 * does not matter) and store it as a layer.
 */
export async function pullLayer(
  store: Store, reference: string, digest: Digest, options: PullLayerOptions = {},
): Promise<PulledLayer> {
  if (!isDigest(digest)) throw new LayerdError(ErrorCodes.EINVAL, `not a layer digest: ${JSON.stringify(digest)}`, { digest });
  const ref = parseRegistryRef(reference);
  const timeouts = options.timeouts ?? DEFAULT_TIMEOUTS;
  const deadline = withDeadline(options.signal, timeouts.totalMs);
  let source: RegistrySource | undefined;
  const workDir = await store.newWorkDir();
  try {
    source = await RegistrySource.open(ref, {
      ...(options.config ? { config: options.config } : {}),
      ...(options.retry ? { retry: options.retry } : {}),
      transfer: { timeouts, signal: deadline.signal },
    });
    const opened = source;
    const tx = new Transaction(store, workDir);
    const dir = tx.nextDir();
    await mkdir(dir);
    const ingested = await ingestLayer(() => opened.openBlob(digest), { digest }, {
      workDir: dir, unpack: true, flushEarly: store.durable, disk: tx.disk,
    });
    delete ingested.blobPath; // the layer keeps layer.tar; the compressed blob is not needed
    const existed = store.db.getLayer(ingested.diffId) !== undefined;
    if (existed) {
      delete ingested.layerDir;
      delete ingested.index;
    }
    tx.stageLayer(ingested, MediaTypes.ociLayer);
    await store.commit(workDir, tx.staged, (db) => {
      for (const [diffId, l] of tx.layers) db.putLayer({ diff_id: diffId, size: l.size, file_bytes: l.fileBytes, entries: l.entries });
      options.accept?.(db, ingested.diffId);
    });
    return { diffId: ingested.diffId, blobBytes: ingested.size, existed };
  } finally {
    deadline.dispose();
    await source?.close();
    await store.releaseWorkDir(workDir);
  }
}
