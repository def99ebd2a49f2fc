/**
 * The background fill of a lazily pulled layer: fetch the whole blob (with
 * resume), verify its distribution digest and diffID and index it exactly
 * as a full pull does (layerIngest.ts), then, in one commit, make it an
 * ordinary stored layer (blob row, layers/ directory, sizes) and remove its
 * lazy directory. Processes serving the lazy directory keep their open
 * content file (lazyLayer.ts); new mounts use the complete layer.
 *
 * `LazyFills` runs the fills of a daemon: one per layer at a time, retried
 * with backoff while the registry cannot be reached (so a fill resumes when
 * it returns), and started again for every unfinished layer when the daemon
 * starts. A blob that does not verify marks the layer broken.
 *
 * What the processes serving the layer fetched is not downloaded again: they
 * keep the compressed bytes of every chunk they verified in the lazy
 * directory (`blob`, sparse, and the ranges in `fetched`: lazyLayer.ts), and
 * the fill reads those ranges from there and asks the registry only for the
 * gaps. They are a hint, verified with the rest (the whole blob's digest,
 * the diffID): if the blob does not verify with them, it is downloaded once
 * more without them before the layer is called broken.
 */
import { mkdir, open, readFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCodes, LayerdError, isLayerdError } from '../../common/errors.js';
import { type Logger, silentLogger } from '../../common/log.js';
import { type Digest } from '../digest.js';
import { ingestLayer } from '../layerIngest.js';
import { repositoryScope } from '../registry/auth.js';
import { RegistryClient } from '../registry/client.js';
import { EMPTY_CONFIG, type RegistriesConfig, endpointsFor, loadRegistriesConfig } from '../registry/config.js';
import { type FetchGate, type LocalBlobBytes, ResumableBlobStream } from '../registry/download.js';
import { DEFAULT_TIMEOUTS, type RegistryTimeouts } from '../registry/timeouts.js';
import { type Store } from '../store.js';
import { GZIP_INDEX_FORMAT, checkGzipFileTable } from './gzipLazy.js';
import { LAZY_BLOB, LAZY_FETCHED, readLazyInfo } from './lazyLayer.js';

export interface FillOptions {
  config?: RegistriesConfig;
  timeouts?: RegistryTimeouts;
  signal?: AbortSignal;
  /** How often progress is written to the database (default 500 ms). */
  progressIntervalMs?: number;
  /** Closed while on-demand reads wait (readDemand.ts): the download pauses, reads get the link. */
  gate?: FetchGate;
  /** The blob did not verify with the bytes the serving processes kept: it is downloaded again without them. */
  onKeptBytesRejected?: (err: unknown) => void;
}

/**
 * The blob bytes the serving processes kept (lazyLayer.ts): `fetched`'s
 * ranges, merged, read from `blob`; undefined if there are none.
 */
export async function keptBlobBytes(lazyDir: string, size: number): Promise<(LocalBlobBytes & { close(): Promise<void> }) | undefined> {
  const text = await readFile(join(lazyDir, LAZY_FETCHED), 'utf8').catch(() => '');
  const ranges: [number, number][] = [];
  for (const line of text.split('\n')) {
    const m = /^(\d+) (\d+)$/.exec(line);
    if (!m) continue; // (a line cut short by a crash)
    const [start, end] = [Number(m[1]), Math.min(size, Number(m[2]))];
    if (Number.isSafeInteger(start) && start < end) ranges.push([start, end]);
  }
  ranges.sort((a, b) => a[0] - b[0]);
  const merged: [number, number][] = [];
  for (const [start, end] of ranges) {
    const last = merged[merged.length - 1];
    if (last !== undefined && start <= last[1]) last[1] = Math.max(last[1], end);
    else merged.push([start, end]);
  }
  if (merged.length === 0) return undefined;
  const file = await open(join(lazyDir, LAZY_BLOB), 'r').catch(() => undefined);
  if (file === undefined) return undefined;
  return {
    size, ranges: merged,
    read: async (position, length) => {
      const bytes = Buffer.alloc(length);
      const { bytesRead } = await file.read(bytes, 0, length, position);
      if (bytesRead !== length) throw new LayerdError(ErrorCodes.EIO, `${join(lazyDir, LAZY_BLOB)}: ${bytesRead} bytes at ${position}, not ${length}`);
      return bytes;
    },
    close: () => file.close(),
  };
}

function isBadBlob(err: unknown): boolean {
  return isLayerdError(err, ErrorCodes.EDIGEST) || isLayerdError(err, ErrorCodes.EBADTAR) || isLayerdError(err, ErrorCodes.ECORRUPT);
}

/** Fill one lazy layer; resolves once it is an ordinary stored layer (or was already). */
export async function fillLazyLayer(store: Store, diffId: Digest, options: FillOptions = {}): Promise<void> {
  const row = store.db.getLazyLayer(diffId);
  if (!row) return;
  const lazyDir = store.layout.lazyLayerDir(diffId);
  const info = await readLazyInfo(lazyDir);
  const config = options.config ?? (info.registriesConfig ? await loadRegistriesConfig(info.registriesConfig) : EMPTY_CONFIG);
  const clients = (await endpointsFor(config, info.registry, true)).map((e) => new RegistryClient(e, undefined, {
    timeouts: options.timeouts ?? DEFAULT_TIMEOUTS, ...(options.signal ? { signal: options.signal } : {}),
  }));
  const workDir = await store.newWorkDir();
  let filled = 0;
  let written = 0;
  const interval = options.progressIntervalMs ?? 500;
  const writeProgress = (): void => {
    if (store.db.getLazyLayer(diffId)) store.db.write(() => store.db.setLazyState(diffId, 'filling', filled));
    written = Date.now();
  };
  let kept: Awaited<ReturnType<typeof keptBlobBytes>>;
  try {
    kept = await keptBlobBytes(lazyDir, info.blobSize);
    writeProgress();
    const ingest = async (local: LocalBlobBytes | undefined): Promise<Awaited<ReturnType<typeof ingestLayer>>> => {
      const dir = join(workDir, local ? 'fill-kept' : 'fill');
      await mkdir(dir);
      return ingestLayer(
        async () => new ResumableBlobStream(clients, info.repository, info.blobDigest, [repositoryScope(info.repository, 'pull')], options.gate, local),
        { digest: info.blobDigest, size: info.blobSize, diffId },
        {
          workDir: dir, unpack: true, flushEarly: store.durable,
          onProgress: (bytes) => {
            filled = bytes;
            if (Date.now() - written >= interval) writeProgress();
          },
        },
      );
    };
    let ingested: Awaited<ReturnType<typeof ingestLayer>>;
    try {
      ingested = await ingest(kept);
    } catch (err) {
      // Kept bytes may be wrong (a crash between their write and their record) whatever the failure says — a digest, a
      // broken deflate stream or tar: once more, all from the registry (a network failure fails again, and is retried later).
      if (kept === undefined || options.signal?.aborted) throw err;
      options.onKeptBytesRejected?.(err);
      ingested = await ingest(undefined);
    }
    if (info.format === GZIP_INDEX_FORMAT) await checkGzipFileTable(lazyDir, ingested.index!);
    const trash = join(workDir, 'lazy-trash');
    await store.commit(workDir, [
      ...(store.db.getBlob(info.blobDigest) ? [] : [{ kind: 'blob' as const, digest: info.blobDigest, path: ingested.blobPath! }]),
      { kind: 'layer', diffId, path: ingested.layerDir! },
    ], (db) => {
      if (!db.getLazyLayer(diffId)) throw new LayerdError(ErrorCodes.ECONFLICT, `layer ${diffId} is no longer lazy (removed?)`, { diffId });
      db.putBlob({ digest: info.blobDigest, size: info.blobSize, media_type: info.mediaType });
      db.setLayerSizes(diffId, ingested.diffSize, ingested.fileBytes, ingested.index!.entries.length);
      db.completeLazyLayer(diffId, info.blobDigest);
    });
    store.forgetLayerIndex(diffId);
    // Out of the store now; open content files stay readable to the processes that have them.
    await rename(lazyDir, trash).catch(() => undefined);
  } finally {
    await kept?.close().catch(() => undefined);
    for (const c of clients) c.close();
    await store.releaseWorkDir(workDir);
  }
}

/**
 * If `err` says the blob itself is bad (does not verify, broken tar), mark the
 * layer broken and return its message; other failures (the network) are left
 * for a later attempt: undefined.
 */
export function markBrokenIfBadBlob(store: Store, diffId: Digest, err: unknown): string | undefined {
  if (!isBadBlob(err)) return undefined;
  const message = err instanceof Error ? err.message : String(err);
  if (store.db.getLazyLayer(diffId)) store.db.write(() => store.db.setLazyState(diffId, 'broken', 0, message));
  return message;
}

/** The daemon's background fills. */
export class LazyFills {
  private readonly running = new Map<Digest, Promise<void>>();
  private readonly controller = new AbortController();

  constructor(
    private readonly store: Store,
    private readonly options: { config: () => Promise<RegistriesConfig>; timeouts?: RegistryTimeouts; logger?: Logger; maxBackoffMs?: number; gate?: FetchGate },
  ) {}

  private get logger(): Logger { return this.options.logger ?? silentLogger(); }

  /** Start (or keep) the fill of every lazy layer not marked broken: after a pull, and when the daemon starts. */
  resume(): void {
    for (const row of this.store.db.listLazyLayers()) if (row.state !== 'broken') this.start(row.diff_id);
  }

  start(diffId: Digest): Promise<void> {
    let work = this.running.get(diffId);
    if (work === undefined) {
      work = this.run(diffId).finally(() => this.running.delete(diffId));
      this.running.set(diffId, work);
    }
    return work;
  }

  /** Resolves when the fill of `diffId` (if any) has ended. */
  async settled(diffId: Digest): Promise<void> {
    await this.running.get(diffId)?.catch(() => undefined);
  }

  async stop(): Promise<void> {
    this.controller.abort({ kind: 'cancelled', why: 'the daemon is stopping' });
    await Promise.allSettled([...this.running.values()]);
  }

  private async run(diffId: Digest): Promise<void> {
    const maxBackoff = this.options.maxBackoffMs ?? 30_000;
    for (let attempt = 0; !this.controller.signal.aborted; attempt++) {
      try {
        await fillLazyLayer(this.store, diffId, {
          config: await this.options.config(), signal: this.controller.signal,
          ...(this.options.timeouts ? { timeouts: this.options.timeouts } : {}),
          ...(this.options.gate ? { gate: this.options.gate } : {}),
          onKeptBytesRejected: (err) => this.logger.warn('lazy layer fill: the blob does not verify with the bytes reads kept; downloading it whole', { diffId, error: String(err) }),
        });
        this.logger.info('lazy layer complete', { diffId });
        return;
      } catch (err) {
        if (this.controller.signal.aborted || !this.store.db.getLazyLayer(diffId)) return;
        const message = markBrokenIfBadBlob(this.store, diffId, err);
        if (message !== undefined) {
          this.logger.error('lazy layer broken: its blob does not verify', { diffId, error: message });
          return;
        }
        const wait = Math.min(maxBackoff, 500 * 2 ** Math.min(attempt, 10));
        this.logger.warn('lazy layer fill failed; retrying', { diffId, error: String(err), retryInMs: wait });
        try {
          await sleep(wait, undefined, { signal: this.controller.signal });
        } catch {
          return;
        }
      }
    }
  }
}
