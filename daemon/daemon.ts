/**
 * The layerd daemon: holds the store exclusively, serves the API on a Unix
 * socket, watches its configuration, and shuts down gracefully on SIGTERM
 * (stop accepting, finish in-flight requests, exit 0).
 */
import { rm, stat, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { watch, type FSWatcher } from 'chokidar';
import { type Logger } from '../common/log.js';
import { prune } from '../storage/gc.js';
import { EMPTY_CONFIG, loadRegistriesConfig } from '../storage/registry/config.js';
import { timeoutsFrom } from '../storage/registry/timeouts.js';
import { StoreOperations } from '../storage/operations.js';
import { Store, daemonMarker } from '../storage/store.js';
import { containerRoutes } from './api/containers.js';
import { imageRoutes } from './api/images.js';
import { registryRoutes } from './api/registry.js';
import { ContainerManager } from './containers.js';
import { type SnapshotterServer, startSnapshotter } from './snapshotter/server.js';
import { ContainerdContent, ContainerdOriginalLayers, DEFAULT_CONTAINERD_SOCKET } from './snapshotter/containerdContent.js';
import { RegistryLayerSource } from './snapshotter/registryLayers.js';
import { SnapshotService } from './snapshotter/service.js';
import { Spool } from './spool.js';
import { LazyFills } from '../storage/lazy/fill.js';
import { DEFAULT_GATE_TIMING, ReadDemandGate } from '../storage/lazy/readDemand.js';
import { systemRoutes } from './api/system.js';
import { preferWakeupsHereOnce } from '../mount/fuseWakeups.js';
import { type DaemonConfig, loadConfig } from './config.js';
import { Router } from './http.js';
import { DaemonMetrics } from './metrics.js';
import { claimSocketPath, secureSocket } from './socket.js';
import { type DaemonCounts, type SystemdNotifier, statusLine } from './systemd.js';

export const VERSION = '0.1.0';
const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface DaemonOptions {
  root: string;
  socket: string;
  socketGroup?: string | number;
  socketMode?: number;
  /** The configuration file to watch for log level and GC policy changes. */
  configPath?: string;
  config: DaemonConfig;
  logger: Logger;
  durability?: 'full' | 'none';
  /** Where containers are mounted when a create names no mountpoint. */
  mountRoot?: string;
  /** Unmount every container when stopping (default: leave them served). */
  unmountOnStop?: boolean;
  /** The containerd proxy snapshotter's socket (default: beside `socket`); 'none': no snapshotter. */
  snapshotterSocket?: string;
  /** containerd's socket (its content store holds the original blobs of layers it unpacks); 'none': not asked. Default: the config's, else containerd's default. */
  containerdSocket?: string;
  /** Tells systemd when the daemon is ready or stopping, and its status (Type=notify units). */
  notifier?: SystemdNotifier;
}

/** How soon after a change of the API (a create, an import, an rm) systemd's STATUS= follows it. */
const STATUS_DELAY_MS = 200;

export const DEFAULT_MOUNT_ROOT = '/run/layerd/mounts';

export class Daemon {
  readonly metrics = new DaemonMetrics();
  private readonly inflight = new Set<Promise<void>>();
  private watcher: FSWatcher | undefined;
  private gcTimer: NodeJS.Timeout | undefined;
  private stopping: Promise<void> | undefined;
  containers!: ContainerManager;
  private spool: Spool | undefined;
  lazyFills!: LazyFills;
  fillGate: ReadDemandGate | undefined;
  snapshots!: SnapshotService;
  private layerFetcher: RegistryLayerSource | undefined;
  private containerdContent: ContainerdContent | undefined;
  private snapshotter: SnapshotterServer | undefined;
  private statusTimer: NodeJS.Timeout | undefined;

  private constructor(
    readonly store: Store,
    private readonly server: Server,
    readonly options: DaemonOptions,
  ) {}

  static async start(options: DaemonOptions): Promise<Daemon> {
    const { logger } = options;
    const store = await Store.open(options.root, {
      exclusive: true, logger,
      ...(options.durability ? { durability: options.durability } : {}),
      ...(options.config.diskReserveBytes !== undefined ? { diskReserveBytes: options.config.diskReserveBytes } : {}),
      ...(options.config.layerFormat !== undefined ? { layerFormat: options.config.layerFormat } : {}),
    });
    let snapshotter: SnapshotterServer | undefined;
    try {
      const router = new Router();
      const server = createServer();
      const daemon = new Daemon(store, server, options);
      systemRoutes(router, store, daemon.metrics, join(REPO, 'docs'), VERSION, () => daemon.containers.fuseStats(), () => daemon.containers.hostMemory());
      const ops = new StoreOperations(store);
      imageRoutes(router, ops, store, daemon.metrics, logger);
      daemon.containers = new ContainerManager(store, options.mountRoot ?? options.config.mountRoot ?? DEFAULT_MOUNT_ROOT, logger, {
        ...(options.config.mountCacheSeconds !== undefined ? { cacheSeconds: options.config.mountCacheSeconds } : {}),
      });
      containerRoutes(router, daemon.containers, {
        // A container made while layers are lazy will read them: background fills yield from now, not from when its
        // mount host (a process yet to start) first waits for the registry (storage/lazy/readDemand.ts).
        creating: () => { if (store.db.listLazyLayers().some((l) => l.state !== 'broken')) daemon.fillGate?.expectReads(); },
      });
      // Mount hosts inherit the daemon's environment: the bound on lazy reads reaches them so (storage/lazy/lazyLayer.ts).
      if (options.config.lazyReadTimeoutSeconds !== undefined) {
        process.env['LAYERD_LAZY_READ_TIMEOUT_MS'] = String(Math.round(options.config.lazyReadTimeoutSeconds * 1000));
      }
      // Fills pause while mount hosts' reads wait for the registry (storage/lazy/readDemand.ts).
      daemon.fillGate = new ReadDemandGate(store.layout.lazyDemandDir, DEFAULT_GATE_TIMING, logger);
      await daemon.fillGate.start();
      daemon.lazyFills = new LazyFills(store, {
        config: async () => (options.config.registriesConfig ? loadRegistriesConfig(options.config.registriesConfig) : EMPTY_CONFIG),
        timeouts: timeoutsFrom(options.config.registryTimeouts), logger, gate: daemon.fillGate,
      });
      registryRoutes(router, store, options.config.registriesConfig, options.config.registryTimeouts, daemon.lazyFills);
      // Once, before any mount host serves: they leave the setting to the daemon (mount/fuseWakeups.ts).
      await preferWakeupsHereOnce(logger);
      await daemon.containers.adoptAll();
      daemon.containers.superviseHosts();
      // The snapshotter fetches the layers containerd names in Prepare labels itself (CRI, ctr-remote rpull).
      const registriesConfigPath = options.config.registriesConfig;
      const fetcher = new RegistryLayerSource(store, logger, {
        config: async () => (registriesConfigPath ? loadRegistriesConfig(registriesConfigPath) : EMPTY_CONFIG),
        timeouts: timeoutsFrom(options.config.registryTimeouts),
        // eStargz layers are mounted lazily; their fills run with the API's lazy pulls'.
        lazy: {
          ...(registriesConfigPath !== undefined ? { registriesConfig: registriesConfigPath } : {}),
          started: (diffId) => { void daemon.lazyFills.start(diffId); },
        },
      });
      daemon.layerFetcher = fetcher;
      // Layers containerd unpacks are stored from their original blobs in its content store (the image's diffIDs).
      const containerdSocket = options.containerdSocket ?? options.config.containerdSocket ?? DEFAULT_CONTAINERD_SOCKET;
      if (containerdSocket !== 'none') {
        try {
          daemon.containerdContent = new ContainerdContent(containerdSocket);
        } catch (err) {
          // (an installation without the .proto files: unpacked layers are then stored from their directories)
          logger.error('containerd\'s content store will not be asked for original layer blobs', { error: (err as Error).message });
        }
      }
      daemon.snapshots = new SnapshotService(store, logger, {
        layerSources: [fetcher],
        ...(daemon.containerdContent ? { originalLayers: new ContainerdOriginalLayers(daemon.containerdContent) } : {}),
      });
      await daemon.snapshots.adoptAll();
      daemon.snapshots.superviseMounts();
      daemon.snapshotter = snapshotter = await startSnapshotter(options.socket, options.snapshotterSocket, daemon.snapshots, logger);
      server.on('request', (req, res) => {
        const done = router.dispatch(req, res, logger).finally(() => {
          daemon.inflight.delete(done);
          daemon.metrics.requests.inc({ method: req.method ?? '', status: String(res.statusCode) });
          if (req.method !== 'GET' && req.method !== 'HEAD') daemon.statusChanged();
        });
        daemon.inflight.add(done);
      });
      // A broken client connection must never take the daemon down.
      server.on('clientError', (err, socket) => {
        logger.debug('client error', { error: err.message });
        socket.destroy();
      });
      await claimSocketPath(options.socket);
      await new Promise<void>((resolvePromise, reject) => {
        server.once('error', reject);
        server.listen(options.socket, () => { server.off('error', reject); resolvePromise(); });
      });
      await secureSocket(options.socket, options.socketMode ?? 0o660, options.socketGroup);
      await writeFile(daemonMarker(options.root), JSON.stringify({ pid: process.pid, socket: options.socket }), { mode: 0o600 });
      daemon.applyPolicy(options.config);
      if (options.config.spoolDir) {
        daemon.spool = new Spool(options.config.spoolDir, ops, logger);
        await daemon.spool.start();
      }
      await daemon.watchConfig();
      daemon.lazyFills.resume(); // fills a previous run left unfinished go on
      logger.info('layerd is ready', { socket: options.socket, root: options.root, version: VERSION });
      // Only now (the socket accepts connections, containers are adopted) may systemd call the unit active.
      options.notifier?.notify({ READY: '1', STATUS: statusLine(options.socket, daemon.counts()) });
      return daemon;
    } catch (err) {
      await snapshotter?.stop(0);
      store.close();
      throw err;
    }
  }

  /** What systemd's STATUS= line reports. */
  counts(): DaemonCounts {
    const containers = this.store.db.listContainers();
    const snapshotMounts = this.snapshots.table.list().filter((s) => s.server_pid !== null).length;
    return {
      images: this.store.db.listImages().length,
      containers: containers.length,
      mounts: containers.filter((c) => c.server_pid !== null).length + snapshotMounts,
    };
  }

  /** Refresh systemd's STATUS= shortly (one update for a burst of changes). */
  private statusChanged(): void {
    const notifier = this.options.notifier;
    if (!notifier || this.stopping || this.statusTimer) return;
    this.statusTimer = setTimeout(() => {
      this.statusTimer = undefined;
      if (!this.stopping) notifier.notify({ STATUS: statusLine(this.options.socket, this.counts()) });
    }, STATUS_DELAY_MS);
    this.statusTimer.unref();
  }

  /** Log level and GC policy apply without a restart. */
  private applyPolicy(config: DaemonConfig): void {
    if (config.logLevel) this.options.logger.level = config.logLevel;
    if (this.gcTimer) clearInterval(this.gcTimer);
    this.gcTimer = undefined;
    const interval = config.gc?.pruneIntervalSeconds ?? 0;
    if (interval > 0) {
      this.gcTimer = setInterval(() => {
        prune(this.store).then(
          (r) => this.options.logger.info('periodic prune', { images: r.images.length, layers: r.gc.layers.length, bytes: r.gc.bytes }),
          (err: unknown) => this.options.logger.error('periodic prune failed', { error: String(err) }),
        );
      }, interval * 1000);
      this.gcTimer.unref();
    }
  }

  private async watchConfig(): Promise<void> {
    const path = this.options.configPath;
    if (!path) return;
    // Only a regular file (or one not there yet) is watched: a device such as
    // /dev/null "changes" every time anyone writes to it.
    const current = await stat(path).catch(() => undefined);
    if (current && !current.isFile()) {
      this.options.logger.info('the configuration is not a regular file: not watched for changes', { path });
      return;
    }
    let applied = JSON.stringify(this.options.config);
    this.watcher = watch(path, { ignoreInitial: true, awaitWriteFinish: { stabilityThreshold: 100, pollInterval: 50 } });
    this.watcher.on('all', () => {
      loadConfig(path, false).then(
        (config) => {
          const text = JSON.stringify(config);
          if (text === applied) { this.options.logger.debug('configuration touched but unchanged', { path }); return; }
          applied = text;
          this.applyPolicy(config);
          this.options.logger.info('configuration reloaded', { path, logLevel: config.logLevel, gc: config.gc });
        },
        (err: unknown) => this.options.logger.error('configuration not reloaded', { path, error: (err as Error).message }),
      );
    });
  }

  /** Stop accepting, let in-flight requests finish, release everything. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.options.logger.info('layerd is stopping');
      clearTimeout(this.statusTimer);
      this.options.notifier?.notify({ STOPPING: '1', STATUS: 'stopping' });
      if (this.gcTimer) clearInterval(this.gcTimer);
      await this.watcher?.close();
      await this.spool?.stop();
      await this.lazyFills?.stop();
      this.fillGate?.stop();
      const closed = new Promise<void>((resolvePromise) => this.server.close(() => resolvePromise()));
      this.server.closeIdleConnections();
      await Promise.allSettled([...this.inflight]);
      await closed;
      await this.layerFetcher?.stop(); // (a Prepare waiting for a fetch then falls back and answers)
      await this.snapshotter?.stop();
      await this.containers.stopSupervising();
      await this.snapshots.stopSupervising();
      this.containerdContent?.close();
      if (this.options.unmountOnStop) await this.containers.unmountAll();
      if (this.options.unmountOnStop) await this.snapshots.unmountAll();
      await rm(daemonMarker(this.options.root), { force: true });
      this.store.close();
    })();
    return this.stopping;
  }
}
