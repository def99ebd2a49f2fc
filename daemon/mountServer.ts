/**
 * Starting and stopping the processes that serve union mounts. Every mount
 * the daemon makes (a container's rootfs, a containerd snapshot) goes
 * through here, so how mounts are served is decided in one place.
 *
 * A mount is served by a detached `layerd mount --layers …` process in its
 * own session, with no pipe to the daemon: it keeps serving when the daemon
 * stops, restarts or is upgraded, and the daemon adopts it again by PID.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { open, readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { processAlive, sleep } from '../common/process.js';
import { clearDeadMount, findMount, isDeadMount } from '../mount/deadMount.js';

const LAYERD_BIN = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'layerd');
const READY_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;

export interface MountSpec {
  /** Store layer directories (layers/sha256/<diffID>), bottom → top. */
  layers: string[];
  /** A host directory served as a live read-only layer above `layers` (kept current by a watcher). */
  liveLayer?: string;
  /** The writable upper directory. */
  upper: string;
  mountpoint: string;
  readOnly: boolean;
  /** The server's log (appended to). */
  logFile: string;
  /** Where the server writes its FUSE operation statistics. */
  statsFile?: string;
  /** Put in errors, e.g. `{ container: id }`. */
  context?: Record<string, string>;
}

/** A mount being served: by whom, and where. */
export interface ServedMount {
  pid: number;
  mountpoint: string;
}

/** Start serving `spec` and resolve once the mount is live. */
export async function startMount(spec: MountSpec): Promise<ServedMount> {
  const context = { mountpoint: spec.mountpoint, ...spec.context };
  const args = [LAYERD_BIN, 'mount', '--layers', [...spec.layers].reverse().join(':'), '--upper', spec.upper];
  if (spec.liveLayer !== undefined) args.push('--live-layer', spec.liveLayer);
  if (spec.statsFile !== undefined) args.push('--stats-file', spec.statsFile);
  if (spec.readOnly) args.push('--read-only');
  args.push(spec.mountpoint);
  const log = await open(spec.logFile, 'a', 0o600);
  let child: ChildProcess;
  try {
    child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', log.fd, log.fd] });
  } finally {
    await log.close();
  }
  child.unref();
  const pid = child.pid;
  if (pid === undefined) throw new LayerdError(ErrorCodes.EIO, `could not start a mount server for ${spec.mountpoint}`, context);
  let exited: number | null | undefined;
  child.once('exit', (code) => { exited = code; });
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    const entry = await findMount(spec.mountpoint);
    if (entry?.fstype.startsWith('fuse')) return { pid, mountpoint: spec.mountpoint };
    if (exited !== undefined || Date.now() > deadline) {
      if (exited === undefined) process.kill(pid, 'SIGKILL');
      const tail = (await readFile(spec.logFile, 'utf8').catch(() => '')).split('\n').slice(-5).join('\n');
      throw new LayerdError(ErrorCodes.EIO, `the mount server for ${spec.mountpoint} did not come up: ${tail}`, context);
    }
    await sleep(25);
  }
}

/** Whether `served` is still a live mount with its server running. */
export async function isServing(served: ServedMount): Promise<boolean> {
  if (!processAlive(served.pid)) return false;
  const entry = await findMount(served.mountpoint);
  return entry?.fstype.startsWith('fuse') === true && !(await isDeadMount(served.mountpoint));
}

/**
 * Stop serving a mount: ask its server to unmount (SIGTERM), force it after
 * a while, and clear whatever is left at the mountpoint. `pid` may be null
 * (no server known) or a server that already died.
 */
export async function stopMount(pid: number | null, mountpoint: string): Promise<void> {
  if (pid !== null && processAlive(pid)) {
    process.kill(pid, 'SIGTERM');
    const deadline = Date.now() + STOP_TIMEOUT_MS;
    while (processAlive(pid) && Date.now() < deadline) await sleep(25);
    if (processAlive(pid)) process.kill(pid, 'SIGKILL');
  }
  if (await findMount(mountpoint)) await clearDeadMount(mountpoint);
}
