/**
 * Starting and stopping the processes that serve union mounts. Every mount
 * the daemon makes (a container's rootfs, a containerd snapshot) goes
 * through here, so how mounts are served is decided in one place.
 *
 * Mounts are served by mount hosts (mount/mountHost.ts): detached
 * `layerd mount-host` processes, one per layer stack (image), each serving
 * every mount of that stack. A host is in its own session with no pipe to
 * the daemon, so it keeps serving when the daemon stops, restarts or is
 * upgraded; the daemon finds it again by PID and socket. A host is started
 * on the first mount of its stack and leaves by itself a few seconds after
 * its last mount is gone. One spare host is kept started ahead of need
 * (`prewarmMountHost`), so the first mount of an image does not wait for a
 * process to start either.
 *
 * Servers of older daemons (one `layerd mount` process per mount) are still
 * understood when adopted and stopped.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, open, readFile, readdir } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type ErrorCode, ErrorCodes, LayerdError } from '../common/errors.js';
import { processAlive, sleep } from '../common/process.js';
import { clearDeadMount, findMount, isDeadMount } from '../mount/deadMount.js';
import { type AccessOp, validAccessOps } from '../mount/accessRecord.js';
import { EXITING, type HostMountRequest, type HostReply, type HostRequest, socketAnswers } from '../mount/mountHost.js';

const LAYERD_BIN = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'layerd');
const READY_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;
/** How long a stopping daemon gives its spare host (bounded: the daemon's own stop must stay short). */
const SPARE_STOP_MS = 3_000;
const DEFAULT_HOSTS_DIR = '/run/layerd/hosts';

export interface MountSpec {
  /** Store layer directories (layers/sha256/<diffID>), bottom → top. */
  layers: string[];
  /** Those of `layers` that are plain directories in overlayfs's format instead (an unpack snapshot's directory). */
  directories?: string[];
  /** For some of `directories`: a file with the daemon's walk of it (mount/directoryScan.ts), so the host does not walk it again. */
  directoryScans?: Record<string, string>;
  /** A host directory served as a live read-only layer above `layers` (kept current by a watcher). */
  liveLayer?: string;
  /** The writable upper directory. */
  upper: string;
  mountpoint: string;
  readOnly: boolean;
  /** Where the server writes its FUSE operation statistics. */
  statsFile?: string;
  /** Put in errors, e.g. `{ container: id }`. */
  context?: Record<string, string>;
  /** Kernel name/attribute cache lifetime in seconds (default: 60 read-only, 1 writable, 0.25 with a live layer). */
  cacheSeconds?: number;
  /** Where mount hosts keep their sockets and logs (default $LAYERD_HOSTS_DIR or /run/layerd/hosts). */
  hostsDir?: string;
  /**
   * Which host serves the mount: the one of this key (e.g. an image's chain
   * ID), instead of the one of `layers` (the default). A containerd image's
   * chain keeps its host when its layers, once ingested, are read from the
   * store instead of their unpack directories.
   */
  hostKey?: string;
  /** Have the host record the mount's first accesses (mount/accessRecord.ts): stopMount returns them. */
  record?: boolean;
}

/** A mount being served: by whom, and where. */
export interface ServedMount {
  pid: number;
  mountpoint: string;
  /** How many of `directories` the host had to walk itself (no usable scan). */
  walkedDirectories?: number;
}

/**
 * The socket each host this process mounted through answers on, by pid: a
 * host never moves once bound, so stopMount asks it at once instead of
 * finding it among the hosts directory's sockets (a container's Remove is on
 * the path of the next `ctr run`: containerd's GC holds its snapshotter lock).
 */
const hostSockets = new Map<number, string>();

/** The key of the host that serves a stack (its socket and log are named after it). */
function hostKeyOf(spec: Pick<MountSpec, 'layers' | 'hostKey'>): string {
  return createHash('sha256').update(spec.hostKey !== undefined ? `key:${spec.hostKey}` : spec.layers.map((l) => resolve(l)).join('\n')).digest('hex').slice(0, 16);
}

/**
 * Have the host of a stack load and merge its layers now, for mounts to
 * come (a host started for it, or the spare bound, if none serves it yet):
 * the first mount of the stack then finds them ready. Resolves when done.
 */
export async function preloadLayers(spec: Pick<MountSpec, 'layers' | 'hostKey' | 'hostsDir' | 'context'>): Promise<void> {
  const hostsDir = resolve(spec.hostsDir ?? process.env['LAYERD_HOSTS_DIR'] ?? DEFAULT_HOSTS_DIR);
  await askServingHost(hostsDir, hostKeyOf(spec), { op: 'load', layers: spec.layers.map((l) => resolve(l)) }, spec.context ?? {}, 'load layers');
}

/** Start serving `spec` and resolve once the mount is live. */
export async function startMount(spec: MountSpec): Promise<ServedMount> {
  const context = { mountpoint: spec.mountpoint, ...spec.context };
  const hostsDir = resolve(spec.hostsDir ?? process.env['LAYERD_HOSTS_DIR'] ?? DEFAULT_HOSTS_DIR);
  const key = hostKeyOf(spec);
  const request: HostMountRequest = {
    op: 'mount', layers: spec.layers.map((l) => resolve(l)), upper: resolve(spec.upper), mountpoint: resolve(spec.mountpoint),
    ...(spec.directories !== undefined && spec.directories.length > 0 ? { directories: spec.directories.map((d) => resolve(d)) } : {}),
    ...(spec.directoryScans !== undefined && Object.keys(spec.directoryScans).length > 0
      ? { directoryScans: Object.fromEntries(Object.entries(spec.directoryScans).map(([d, f]) => [resolve(d), resolve(f)])) } : {}),
    ...(spec.readOnly ? { readOnly: true } : {}),
    ...(spec.liveLayer !== undefined ? { liveLayer: resolve(spec.liveLayer) } : {}),
    ...(spec.statsFile !== undefined ? { statsFile: resolve(spec.statsFile) } : {}),
    ...(spec.cacheSeconds !== undefined ? { cacheSeconds: spec.cacheSeconds } : {}),
    ...(spec.record === true ? { record: true } : {}),
  };
  const reply = await askServingHost(hostsDir, key, request, context, `mount ${spec.mountpoint}`);
  return { pid: reply.pid!, mountpoint: request.mountpoint, ...(reply.walked !== undefined ? { walkedDirectories: reply.walked } : {}) };
}

/** The host of a stack (by its socket key): socket path. */
function hostSocketOf(hostsDir: string, key: string): string {
  return join(hostsDir, `${key}.sock`);
}

/**
 * Have the host of the stack `key` (taking the spare or starting one when
 * none answers) answer `request`; its ok reply.
 */
async function askServingHost(hostsDir: string, key: string, request: HostRequest, context: Record<string, string>, what: string): Promise<HostReply & { ok: true }> {
  const socket = hostSocketOf(hostsDir, key);
  let tookSpare = false;
  try {
    for (let attempt = 0; ; attempt++) {
      const reply = await askHost(socket, request, READY_TIMEOUT_MS).catch(() => undefined);
      if (reply?.ok) {
        hostSockets.set(reply.pid!, socket);
        return reply;
      }
      if (reply !== undefined && reply.code !== EXITING) {
        throw new LayerdError(asErrorCode(reply.code), `cannot ${what}: ${reply.message}`, context);
      }
      // No host answers (none yet, or it is leaving): take the spare or start one, then ask again.
      if (attempt >= 3) throw new LayerdError(ErrorCodes.EIO, `no mount host would ${what}`, { ...context, socket });
      if (attempt === 0 && await bindSpare(hostsDir, socket)) {
        tookSpare = true;
        continue;
      }
      await startHost(socket, join(hostsDir, `${key}.log`), context);
    }
  } finally {
    // The next spare starts once this mount is served: a Node.js start-up takes
    // ~0.3 s of CPU, which the mount would otherwise share on a small machine.
    if (tookSpare) void prewarmMountHost(hostsDir).catch(() => undefined);
  }
}

const spareSocket = (hostsDir: string): string => join(hostsDir, 'spare.sock');

/** Turn the spare host (if one runs) into the host at `socket` (the caller starts the next spare). */
async function bindSpare(hostsDir: string, socket: string): Promise<boolean> {
  const reply = await askHost(spareSocket(hostsDir), { op: 'bind', socket }, READY_TIMEOUT_MS).catch(() => undefined);
  if (reply === undefined) return false;
  return reply.ok || reply.code === ErrorCodes.EEXIST; // EEXIST: another host got there first; ask it
}

/**
 * Keep one spare mount host running under `hostsDir` (idempotent). It costs
 * one idle process (~40 MiB) and saves the first mount of each image the
 * ~300 ms a new process takes to start.
 */
export async function prewarmMountHost(hostsDir: string): Promise<void> {
  const socket = spareSocket(hostsDir);
  await startHost(socket, join(hostsDir, 'spare.log'), { socket }, ['--spare']);
}

/**
 * Stop the spare host under `hostsDir`, if one waits there (daemon stop: a
 * spare serves nothing, ~70 MB for no one once its daemon is gone). One that
 * has mounts by now is a bound host and is left alone.
 */
/** The pid of the spare host waiting under `hostsDir`, if one answers. */
export async function spareHostPid(hostsDir: string): Promise<number | undefined> {
  const reply = await askHost(spareSocket(hostsDir), { op: 'list' }, 2_000).catch(() => undefined);
  return reply?.ok ? reply.pid : undefined;
}

export async function stopSpareHost(hostsDir: string): Promise<void> {
  // One being started comes up after: wait for it a little (a spare still
  // starting when the daemon has gone leaves by itself, LAYERD_DAEMON_PID).
  const started = starting.get(spareSocket(hostsDir))?.catch(() => undefined);
  if (started) await Promise.race([started, sleep(SPARE_STOP_MS)]);
  const reply = await askHost(spareSocket(hostsDir), { op: 'list' }, SPARE_STOP_MS).catch(() => undefined);
  if (!reply?.ok || reply.pid === undefined || (reply.mounts?.length ?? 0) > 0 || !processAlive(reply.pid)) return;
  // It serves nothing and the stopping daemon binds nothing more: there is
  // nothing for it to clean up, and a SIGTERM would wait for its warm-up.
  process.kill(reply.pid, 'SIGKILL');
  const deadline = Date.now() + SPARE_STOP_MS;
  while (processAlive(reply.pid) && Date.now() < deadline) await sleep(25);
}

/** Hosts being started by this process, by socket (so concurrent mounts of one image share one). */
const starting = new Map<string, Promise<void>>();

function startHost(socket: string, logFile: string, context: Record<string, string>, extraArgs: string[] = []): Promise<void> {
  let started = starting.get(socket);
  if (started === undefined) {
    started = spawnHost(socket, logFile, context, extraArgs).finally(() => starting.delete(socket));
    starting.set(socket, started);
  }
  return started;
}

async function spawnHost(socket: string, logFile: string, context: Record<string, string>, extraArgs: string[]): Promise<void> {
  if (await socketAnswers(socket)) return;
  await mkdir(dirname(socket), { recursive: true, mode: 0o700 });
  const log = await open(logFile, 'a', 0o600);
  let pid: number | undefined;
  let exited: number | null | undefined;
  try {
    // Detached, in its own session, with no pipe to the daemon: it must
    // keep serving when the daemon stops or restarts.
    // LAYERD_MOUNT_HOST_NODE_ARGS: extra node flags for hosts (e.g. `--cpu-prof --cpu-prof-dir=DIR` to profile
    // one; node refuses those in NODE_OPTIONS).
    const nodeArgs = (process.env['LAYERD_MOUNT_HOST_NODE_ARGS'] ?? '').split(' ').filter((a) => a !== '');
    const child = spawn(process.execPath, [...nodeArgs, LAYERD_BIN, 'mount-host', '--socket', socket, ...extraArgs], {
      detached: true, stdio: ['ignore', log.fd, log.fd], env: { ...process.env, LAYERD_DAEMON_PID: String(process.pid) },
    });
    child.unref();
    child.once('exit', (code) => { exited = code; });
    pid = child.pid;
  } finally {
    await log.close();
  }
  if (pid === undefined) throw new LayerdError(ErrorCodes.EIO, 'could not start a mount host', { ...context, socket });
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (!(await socketAnswers(socket))) {
    if (exited !== undefined) return; // e.g. another host won the race; the caller asks again
    if (Date.now() > deadline) {
      process.kill(pid, 'SIGKILL');
      const tail = (await readFile(logFile, 'utf8').catch(() => '')).split('\n').slice(-5).join('\n');
      throw new LayerdError(ErrorCodes.EIO, `the mount host did not come up: ${tail}`, { ...context, socket });
    }
    await sleep(10);
  }
}

/** One request line to a host, one reply line back. */
function askHost(socket: string, request: HostRequest, timeoutMs: number): Promise<HostReply> {
  return new Promise((done, fail) => {
    const conn = createConnection(socket);
    let text = '';
    const timer = setTimeout(() => { conn.destroy(); fail(new Error(`mount host ${socket} did not answer`)); }, timeoutMs);
    conn.setEncoding('utf8');
    conn.once('connect', () => conn.write(JSON.stringify(request) + '\n'));
    conn.on('data', (chunk: string) => { text += chunk; });
    conn.once('error', (err) => { clearTimeout(timer); fail(err); });
    conn.once('end', () => {
      clearTimeout(timer);
      try {
        done(JSON.parse(text) as HostReply);
      } catch (err) {
        fail(err);
      }
    });
  });
}

function asErrorCode(code: string): ErrorCode {
  return (Object.values(ErrorCodes) as string[]).includes(code) ? code as ErrorCode : ErrorCodes.EIO;
}

/**
 * What serves as `pid`: a mount host, with the socket it answers on now
 * (undefined if none answers), or a one-mount server of an older daemon.
 * A host's command line names the socket it started on; a spare host has
 * since moved to another socket of the same directory, so the host that
 * answers with `pid` is looked for there.
 */
async function serverOf(pid: number): Promise<{ kind: 'host'; socket: string | undefined } | { kind: 'single' }> {
  const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
  if (!argv.includes('mount-host')) return { kind: 'single' };
  const i = argv.indexOf('--socket');
  if (i < 0 || argv[i + 1] === undefined) return { kind: 'host', socket: undefined };
  const started = argv[i + 1]!;
  const candidates = [started, ...(await readdir(dirname(started)).catch(() => [] as string[]))
    .filter((name) => name.endsWith('.sock')).map((name) => join(dirname(started), name)).filter((p) => p !== started)];
  for (const socket of candidates) {
    const reply = await askHost(socket, { op: 'list' }, STOP_TIMEOUT_MS).catch(() => undefined);
    if (reply?.ok && reply.pid === pid) return { kind: 'host', socket };
  }
  return { kind: 'host', socket: undefined };
}

/** Whether `served` is still a live mount with its server running. */
export async function isServing(served: ServedMount): Promise<boolean> {
  if (!processAlive(served.pid)) return false;
  const entry = await findMount(served.mountpoint);
  return entry?.fstype.startsWith('fuse') === true && !(await isDeadMount(served.mountpoint));
}

/**
 * The mountpoints the mount host `pid` serves now (those it is mounting
 * included), or undefined when that cannot be told: not a host (a one-mount
 * server of an older daemon), or no answer. A mount whose FUSE connection
 * ended while its host lives (aborted through fusectl, unmounted from
 * outside) is missing here: the host forgets a mount once its connection ends.
 */
export async function mountsServedBy(pid: number): Promise<Set<string> | undefined> {
  if (!processAlive(pid)) return undefined;
  const known = hostSockets.get(pid);
  const socket = known ?? await serverOf(pid).then((s) => (s.kind === 'host' ? s.socket : undefined));
  if (socket === undefined) return undefined;
  const reply = await askHost(socket, { op: 'list' }, STOP_TIMEOUT_MS).catch(() => undefined);
  if (!reply?.ok || reply.pid !== pid || reply.mounts === undefined) return undefined;
  if (known === undefined) hostSockets.set(pid, socket);
  return new Set(reply.mounts);
}

/** mountsServedBy, asked once per host for one supervision round. */
export class HostMountsCache {
  private readonly byPid = new Map<number, Promise<Set<string> | undefined>>();

  /** False only when the live host `pid` says it does not serve `mountpoint` (unknown counts as served). */
  async serves(pid: number, mountpoint: string): Promise<boolean> {
    let mounts = this.byPid.get(pid);
    if (mounts === undefined) {
      mounts = mountsServedBy(pid);
      this.byPid.set(pid, mounts);
    }
    const set = await mounts;
    return set === undefined || set.has(resolve(mountpoint));
  }
}

/**
 * Stop serving a mount: ask its host to unmount it (or, for a one-mount
 * server of an older daemon, SIGTERM it, forced after a while), then clear
 * whatever is left at the mountpoint. `pid` may be null (no server known)
 * or a server that already died. Returns the accesses the host recorded
 * for the mount (MountSpec.record), when it had them.
 */
export async function stopMount(pid: number | null, mountpoint: string): Promise<AccessOp[] | undefined> {
  if (pid !== null && processAlive(pid)) {
    const known = hostSockets.get(pid);
    // (a reply other than ok — another host on that socket by now, or none — falls back to the search below)
    const reply = known === undefined ? undefined : await askHost(known, { op: 'unmount', mountpoint: resolve(mountpoint) }, STOP_TIMEOUT_MS).catch(() => undefined);
    if (reply?.ok === true) {
      if (await findMount(mountpoint)) await clearDeadMount(mountpoint);
      return reply.accesses === undefined ? undefined : validAccessOps(reply.accesses);
    }
    const server = await serverOf(pid);
    if (server.kind === 'host') {
      // Never killed: it serves other mounts. One that does not answer loses just this mount below.
      if (server.socket !== undefined) {
        await askHost(server.socket, { op: 'unmount', mountpoint: resolve(mountpoint) }, STOP_TIMEOUT_MS).catch(() => undefined);
      }
    } else {
      process.kill(pid, 'SIGTERM');
      const deadline = Date.now() + STOP_TIMEOUT_MS;
      while (processAlive(pid) && Date.now() < deadline) await sleep(25);
      if (processAlive(pid)) process.kill(pid, 'SIGKILL');
    }
  }
  if (await findMount(mountpoint)) await clearDeadMount(mountpoint);
  return undefined;
}
