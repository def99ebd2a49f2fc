/**
 * `layerctl pull` and `layerctl push`: images from and to registries (OCI
 * distribution API). They follow layerctl's conventions: `--json` for
 * scripts, progress on a terminal only, exit status from the error code.
 *
 * Registered by cli/layerctl.ts:
 *   registerRegistryCommands(program, offlineStore);
 */
import { type Command, Option } from 'commander';
import { resolve } from 'node:path';
import { createLogger } from '../common/log.js';
import { resolveRoot } from '../storage/layout.js';
import { parsePlatform } from '../storage/platform.js';
import { EMPTY_CONFIG, type RegistriesConfig, loadRegistriesConfig } from '../storage/registry/config.js';
import { pullImage } from '../storage/registry/pull.js';
import { type LazyPullResult, pullLazy } from '../storage/lazy/lazyPull.js';
import { indexRemoteImage } from '../storage/lazy/indexImage.js';
import { fillLazyLayer, markBrokenIfBadBlob } from '../storage/lazy/fill.js';
import { type Digest } from '../storage/digest.js';
import { type PushCompression, type PushProgress, type PushResult, pushImage } from '../storage/registry/push.js';
import { type AbortCause, type RegistryTimeouts, type TimeoutSettings, checkTimeoutSettings, timeoutsFrom } from '../storage/registry/timeouts.js';
import { type ImportProgress, type ImportedImage } from '../storage/importer.js';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type DaemonClient } from './socketBackend.js';
import { Store } from '../storage/store.js';
import { humanSize, short } from './format.js';
import { LayerProgress } from './progress.js';

/** Run `fn` with the store the command works on, closing it afterwards. */
export type WithStore = <T>(cmd: Command, fn: (store: Store) => Promise<T>) => Promise<T>;

/** The offline `--root` mode: open the store directly. */
export const offlineStore: WithStore = async (cmd, fn) => {
  const opts = cmd.optsWithGlobals<{ root?: string; logLevel?: string }>();
  const logger = createLogger({ level: (opts.logLevel ?? 'warn') as 'warn', component: 'layerctl' });
  const store = await Store.open(resolveRoot(opts.root), { logger });
  try {
    return await fn(store);
  } finally {
    store.close();
  }
};

function print(text: string): void {
  process.stdout.write(text);
}

async function registriesConfig(file: string | undefined): Promise<RegistriesConfig> {
  const path = file ?? process.env['LAYERD_REGISTRIES_CONFIG'];
  return path ? loadRegistriesConfig(path) : EMPTY_CONFIG;
}

/** The daemon to talk to, when the command was pointed at one. */
export type DaemonFor = (cmd: Command) => DaemonClient | undefined;

function refuseLocalConfig(file: string | undefined): void {
  if (file) throw new LayerdError(ErrorCodes.EINVAL, '--registries-config is for the offline --root mode; the daemon uses its own (config key registriesConfig)');
}

interface TimeoutFlags {
  connectTimeout?: string;
  idleTimeout?: string;
  timeout?: string;
}

/** Flag (or environment variable), option key: the offline path's timeouts. */
const TIMEOUT_FLAGS = [
  ['connectTimeout', 'LAYERD_REGISTRY_CONNECT_TIMEOUT', 'connectSeconds', '--connect-timeout'],
  ['idleTimeout', 'LAYERD_REGISTRY_IDLE_TIMEOUT', 'idleSeconds', '--idle-timeout'],
  ['timeout', 'LAYERD_REGISTRY_TIMEOUT', 'totalSeconds', '--timeout'],
] as const;

function addTimeoutOptions(cmd: Command): Command {
  return cmd
    .option('--connect-timeout <seconds>', 'give up connecting after this long (default 30; $LAYERD_REGISTRY_CONNECT_TIMEOUT)')
    .option('--idle-timeout <seconds>', 'give up when nothing arrives for this long (default 60; $LAYERD_REGISTRY_IDLE_TIMEOUT)')
    .option('--timeout <seconds>', 'give up when the whole transfer takes longer (default 0: no limit; $LAYERD_REGISTRY_TIMEOUT)');
}

/** The offline path's timeouts: flags, then environment, then the defaults. */
function timeoutsOf(flags: TimeoutFlags): RegistryTimeouts {
  const settings: Record<string, unknown> = {};
  for (const [flag, env, key, name] of TIMEOUT_FLAGS) {
    const text = flags[flag] ?? process.env[env];
    if (text === undefined || text === '') continue;
    const value = Number(text);
    if (!Number.isFinite(value)) throw new LayerdError(ErrorCodes.EINVAL, `${flags[flag] !== undefined ? name : env}: not a number of seconds: '${text}'`);
    settings[key] = value;
  }
  return timeoutsFrom(checkTimeoutSettings(settings, 'registry timeouts') satisfies TimeoutSettings);
}

/**
 * The offline path's cancellation: SIGINT or SIGTERM stops the transfer and
 * lets the store remove its ingest directory before the process exits (a
 * second signal kills at once, as usual).
 */
async function cancellable<T>(run: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  const onSignal = (name: NodeJS.Signals): void => {
    const cause: AbortCause = { kind: 'cancelled', why: `layerctl got ${name}` };
    controller.abort(cause);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    return await run(controller.signal);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

function refuseLocalTimeouts(flags: TimeoutFlags): void {
  const given = TIMEOUT_FLAGS.find(([flag]) => flags[flag] !== undefined);
  if (given) throw new LayerdError(ErrorCodes.EINVAL, `${given[3]} is for the offline --root mode; the daemon uses its own (config key registryTimeouts)`);
}

/** `pull --lazy`: through the daemon (which fills the layers in the background) or on a store directly (no fill until a daemon holds it). */
async function pullLazily(
  ref: string, opts: { platform?: string; registriesConfig?: string } & TimeoutFlags, daemon: ReturnType<DaemonFor>,
  progress: LayerProgress, withStore: WithStore, cmd: Command,
): Promise<LazyPullResult> {
  if (daemon) {
    refuseLocalConfig(opts.registriesConfig);
    refuseLocalTimeouts(opts);
    return daemon.call<LazyPullResult>('POST', '/v1/images/pull', { ref, lazy: true, ...(opts.platform ? { platform: opts.platform } : {}) },
      progress.enabled ? (e) => progress.update(e as ImportProgress) : undefined);
  }
  const configPath = opts.registriesConfig ?? process.env['LAYERD_REGISTRIES_CONFIG'];
  const config = await registriesConfig(opts.registriesConfig);
  const timeouts = timeoutsOf(opts);
  return withStore(cmd, (store) => cancellable((signal) => pullLazy(store, ref, {
    config, timeouts, signal, ...(configPath ? { registriesConfig: resolve(configPath) } : {}),
    ...(opts.platform ? { platform: parsePlatform(opts.platform) } : {}),
    ...(progress.enabled ? { onProgress: progress.update } : {}),
  })));
}

export function registerRegistryCommands(program: Command, withStore: WithStore, daemonFor: DaemonFor): void {
  addTimeoutOptions(program.command('fill'))
    .description('complete lazily pulled layers now, in the foreground: those of IMAGE, else every one (a store without a daemon, --root; a daemon fills them itself)')
    .argument('[image]', 'image reference or ID')
    .option('--registries-config <file>', 'registries config JSON (default: the one the lazy pull recorded)')
    .option('--json', 'print the result as JSON')
    .action(async (image: string | undefined, opts: { registriesConfig?: string; json?: boolean } & TimeoutFlags, cmd: Command) => {
      if (daemonFor(cmd)) throw new LayerdError(ErrorCodes.EINVAL, 'the daemon fills lazily pulled layers itself, in the background (layerctl inspect shows their state); fill is for a store without a daemon (--root)');
      const config = opts.registriesConfig !== undefined ? await registriesConfig(opts.registriesConfig) : undefined;
      const timeouts = timeoutsOf(opts);
      const result = await withStore(cmd, (store) => cancellable(async (signal) => {
        const wanted = image === undefined ? undefined : new Set(store.db.imageLayers(store.resolveImage(image).id).map((l) => l.diff_id));
        const filled: Digest[] = [];
        const broken: { diffId: Digest; error: string }[] = [];
        for (const row of store.db.listLazyLayers()) {
          if (row.state === 'broken' || (wanted !== undefined && !wanted.has(row.diff_id))) continue;
          try {
            await fillLazyLayer(store, row.diff_id, { signal, timeouts, ...(config ? { config } : {}) });
            filled.push(row.diff_id);
            if (!opts.json) print(`filled ${row.diff_id}\n`);
          } catch (err) {
            const error = markBrokenIfBadBlob(store, row.diff_id, err);
            if (error === undefined) throw err; // the network: the layer stays lazy, a later fill goes on
            broken.push({ diffId: row.diff_id, error });
            process.stderr.write(`layerctl: layer ${row.diff_id} is broken: ${error}\n`);
          }
        }
        return { filled, broken };
      }));
      if (opts.json) print(JSON.stringify(result, null, 2) + '\n');
      if (result.broken.length > 0) throw new LayerdError(ErrorCodes.ECORRUPT, `${result.broken.length} layer(s) did not verify and are marked broken`);
    });

  addTimeoutOptions(program.command('pull'))
    .description('pull an image from a registry (HOST[:PORT]/REPO[:TAG] or ...@sha256:<hex>)')
    .argument('<ref>', 'registry reference')
    .option('--platform <os/arch[/variant]>', 'platform to select from image indexes (default: this host)')
    .option('--registries-config <file>', 'registries config JSON (insecure, caFile, credentials, mirrors; default $LAYERD_REGISTRIES_CONFIG)')
    .option('--lazy', 'eStargz images, and gzip images with a gzip index (layerctl index): fetch only each layer\'s table of contents or index and return; file content is fetched as it is read, the rest in the background (by the daemon; docs/lazy.md)')
    .option('--json', 'print the result as JSON')
    .action(async (ref: string, opts: { platform?: string; registriesConfig?: string; json?: boolean; lazy?: boolean } & TimeoutFlags, cmd: Command) => {
      const daemon = daemonFor(cmd);
      const progress = new LayerProgress();
      if (opts.lazy) {
        const result = await pullLazily(ref, opts, daemon, progress, withStore, cmd);
        if (opts.json) return print(JSON.stringify(result, null, 2) + '\n');
        if (result.fallback) process.stderr.write(`layerctl: note: ${result.fallback}\n`);
        for (const img of result.images) {
          const lazy = result.lazyLayers.length > 0 ? `, ${result.lazyLayers.length} lazy${result.gzipIndex ? ` (gzip index from the ${result.gzipIndex})` : ''}` : '';
          print(`pulled ${img.id} (${img.platform}, ${img.layers} layers${lazy})${img.refs.length ? ' as ' + img.refs.join(', ') : ''}\n`);
        }
        return;
      }
      const pull = async (): Promise<ImportedImage[]> => {
        if (daemon) {
          refuseLocalConfig(opts.registriesConfig);
          refuseLocalTimeouts(opts);
          const r = await daemon.call<{ images: ImportedImage[] }>('POST', '/v1/images/pull',
            { ref, ...(opts.platform ? { platform: opts.platform } : {}) },
            progress.enabled ? (e) => progress.update(e as ImportProgress) : undefined);
          return r.images;
        }
        const config = await registriesConfig(opts.registriesConfig);
        const timeouts = timeoutsOf(opts);
        return withStore(cmd, (store) => cancellable((signal) => pullImage(store, ref, {
          config, timeouts, signal,
          ...(opts.platform ? { platform: parsePlatform(opts.platform) } : {}),
          ...(progress.enabled ? { onProgress: progress.update } : {}),
        })));
      };
      const result = await pull();
      if (opts.json) return print(JSON.stringify(result, null, 2) + '\n');
      for (const img of result) {
        print(`pulled ${img.id} (${img.platform}, ${img.layers} layers)${img.refs.length ? ' as ' + img.refs.join(', ') : ''}\n`);
      }
    });

  addTimeoutOptions(program.command('push'))
    .description('push an image from the store to a registry')
    .argument('<image>', 'NAME[:TAG], digest or digest prefix in the store')
    .argument('<ref>', 'HOST[:PORT]/REPO[:TAG] to push to')
    .addOption(new Option('--compress <format>', 'compression for layers the store keeps uncompressed').choices(['gzip', 'zstd']).default('gzip'))
    .option('--registries-config <file>', 'registries config JSON (default $LAYERD_REGISTRIES_CONFIG)')
    .option('--no-gzip-index', 'do not publish the seekable index of the gzip layers (an OCI artifact referring to the manifest, for pull --lazy)')
    .option('--json', 'print the result as JSON')
    .action(async (image: string, ref: string, opts: { compress: PushCompression; registriesConfig?: string; json?: boolean; gzipIndex: boolean } & TimeoutFlags, cmd: Command) => {
      const daemon = daemonFor(cmd);
      const push = async (): Promise<PushResult> => {
        if (daemon) {
          refuseLocalConfig(opts.registriesConfig);
          refuseLocalTimeouts(opts);
          return daemon.call<PushResult>('POST', `/v1/images/${encodeURIComponent(image)}/push`, {
            target: ref, compress: opts.compress, ...(opts.gzipIndex ? {} : { gzipIndex: false }),
          });
        }
        const config = await registriesConfig(opts.registriesConfig);
        const timeouts = timeoutsOf(opts);
        const progress = process.stderr.isTTY ? pushProgressLine : undefined;
        return withStore(cmd, (store) => cancellable((signal) => pushImage(store, image, ref, {
          config, compression: opts.compress, timeouts, signal, ...(progress ? { onProgress: progress } : {}),
          ...(opts.gzipIndex ? {} : { gzipIndex: false }),
        })));
      };
      const result = await push();
      if (opts.json) return print(JSON.stringify(result, null, 2) + '\n');
      const counts = { exists: 0, mounted: 0, uploaded: 0 };
      for (const b of result.blobs) counts[b.outcome]++;
      print(`pushed ${result.ref}: ${result.digest} (${result.manifests.length} manifest${result.manifests.length === 1 ? '' : 's'}; ` +
        `${counts.uploaded} blobs uploaded, ${counts.mounted} mounted, ${counts.exists} already there)\n`);
      for (const g of result.gzipIndexes ?? []) print(`gzip index of ${g.manifest}: ${g.artifact} (${g.layers} layer${g.layers === 1 ? '' : 's'}; listed by the ${g.listedBy})\n`);
    });

  addTimeoutOptions(program.command('index'))
    .description('build the seekable index of each gzip layer of an image in a registry and publish it there (an OCI artifact referring to the manifest), so that pull --lazy mounts it lazily; streams the layers, stores nothing')
    .argument('<ref>', 'HOST[:PORT]/REPO[:TAG] or ...@sha256:<hex>')
    .option('--platform <os/arch[/variant]>', 'platform to select from image indexes (default: this host)')
    .option('--registries-config <file>', 'registries config JSON (default $LAYERD_REGISTRIES_CONFIG)')
    .option('--json', 'print the result as JSON')
    .action(async (ref: string, opts: { platform?: string; registriesConfig?: string; json?: boolean } & TimeoutFlags) => {
      // Talks to the registry only: runs here, with or without a daemon.
      const config = await registriesConfig(opts.registriesConfig);
      const result = await cancellable((signal) => indexRemoteImage(ref, {
        config, timeouts: timeoutsOf(opts), signal, ...(opts.platform ? { platform: parsePlatform(opts.platform) } : {}),
        ...(process.stderr.isTTY ? { onLayer: (e) => process.stderr.write(`${short(e.digest)}: indexed (${e.spans} spans, ${humanSize(e.tarSize)} uncompressed)\n`) } : {}),
      }));
      if (opts.json) return print(JSON.stringify(result, null, 2) + '\n');
      print(result.artifact
        ? `indexed ${result.ref}: ${result.layers.length} gzip layer${result.layers.length === 1 ? '' : 's'}, artifact ${result.artifact} (subject ${result.manifest}; listed by the ${result.listedBy ?? 'referrers tag'})\n`
        : `${result.ref}: no plain gzip layer to index\n`);
    });
}

/** One line per finished step, like `docker push` without the animation. */
function pushProgressLine(event: PushProgress): void {
  switch (event.type) {
    case 'layer-compressed': process.stderr.write(`${short(event.diffId)}: Compressed to ${short(event.digest)} (${humanSize(event.size)})\n`); break;
    case 'blob-done': {
      const how = event.outcome === 'exists' ? 'Layer already exists' : event.outcome === 'mounted' ? `Mounted from ${event.from ?? ''}` : 'Pushed';
      process.stderr.write(`${short(event.digest)}: ${how}\n`);
      break;
    }
    case 'manifest-pushed': process.stderr.write(`${event.reference}: digest ${event.digest}\n`); break;
    default: break;
  }
}
