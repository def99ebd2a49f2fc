/**
 * Mount a union of layers + upper dir with FUSE in this process, and notice
 * when it goes away (our own unmount, or someone running `umount` on it).
 */
import { silentLogger, type Logger } from '../common/log.js';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import type { LayerSource } from '../storage/layerIndex.js';
import { clearDeadMount, findMount, isDeadMount, parseMountinfo } from './deadMount.js';
import { readFile } from 'node:fs/promises';
import { LayerdFuse } from './fuseAdapter.js';
import { KernelFuse } from './kernelFuse.js';
import { LiveLayer } from './liveLayer.js';
import type { LowerMergeCache } from './lowerMerges.js';
import { UnionFs } from './unionFs.js';
import type { OpStats } from './opStats.js';
import { resolve } from 'node:path';
import { isWithin } from './paths.js';

export interface MountUnionOptions {
  /** Layers bottom → top. */
  layers: LayerSource[];
  upper: string;
  mountpoint: string;
  readOnly?: boolean;
  logger?: Logger;
  /** Kernel name/attribute cache lifetime in seconds (default 60 read-only, 1 writable). */
  cacheSeconds?: number;
  /** Where to count operations and their latencies. */
  stats?: OpStats;
  /** A host directory served as the top read-only layer and kept current as it changes. */
  liveLayer?: string;
  /** Merges of lower layers kept between mounts of the same layers (not used with a live layer, whose layers change). */
  lowerMerges?: LowerMergeCache;
}

export interface MountedUnion {
  readonly mountpoint: string;
  /** Unmount (idempotent); resolves once the mount is gone. */
  unmount(): Promise<void>;
  /** Resolves when the mount disappears, whoever unmounted it. */
  readonly gone: Promise<void>;
}

const POLL_MS = 500;
const LIVE_CACHE_SECONDS = 0.25;
/**
 * Served over /dev/fuse directly (kernelFuse.ts), nothing changes behind the
 * kernel of a mount without a live layer: it may cache for long.
 */
const KERNEL_CACHE_SECONDS = 3600;

export type FuseBinding = 'kernel' | 'libfuse2';

/**
 * Which FUSE implementation serves mounts: layerd's own /dev/fuse session
 * needs root (it mounts with mount(8)); fuse-native (libfuse 2) works for
 * others through fusermount. LAYERD_FUSE=libfuse2 forces the latter (benchmarks
 * compare the two).
 */
export function fuseBinding(): FuseBinding {
  if (process.env['LAYERD_FUSE'] === 'libfuse2') return 'libfuse2';
  return process.getuid?.() === 0 ? 'kernel' : 'libfuse2';
}

/** A mounted FUSE connection, whichever binding serves it. */
interface Served {
  unmount(): Promise<void>;
  /** Resolves when the connection ends on its own (kernel binding only). */
  closed?: Promise<void>;
}

export async function mountUnion(options: MountUnionOptions): Promise<MountedUnion> {
  const logger = options.logger ?? silentLogger();
  const mountpoint = resolve(options.mountpoint);
  const readOnly = options.readOnly ?? false;
  const upper = resolve(options.upper);
  // The server must never do I/O on its own mount (it would wait on itself).
  if (isWithin(upper, mountpoint) || isWithin(mountpoint, upper)) {
    throw new LayerdError(ErrorCodes.EINVAL, 'the upper dir and the mountpoint must not contain each other', { upper, mountpoint });
  }

  if (await isDeadMount(mountpoint)) {
    logger.warn('clearing a dead mount left at the mountpoint', { mountpoint });
    await clearDeadMount(mountpoint);
  }
  const started = performance.now();
  let union: UnionFs | undefined;
  const live = options.liveLayer === undefined ? undefined : await LiveLayer.start(options.liveLayer, async (source) => {
    await union?.replaceLayers([...options.layers, source]);
    logger.debug('live layer changed', { dir: options.liveLayer, entries: source.index.entries.length });
  }, logger);
  try {
    union = await UnionFs.create(live
      ? { layers: [...options.layers, live.source], upper, readOnly }
      : { layers: options.layers, upper, readOnly, ...(options.lowerMerges ? { lowerMerges: options.lowerMerges } : {}) });
  } catch (err) {
    await live?.close();
    throw err;
  }
  const merged = performance.now();
  if (union.skippedEntries > 0) logger.warn('index entries ignored while merging', { count: union.skippedEntries });
  // A live layer changes under the kernel's caches: keep them short, so an edit shows within a second.
  const cacheSeconds = options.cacheSeconds ?? (live ? LIVE_CACHE_SECONDS : undefined);
  let served: Served;
  try {
    served = fuseBinding() === 'kernel'
      ? await mountKernel(mountpoint, union, { readOnly, live: live !== undefined, cacheSeconds, logger, stats: options.stats })
      : await mountLibfuse2(mountpoint, union, { readOnly, live: live !== undefined, cacheSeconds, logger, stats: options.stats });
  } catch (err) {
    await live?.close();
    throw err;
  }
  const mergedUnion = union;
  logger.info('mounted', {
    mountpoint, layers: options.layers.length, readOnly, ...(live ? { liveLayer: live.dir } : {}),
    mergeMs: Math.round(merged - started), serveMs: Math.round(performance.now() - merged),
  });

  let markGone!: () => void;
  const gone = new Promise<void>((done) => { markGone = done; });
  let isGone = false;
  const stopWatching = served.closed ? () => undefined : watchMountGone(mountpoint, () => finish());
  void served.closed?.then(() => finish());
  const finish = (): void => {
    if (isGone) return;
    isGone = true;
    stopWatching();
    void Promise.all([mergedUnion.closeAll(), live?.close()]).finally(markGone);
  };

  let unmounting: Promise<void> | undefined;
  const unmount = (): Promise<void> => {
    unmounting ??= (async () => {
      if (!isGone) await served.unmount();
      finish();
      await gone;
      logger.info('unmounted', { mountpoint });
    })();
    return unmounting;
  };
  return { mountpoint, unmount, gone };
}

interface ServeOptions { readOnly: boolean; live: boolean; cacheSeconds: number | undefined; logger: Logger; stats: OpStats | undefined }

async function mountKernel(mountpoint: string, union: UnionFs, o: ServeOptions): Promise<Served> {
  const session = await KernelFuse.mount(mountpoint, union, {
    readOnly: o.readOnly, contentMayChange: o.live, cacheSeconds: o.cacheSeconds ?? KERNEL_CACHE_SECONDS, logger: o.logger,
    ...(o.stats ? { stats: o.stats } : {}),
  });
  return { unmount: () => session.unmount(), closed: session.closed };
}

async function mountLibfuse2(mountpoint: string, union: UnionFs, o: ServeOptions): Promise<Served> {
  const fuse = new LayerdFuse(mountpoint, union, o.logger, {
    readOnly: o.readOnly, contentMayChange: o.live, ...(o.cacheSeconds === undefined ? {} : { cacheSeconds: o.cacheSeconds }),
  }, o.stats);
  await new Promise<void>((done, fail) => fuse.mount((err) => (err
    ? fail(new LayerdError(ErrorCodes.EIO, `cannot mount ${mountpoint}: ${err.message}`, { mountpoint }, { cause: err }))
    : done())));
  return {
    unmount: async () => {
      await new Promise<void>((done) => fuse.unmount((err) => {
        if (err) o.logger.warn('unmount reported an error', { mountpoint, error: err.message });
        done();
      }));
      if ((await findMount(mountpoint))?.fstype.startsWith('fuse')) await clearDeadMount(mountpoint);
    },
  };
}

/**
 * One poll of /proc/self/mountinfo for all the mounts of this process
 * (a mount host serves many): each watcher is told once its mountpoint is
 * no longer a FUSE mount, whoever unmounted it. The timer also keeps the
 * event loop alive while anything is mounted: fuse-native's handles do not.
 */
const goneWatchers = new Map<string, () => void>();
let goneTimer: NodeJS.Timeout | undefined;

function watchMountGone(mountpoint: string, onGone: () => void): () => void {
  goneWatchers.set(mountpoint, onGone);
  goneTimer ??= setInterval(() => {
    readFile('/proc/self/mountinfo', 'utf8').then((text) => {
      const fuse = new Set(parseMountinfo(text).filter((e) => e.fstype.startsWith('fuse')).map((e) => e.mountpoint));
      for (const [mnt, notify] of [...goneWatchers]) if (!fuse.has(mnt)) notify();
    }, () => undefined);
  }, POLL_MS);
  return () => {
    if (goneWatchers.get(mountpoint) === onGone) goneWatchers.delete(mountpoint);
    if (goneWatchers.size === 0 && goneTimer) {
      clearInterval(goneTimer);
      goneTimer = undefined;
    }
  };
}
