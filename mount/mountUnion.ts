/**
 * Mount a union of layers + upper dir with FUSE in this process, and notice
 * when it goes away (our own unmount, or someone running `umount` on it).
 */
import { silentLogger, type Logger } from '../common/log.js';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import type { LayerSource } from '../storage/layerIndex.js';
import { clearDeadMount, isDeadMount } from './deadMount.js';
import type { FuseSession } from './fuseSession.js';
import { InitFlag } from './fuseProtocol.js';
import { KernelFuse } from './kernelFuse.js';
import { preferWakeupsHereOnce } from './fuseWakeups.js';
import { LiveLayer } from './liveLayer.js';
import type { LowerMergeCache } from './lowerMerges.js';
import { UnionFs } from './unionFs.js';
import type { OpStats } from './opStats.js';
import type { AccessRecorder } from './accessRecord.js';
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
  /**
   * FUSE passthrough for upper files where the kernel offers it (default:
   * on, unless the environment has LAYERD_FUSE_PASSTHROUGH=0).
   */
  passthrough?: boolean;
  /**
   * FUSE writeback caching on a writable mount that is not passed through
   * (default: on, unless the environment has LAYERD_FUSE_WRITEBACK=0; never
   * with a live layer, whose files change behind the kernel).
   */
  writeback?: boolean;
  /** Record the mount's first accesses here (mount/accessRecord.ts). */
  record?: AccessRecorder;
  /**
   * Hand small lower files' bytes to the kernel's page cache at their first
   * open (kernelFuse.ts; default: on, unless the environment has
   * LAYERD_FUSE_PREFILL=0).
   */
  prefill?: boolean;
  /**
   * Turn on the host's FUSE wake-ups on the waking CPU before the first
   * mount of this process (mount/fuseWakeups.ts; default true). The
   * daemon's mount hosts pass false: the daemon did it once when it started,
   * so an admin who turns it off afterwards is not overruled by every new host.
   */
  preferWakeupsHere?: boolean;
}

/** The default of MountUnionOptions.writeback: LAYERD_FUSE_WRITEBACK=0 turns it off (benchmarks, the semantics suite run each way). */
export function writebackByDefault(): boolean {
  return process.env['LAYERD_FUSE_WRITEBACK'] !== '0';
}

/** The default of MountUnionOptions.prefill: LAYERD_FUSE_PREFILL=0 turns it off (benchmarks, tests of the READ path). */
export function prefillByDefault(): boolean {
  return process.env['LAYERD_FUSE_PREFILL'] !== '0';
}

/** The default of MountUnionOptions.passthrough: LAYERD_FUSE_PASSTHROUGH=0 turns it off (benchmarks, the semantics suite run both ways). */
export function passthroughByDefault(): boolean {
  return process.env['LAYERD_FUSE_PASSTHROUGH'] !== '0';
}

export interface MountedUnion {
  readonly mountpoint: string;
  /** Unmount (idempotent); resolves once the mount is gone. */
  unmount(): Promise<void>;
  /** Resolves when the mount disappears, whoever unmounted it. */
  readonly gone: Promise<void>;
}

const LIVE_CACHE_SECONDS = 0.25;
/**
 * Served over /dev/fuse directly (kernelFuse.ts), nothing changes behind the
 * kernel of a mount without a live layer: it may cache for long.
 */
const KERNEL_CACHE_SECONDS = 3600;

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
  if (options.preferWakeupsHere !== false) await preferWakeupsHereOnce(logger);
  let session: FuseSession;
  try {
    session = await KernelFuse.mount(mountpoint, union, {
      readOnly, contentMayChange: live !== undefined, cacheSeconds: cacheSeconds ?? KERNEL_CACHE_SECONDS, logger,
      ...(options.stats ? { stats: options.stats } : {}), passthrough: options.passthrough ?? passthroughByDefault(),
      writeback: live === undefined && (options.writeback ?? writebackByDefault()), prefill: options.prefill ?? prefillByDefault(),
      ...(options.record && live === undefined ? { record: options.record } : {}),
    });
  } catch (err) {
    await live?.close();
    throw err;
  }
  const mergedUnion = union;
  logger.info('mounted', {
    mountpoint, layers: options.layers.length, readOnly, ...(live ? { liveLayer: live.dir } : {}), passthrough: session.passthrough,
    writeback: (session.flags & InitFlag.WRITEBACK_CACHE) !== 0,
    mergeMs: Math.round(merged - started), serveMs: Math.round(performance.now() - merged),
  });

  let markGone!: () => void;
  const gone = new Promise<void>((done) => { markGone = done; });
  let isGone = false;
  // The connection ends when the mount goes, whoever unmounted it.
  void session.closed.then(() => {
    // Ended by anything but our own unmount (an abort, a umount from outside, a read error): say why, for whoever lost the mount.
    if (unmounting === undefined) logger.warn('FUSE connection ended', { mountpoint, why: session.endReason });
    finish();
  });
  const finish = (): void => {
    if (isGone) return;
    isGone = true;
    void Promise.all([mergedUnion.closeAll(), live?.close()]).finally(markGone);
  };

  let unmounting: Promise<void> | undefined;
  const unmount = (): Promise<void> => {
    unmounting ??= (async () => {
      if (!isGone) await session.unmount();
      finish();
      await gone;
      logger.info('unmounted', { mountpoint });
    })();
    return unmounting;
  };
  return { mountpoint, unmount, gone };
}
