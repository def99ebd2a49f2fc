/**
 * `layerd mount`: serve one union mount in the foreground, over
 *   --root DIR --image REF     an image of a store (opened just long enough to find its layers),
 *   --layers DIR[:DIR...]      store layer directories (what the daemon passes; no database), or
 *   --lower DIR[:DIR...]       plain directories prepared for overlayfs.
 * As with overlayfs, the leftmost of a list is the top layer. `--live-layer DIR` adds a host
 * directory above them that is followed as it changes (mount/liveLayer.ts). Prints `ready <mountpoint>` on stdout
 * once the mount is live; unmounts and exits 0 on SIGTERM/SIGINT, and exits
 * 0 when someone else unmounts it. Root mounts with mount(8); anyone else
 * through fusermount3 (mount/fuseSession.ts). Meant to run as its own process (the
 * daemon spawns it), never inside a process that uses the mount.
 */
import { Command, CommanderError } from 'commander';
import { pathToFileURL } from 'node:url';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createLogger } from '../common/log.js';
import { ErrorCodes, LayerdError, exitStatusFor, isLayerdError } from '../common/errors.js';
import { type LayerSource } from '../storage/layerIndex.js';
import { resolveRoot } from '../storage/layout.js';
import { layerDirSource, storedLayerSource } from '../storage/lazy/lazyLayer.js';
import { lowerDirSource } from './lowerDir.js';
import { mountUnion, type MountedUnion } from './mountUnion.js';
import { OpStats } from './opStats.js';

export { mountUnion, type MountUnionOptions, type MountedUnion } from './mountUnion.js';
export { clearDeadMount, isDeadMount, findMount } from './deadMount.js';

interface MountArgs {
  lower?: string; layers?: string; root?: string; image?: string;
  upper?: string; readOnly?: boolean; debug?: boolean; statsFile?: string; liveLayer?: string; cacheSeconds?: string;
}

/** The layers to mount, bottom → top, from whichever source the flags name. */
async function resolveLayers(args: MountArgs): Promise<LayerSource[]> {
  const given = [args.lower, args.layers, args.image].filter((v) => v !== undefined).length;
  if (given !== 1) throw new LayerdError(ErrorCodes.EINVAL, 'give exactly one of --lower, --layers or --image');
  if (args.image !== undefined && args.root === undefined && process.env['LAYERD_ROOT'] === undefined) {
    throw new LayerdError(ErrorCodes.EINVAL, '--image needs --root (or $LAYERD_ROOT)');
  }
  const topFirst = (list: string): string[] => list.split(':').filter((d) => d !== '').reverse();
  if (args.lower !== undefined) {
    return Promise.all(topFirst(args.lower).map((dir, i) => lowerDirSource(dir, `lower${i}:${dir}`)));
  }
  if (args.layers !== undefined) {
    return Promise.all(topFirst(args.layers).map((dir) => layerDirSource(dir)));
  }
  // Loaded only here: mount servers started by the daemon never open the database.
  const { Store } = await import('../storage/store.js');
  const store = await Store.open(resolveRoot(args.root));
  try {
    // A lazily pulled layer fetches what it lacks from its registry as it is read (storage/lazy/).
    return await Promise.all((await store.imageLayers(args.image!)).map((l) => storedLayerSource(l)));
  } finally {
    store.close();
  }
}

function cacheSecondsOf(text: string): number {
  const value = Number(text);
  if (!Number.isFinite(value) || value < 0) throw new LayerdError(ErrorCodes.EINVAL, `--cache-seconds must be a number ≥ 0, not '${text}'`);
  return value;
}

export async function mountCommand(argv: string[]): Promise<number> {
  const program = new Command('layerd mount')
    .description('serve a union of directories with FUSE (leftmost lower = top layer); without root it is mounted '
      + 'with fusermount3 and only its user may enter it, unless /etc/fuse.conf has user_allow_other')
    .option('--root <dir>', 'store root, with --image (default $LAYERD_ROOT)')
    .option('--image <ref>', 'mount this image of the store')
    .option('--layers <dirs>', 'store layer directories (layers/sha256/<diffID>), colon-separated, top first')
    .option('--lower <dirs>', 'plain lower directories, colon-separated, top first')
    .option('--live-layer <dir>', 'serve this directory as the top read-only layer, following its changes')
    .option('--upper <dir>', 'writable upper directory (receives an OCI changeset); without it the mount is read-only')
    .option('--read-only', 'refuse all changes')
    .option('--stats-file <file>', 'write FUSE operation counts and latencies there (JSON, every 2 s)')
    .option('--cache-seconds <s>', 'kernel name/attribute cache lifetime (default 3600; 0.25 with a live layer)')
    .option('--debug', 'log every FUSE request (op, node, caller pid, errno, µs)')
    .argument('<mountpoint>')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  try {
    program.parse(argv, { from: 'user' });
  } catch (err) {
    return err instanceof CommanderError && err.exitCode === 0 ? 0 : 2;
  }
  const args = program.opts<MountArgs>();
  const mountpoint = program.args[0]!;
  const logger = createLogger({ component: 'mount', level: args.debug ? 'debug' : undefined });
  let emptyUpper: string | undefined;

  try {
    const layers = await resolveLayers(args);
    // Without an upper the mount is a read-only view over an empty private one.
    const upper = args.upper ?? (emptyUpper = await mkdtemp(join(tmpdir(), 'layerd-ro-upper-')));
    const stats = args.statsFile ? await OpStats.continuing(args.statsFile) : undefined;
    // Signals are taken from before the mount on: one that arrives between
    // "ready" and a handler would otherwise kill the server with the mount up.
    let mounted: MountedUnion | undefined;
    let stopping = false;
    const stop = (): void => { stopping = true; void mounted?.unmount(); };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
    try {
      mounted = await mountUnion({
        layers, upper, mountpoint, readOnly: (args.readOnly ?? false) || args.upper === undefined, logger,
        ...(stats ? { stats } : {}), ...(args.liveLayer !== undefined ? { liveLayer: args.liveLayer } : {}),
        ...(args.cacheSeconds !== undefined ? { cacheSeconds: cacheSecondsOf(args.cacheSeconds) } : {}),
      });
      const statsTimer = stats && args.statsFile ? setInterval(() => { void stats.writeTo(args.statsFile!).catch(() => undefined); }, 2000) : undefined;
      statsTimer?.unref();
      if (stopping) void mounted.unmount();
      else process.stdout.write(`ready ${mounted.mountpoint}\n`);
      await mounted.gone;
      await mounted.unmount();
      if (statsTimer) clearInterval(statsTimer);
      if (stats && args.statsFile) await stats.writeTo(args.statsFile).catch(() => undefined);
    } finally {
      process.off('SIGTERM', stop);
      process.off('SIGINT', stop);
    }
    return 0;
  } catch (err) {
    logger.error(err instanceof Error ? err.message : String(err), isLayerdError(err) ? { code: err.code, ...err.context } : {});
    return isLayerdError(err) ? exitStatusFor(err.code) : 1;
  } finally {
    if (emptyUpper) await rm(emptyUpper, { recursive: true, force: true });
  }
}

// Direct entry (`node dist/mount/mountCommand.js ...`) until bin/layerd dispatches here.
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  mountCommand(process.argv.slice(2)).then((code) => process.exit(code), () => process.exit(1));
}
