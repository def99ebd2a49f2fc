/**
 * `layerd mount-host --socket PATH`: one long-running process that serves
 * many union mounts of the same layers (one image), on request.
 *
 * Why: a process per mount costs a Node.js heap and the layer indexes per
 * container (~70 MiB each) and ~400 ms of process start-up per mount. A host
 * loads each layer index once, shares it between its mounts, and adds a
 * mount in milliseconds. The price is a shared fate: if the host dies, all
 * its mounts die with it (the daemon remounts them on its next start), so
 * the daemon keeps one host per image, not one for everything.
 *
 * Protocol: a client connects to the Unix socket, writes one JSON request
 * line, and reads one JSON reply line:
 *   {"op":"mount", "layers":[dir…bottom→top], "directories"?, "directoryScans"?, "upper", "mountpoint", "readOnly"?, "liveLayer"?, "statsFile"?, "cacheSeconds"?}
 *                                      (`directories`: those of `layers` that are plain directories in
 *                                      overlayfs's format, not store layer directories; `directoryScans`:
 *                                      {directory: file} the daemon's walks of some, mount/directoryScan.ts;
 *                                      the reply's `walked` counts the directories the host walked itself)
 *   {"op":"load", "layers", "directories"?, "directoryScans"?}
 *                                      load and merge those layers now, for mounts to come
 *                                      (the host then stays PRELOAD_KEEP_MS without mounts)
 *   {"op":"unmount", "mountpoint"}     (resolves once the mount is gone)
 *   {"op":"list"}                      → {"ok":true,"mounts":[mountpoint…]}
 *   {"op":"bind", "socket"}            a spare host (started with --spare) moves
 *                                      to `socket` and becomes that stack's host
 * Replies: {"ok":true,…} or {"ok":false,"code","message"}; code EXITING
 * means this host is shutting down and the client should start another.
 *
 * The host exits on its own when it has had no mounts for IDLE_EXIT_MS, and
 * on SIGTERM/SIGINT after unmounting everything. A spare host (`--spare`) is
 * one started ahead of need, so that the first mount of an image does not
 * wait for a process to start: it waits up to SPARE_IDLE_EXIT_MS to be bound. Like `layerd mount`, it
 * never does I/O on its own mounts.
 */
import { Command, CommanderError } from 'commander';
import { createServer, createConnection, type Server, type Socket } from 'node:net';
import { mkdir, rm, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { createLogger, type Logger } from '../common/log.js';
import { ErrorCodes, LayerdError, isLayerdError } from '../common/errors.js';
import { type LayerSource } from '../storage/layerIndex.js';
import { layerDirSource } from '../storage/lazy/lazyLayer.js';
import { directoryScanSource } from './directoryScan.js';
import { lowerDirSource } from './lowerDir.js';
import { LowerMergeCache } from './lowerMerges.js';
import { mountUnion, type MountedUnion } from './mountUnion.js';
import { OpStats } from './opStats.js';
import { AccessRecorder, type AccessOp } from './accessRecord.js';
import { warmUpMounting } from './warmUp.js';

export const EXITING = 'EXITING';
const IDLE_EXIT_MS = 5_000;
const SPARE_IDLE_EXIT_MS = 30 * 60_000;
/** How long a host that was asked to load layers waits for a mount of them. */
const PRELOAD_KEEP_MS = 60_000;
const STATS_INTERVAL_MS = 2_000;
const MAX_REQUEST_BYTES = 1024 * 1024;

export interface HostMountRequest {
  op: 'mount';
  layers: string[];
  /**
   * Those of `layers` that are plain directories in overlayfs's format (a
   * containerd unpack snapshot whose layer is still being ingested), walked
   * once through the system-call layer (mount/lowerDir.ts), not store layers.
   */
  directories?: string[];
  /**
   * For some of `directories`: a file holding the daemon's walk of it
   * (mount/directoryScan.ts), read instead of walking the directory again.
   */
  directoryScans?: Record<string, string>;
  upper: string;
  mountpoint: string;
  readOnly?: boolean;
  liveLayer?: string;
  statsFile?: string;
  cacheSeconds?: number;
  /**
   * Record the mount's first accesses (mount/accessRecord.ts); the reply to
   * its unmount carries them (`accesses`), for warming the next mount.
   */
  record?: boolean;
}
/** Load (and merge) a stack's layers ahead of its mounts. */
export type HostLoadRequest = Pick<HostMountRequest, 'layers' | 'directories' | 'directoryScans'> & { op: 'load' };
export type HostRequest = HostMountRequest | HostLoadRequest | { op: 'unmount'; mountpoint: string } | { op: 'list' } | { op: 'bind'; socket: string };
/** `walked`: how many of a mount request's plain directories this host walked itself (not read from a scan file). */
export type HostReply = { ok: true; mounts?: string[]; pid?: number; walked?: number; accesses?: readonly AccessOp[] } | { ok: false; code: string; message: string };

interface HostedMount {
  mounted: MountedUnion;
  stats: OpStats | undefined;
  statsFile: string | undefined;
  record: AccessRecorder | undefined;
}

class MountHost {
  private readonly mounts = new Map<string, HostedMount>();
  /** Mounts being forgotten (their final counts being written), by mountpoint: see `forget`. */
  private readonly forgetting = new Map<string, Promise<void>>();
  /** Mountpoints being mounted right now (a second request for one gets EEXIST). */
  private readonly pending = new Set<string>();
  /** Layer indexes by directory, loaded once and shared by every mount. */
  private readonly layers = new Map<string, Promise<LayerSource>>();
  /** The plain directories among them that this host walked itself (no scan file, or an unusable one). */
  private readonly walkedDirectories = new Set<string>();
  /** Their merge, kept: each mount of the image builds its tree over it. */
  private readonly lowerMerges = new LowerMergeCache();
  private exiting = false;
  /** Until when (Date.now()) the host stays without mounts: a load asked for mounts to come. */
  private keepUntil = 0;
  private idleTimer: NodeJS.Timeout | undefined;
  private readonly statsTimer: NodeJS.Timeout;
  private readonly finished: Promise<void>;
  private finish!: () => void;
  /** The daemon that started this host: its parent until it dies (named in the environment, as it may die before this line runs). */
  private readonly daemonPid = Number(process.env['LAYERD_DAEMON_PID']) || process.ppid;

  constructor(
    private server: Server, private readonly logger: Logger, private spare: boolean,
    private readonly serve: (s: Socket) => void, private socketPath: string,
  ) {
    this.finished = new Promise((done) => { this.finish = done; });
    this.statsTimer = setInterval(() => this.housekeeping(), STATS_INTERVAL_MS);
    this.armIdleExit();
  }

  get done(): Promise<void> { return this.finished; }

  async handle(request: HostRequest): Promise<HostReply> {
    if (this.exiting) return { ok: false, code: EXITING, message: 'this mount host is shutting down' };
    switch (request.op) {
      case 'mount': return this.mount(request);
      case 'load': return this.load(request);
      case 'unmount': return this.unmount(request.mountpoint);
      // Mounts being made count as served: the daemon's supervisor must not take one for lost.
      case 'list': return { ok: true, mounts: [...this.mounts.keys(), ...this.pending], pid: process.pid };
      case 'bind': return this.bind(request.socket);
      default: throw new LayerdError(ErrorCodes.EINVAL, `unknown request ${JSON.stringify((request as { op?: unknown }).op)}`);
    }
  }

  /** A spare host becomes the host at `socket` (unless a live host is there already). */
  private async bind(socket: string): Promise<HostReply> {
    if (!this.spare) throw new LayerdError(ErrorCodes.EINVAL, 'only a spare mount host can be bound', { socket });
    if (typeof socket !== 'string' || !socket.startsWith('/')) throw new LayerdError(ErrorCodes.EINVAL, 'bind needs an absolute socket path');
    if (await socketAnswers(socket)) throw new LayerdError(ErrorCodes.EEXIST, `a mount host already serves ${socket}`, { socket });
    this.spare = false; // one bind only, even if two arrive at once
    await rm(socket, { force: true });
    const server = createServer((s) => this.serve(s));
    await new Promise<void>((done, fail) => {
      server.once('error', fail);
      server.listen(socket, () => { server.off('error', fail); done(); });
    });
    const old = this.server;
    this.server = server;
    this.socketPath = socket;
    old.close();
    this.logger.info('spare mount host bound', { socket });
    this.armIdleExit();
    return { ok: true, pid: process.pid };
  }

  private layer(dir: string, plainDirectory: boolean, scanFile: string | undefined): Promise<LayerSource> {
    // (a plain directory is keyed apart: the same path is never read both ways)
    const key = plainDirectory ? `directory:${dir}` : dir;
    let source = this.layers.get(key);
    if (source === undefined) {
      // A plain directory is read from the daemon's walk of it, else walked once, now: its
      // writer (containerd's applier) is done with it. A lazily pulled store layer fetches
      // what it lacks (storage/lazy/).
      source = plainDirectory ? this.plainDirectory(dir, key, scanFile) : layerDirSource(dir);
      source.catch(() => this.layers.delete(key));
      this.layers.set(key, source);
    }
    return source;
  }

  private async plainDirectory(dir: string, key: string, scanFile: string | undefined): Promise<LayerSource> {
    const started = performance.now();
    if (typeof scanFile === 'string') {
      try {
        const source = await directoryScanSource(scanFile, dir);
        this.logger.info('plain directory layer loaded', { dir, from: 'scan', entries: source.index.entries.length, ms: Math.round(performance.now() - started) });
        return source;
      } catch (err) {
        this.logger.warn('directory scan unusable, walking the directory', { dir, scan: scanFile, error: (err as Error).message });
      }
    }
    this.walkedDirectories.add(key);
    const source = await lowerDirSource(dir, key, 'overlay');
    this.logger.info('plain directory layer loaded', { dir, from: 'walk', entries: source.index.entries.length, ms: Math.round(performance.now() - started) });
    return source;
  }

  /** The layer sources of a request (loaded once per host). */
  private sources(request: HostMountRequest | HostLoadRequest): Promise<LayerSource[]> {
    const directories = new Set(Array.isArray(request.directories) ? request.directories : []);
    const scans = typeof request.directoryScans === 'object' && request.directoryScans !== null ? request.directoryScans : {};
    return Promise.all(request.layers.map((dir) => this.layer(dir, directories.has(dir), Object.hasOwn(scans, dir) ? scans[dir] : undefined)));
  }

  private async load(request: HostLoadRequest): Promise<HostReply> {
    if (!Array.isArray(request.layers) || request.layers.some((l) => typeof l !== 'string' || !l.startsWith('/'))) {
      throw new LayerdError(ErrorCodes.EINVAL, 'load needs absolute layer paths');
    }
    this.keepUntil = Math.max(this.keepUntil, Date.now() + PRELOAD_KEEP_MS);
    if (this.idleTimer) clearTimeout(this.idleTimer);
    try {
      this.lowerMerges.get(await this.sources(request));
    } finally {
      this.armIdleExit();
    }
    return { ok: true, pid: process.pid };
  }

  private async mount(request: HostMountRequest): Promise<HostReply> {
    const { mountpoint } = request;
    if (this.mounts.has(mountpoint) || this.pending.has(mountpoint)) {
      throw new LayerdError(ErrorCodes.EEXIST, `${mountpoint} is already served by this host`, { mountpoint });
    }
    this.pending.add(mountpoint);
    if (this.idleTimer) clearTimeout(this.idleTimer);
    try {
      const directories = new Set(Array.isArray(request.directories) ? request.directories : []);
      const layers = await this.sources(request);
      const stats = request.statsFile !== undefined ? await OpStats.continuing(request.statsFile) : undefined;
      const record = request.record === true ? new AccessRecorder() : undefined;
      const mounted = await mountUnion({
        layers, upper: request.upper, mountpoint, readOnly: request.readOnly ?? false, logger: this.logger, lowerMerges: this.lowerMerges,
        ...(stats ? { stats } : {}), ...(request.liveLayer !== undefined ? { liveLayer: request.liveLayer } : {}),
        ...(typeof request.cacheSeconds === 'number' ? { cacheSeconds: request.cacheSeconds } : {}),
        ...(record ? { record } : {}), preferWakeupsHere: false,
      });
      this.mounts.set(mountpoint, { mounted, stats, statsFile: request.statsFile, record });
      // Someone else may unmount it (umount, the daemon clearing a mount): forget it then.
      void mounted.gone.then(() => this.forget(mountpoint));
      const walked = [...directories].filter((dir) => this.walkedDirectories.has(`directory:${dir}`)).length;
      return { ok: true, pid: process.pid, ...(directories.size > 0 ? { walked } : {}) };
    } finally {
      this.pending.delete(mountpoint);
      this.armIdleExit();
    }
  }

  private async unmount(mountpoint: string): Promise<HostReply> {
    const hosted = this.mounts.get(mountpoint);
    if (hosted === undefined) throw new LayerdError(ErrorCodes.ENOTFOUND, `${mountpoint} is not served by this host`, { mountpoint });
    await hosted.mounted.unmount();
    await this.forget(mountpoint);
    return { ok: true, ...(hosted.record ? { accesses: hosted.record.ops } : {}) };
  }

  /**
   * Drop a mount that is gone and write its final counts. Called twice for
   * each unmount (by `unmount`, and when the mount's end is seen): both wait
   * for the same write, so an unmount is answered only once its counts are
   * on disk (the second call used to return at once, and a caller reading
   * the stats file right after its Remove could find none).
   */
  private forget(mountpoint: string): Promise<void> {
    const inFlight = this.forgetting.get(mountpoint);
    if (inFlight !== undefined) return inFlight;
    const hosted = this.mounts.get(mountpoint);
    if (hosted === undefined) return Promise.resolve();
    this.mounts.delete(mountpoint);
    const done = (async () => {
      if (hosted.stats && hosted.statsFile) await hosted.stats.writeTo(hosted.statsFile).catch(() => undefined);
      this.armIdleExit();
    })().finally(() => this.forgetting.delete(mountpoint));
    this.forgetting.set(mountpoint, done);
    return done;
  }

  private housekeeping(): void {
    this.writeStats();
    // A spare whose socket is gone (its store was removed) can never be bound: leave.
    if (this.spare) void stat(this.socketPath).catch(() => this.shutdown('spare socket removed'));
    // A spare serves nothing: once its daemon is gone (killed; a stopping one stops it), so is its reason to wait.
    if (this.spare && process.ppid !== this.daemonPid) void this.shutdown('its daemon is gone');
  }

  private writeStats(): void {
    for (const { stats, statsFile } of this.mounts.values()) {
      if (stats && statsFile) void stats.writeTo(statsFile).catch(() => undefined);
    }
  }

  private armIdleExit(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    if (this.mounts.size > 0 || this.pending.size > 0 || this.exiting) return;
    this.idleTimer = setTimeout(() => { void this.shutdown('idle'); }, this.spare ? SPARE_IDLE_EXIT_MS : Math.max(IDLE_EXIT_MS, this.keepUntil - Date.now()));
  }

  /** Stop taking requests, unmount everything, and let the process end. */
  async shutdown(why: string): Promise<void> {
    if (this.exiting) return;
    this.exiting = true;
    if (this.idleTimer) clearTimeout(this.idleTimer);
    clearInterval(this.statsTimer);
    this.server.close();
    this.logger.info('mount host stopping', { why, mounts: this.mounts.size });
    await Promise.all([...this.mounts.keys()].map((mnt) => this.unmount(mnt).catch((err: unknown) => {
      this.logger.warn('unmount failed while stopping', { mountpoint: mnt, error: String(err) });
    })));
    this.finish();
  }
}

/** Read one request line, answer one reply line. */
function serveConnection(host: MountHost, socket: Socket, logger: Logger): void {
  let buffered = '';
  socket.setEncoding('utf8');
  socket.on('error', () => undefined);
  socket.on('data', (chunk: string) => {
    buffered += chunk;
    if (buffered.length > MAX_REQUEST_BYTES) return socket.destroy();
    const nl = buffered.indexOf('\n');
    if (nl < 0) return;
    socket.pause();
    const line = buffered.slice(0, nl);
    void (async () => {
      let reply: HostReply;
      try {
        reply = await host.handle(JSON.parse(line) as HostRequest);
      } catch (err) {
        const code = isLayerdError(err) ? err.code : err instanceof SyntaxError ? ErrorCodes.EINVAL : ErrorCodes.EIO;
        reply = { ok: false, code, message: err instanceof Error ? err.message : String(err) };
        logger.warn('mount host request failed', { code, error: reply.message });
      }
      socket.end(JSON.stringify(reply) + '\n');
    })();
  });
}

/** True when something answers on `path` (a live host). */
export function socketAnswers(path: string): Promise<boolean> {
  return new Promise((done) => {
    const s = createConnection(path);
    s.once('connect', () => { s.destroy(); done(true); });
    s.once('error', () => done(false));
  });
}

export async function mountHostCommand(argv: string[]): Promise<number> {
  const program = new Command('layerd mount-host')
    .description('serve many union mounts of one image from one process, on request over a Unix socket')
    .requiredOption('--socket <path>', 'where to listen')
    .option('--spare', 'a host started ahead of need: waits to be bound to a layer stack')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  try {
    program.parse(argv, { from: 'user' });
  } catch (err) {
    return err instanceof CommanderError && err.exitCode === 0 ? 0 : 2;
  }
  const { socket: socketPath, spare } = program.opts<{ socket: string; spare?: boolean }>();
  const logger = createLogger({ component: 'mount-host' });
  await mkdir(dirname(socketPath), { recursive: true, mode: 0o700 });
  // A socket file nobody answers on is left by a host that died; a live one is another host's.
  if (await socketAnswers(socketPath)) {
    logger.error('another mount host already serves this socket', { socket: socketPath });
    return 4;
  }
  await rm(socketPath, { force: true });

  let host!: MountHost;
  const serve = (s: Socket): void => serveConnection(host, s, logger);
  const server = createServer(serve);
  host = new MountHost(server, logger, spare === true, serve, socketPath);
  await new Promise<void>((done, fail) => {
    server.once('error', fail);
    server.listen(socketPath, () => { server.off('error', fail); done(); });
  });
  // Handlers before "ready": a signal sent as soon as it is read must not kill the host with mounts up.
  const stop = (): void => { void host.shutdown('signal'); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.stdout.write(`ready ${socketPath}\n`);
  logger.info('mount host ready', { socket: socketPath, pid: process.pid });
  if (spare) void warmUpMounting().catch((err: unknown) => logger.warn('warm-up failed', { error: String(err) }));
  await host.done; // server.close() has removed the socket file
  return 0;
}
