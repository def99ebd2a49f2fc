/**
 * A real systemd as PID 1 for tests: a Debian root made once with
 * debootstrap (cached under /var/cache/layerd-test, keyed by what goes into
 * it) and booted with `systemd-nspawn -b`.
 *
 * What the host needs (learned the hard way; see issue 18):
 * - no D-Bus on the host: `--register=no --keep-unit`, so nspawn runs in
 *   the cgroup it is started in: a fresh one, made here (in every mounted
 *   hierarchy, e.g. `unified` and `systemd` on a hybrid host) and removed
 *   afterwards, or nspawn leaves `payload/` and `supervisor/` behind in the
 *   caller's cgroup;
 * - DeviceAllow=/DevicePolicy= are only enforced with a cgroup2 tree inside
 *   (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1) and the bpf() system call allowed
 *   (`--system-call-filter=bpf`);
 * - `--console=read-only` (a passive console hung a booting systemd), and a
 *   bound on every wait; commands run inside through `nsenter -t <PID 1> -a`.
 *
 * The cached root is never written: the machine boots with
 * `--volatile=overlay` (a tmpfs over it, gone with the machine), and gets
 * /var/lib/layerd from a scratch directory of the host (a store on real disk,
 * not on the overlay).
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { access, mkdir, readFile, readdir, rename, rm, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { processAlive } from '../../common/process.js';
import { waitFor } from './daemon.js';
import { stopChild } from './processes.js';

const run = promisify(execFile);

const SUITE = 'bookworm';
/** What the machine's root holds beyond minbase: a booting systemd, and make for `make install`. */
export const MACHINE_PACKAGES = ['systemd', 'systemd-sysv', 'dbus', 'make'];
const MIRROR = process.env['LAYERD_DEBIAN_MIRROR'] ?? 'http://deb.debian.org/debian';
const CACHE_DIR = process.env['LAYERD_TEST_CACHE'] ?? '/var/cache/layerd-test';
const COMPLETE_MARK = '.layerd-root-complete';
const DEBOOTSTRAP_TIMEOUT_MS = 10 * 60_000;
const BOOT_TIMEOUT_MS = 90_000;
const POWEROFF_TIMEOUT_MS = 30_000;
/** The environment commands inside the machine get (nothing of the test's own). */
const MACHINE_ENV = ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'LANG=C.UTF-8', 'SYSTEMD_COLORS=0', 'SYSTEMD_PAGER=', 'TERM=dumb'];

async function exists(path: string): Promise<boolean> {
  return access(path).then(() => true, () => false);
}

async function onPath(command: string): Promise<boolean> {
  return run('sh', ['-c', `command -v ${command}`]).then(() => true, () => false);
}

/** The cgroup hierarchies to give a machine its own cgroup in: cgroup2 (required), plus name=systemd on a hybrid host. */
async function cgroupRoots(): Promise<string[] | undefined> {
  if (await exists('/sys/fs/cgroup/cgroup.controllers')) return ['/sys/fs/cgroup'];
  if (!(await exists('/sys/fs/cgroup/unified/cgroup.controllers'))) return undefined;
  return (await exists('/sys/fs/cgroup/systemd/cgroup.procs')) ? ['/sys/fs/cgroup/unified', '/sys/fs/cgroup/systemd'] : ['/sys/fs/cgroup/unified'];
}

/** Why systemd-nspawn cannot boot a machine here, or undefined if it can. */
export async function whyNspawnCannotRun(): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return 'systemd-nspawn needs root';
  for (const [command, pkg] of [['systemd-nspawn', 'systemd-container'], ['debootstrap', 'debootstrap'], ['nsenter', 'util-linux']] as const) {
    if (!(await onPath(command))) return `${command} is not installed (Debian package ${pkg}; \`make test\` installs it)`;
  }
  if (!(await exists('/dev/fuse'))) return 'no /dev/fuse on this host';
  const roots = await cgroupRoots();
  if (!roots) return 'no cgroup2 hierarchy mounted (neither /sys/fs/cgroup nor /sys/fs/cgroup/unified)';
  const probe = `layerd-probe-${process.pid}`;
  for (const root of roots) {
    try {
      await mkdir(join(root, probe));
      await rmdir(join(root, probe));
    } catch (err) {
      return `cannot create a cgroup under ${root} (${(err as Error).message}): nspawn cannot be given a cgroup of its own`;
    }
  }
  return undefined;
}

/**
 * The machine's root directory: made once with debootstrap and cached,
 * keyed by the suite, variant, architecture and package list. Built beside
 * its final name and renamed into place, so a run that is interrupted (or
 * two runs at once) never leaves a half-made root under the final name.
 */
export async function machineRoot(log: (line: string) => void): Promise<string> {
  const key = createHash('sha256').update(JSON.stringify({ SUITE, variant: 'minbase', arch: process.arch, MACHINE_PACKAGES })).digest('hex').slice(0, 16);
  const dir = join(CACHE_DIR, `nspawn-${SUITE}-${key}`);
  if (await exists(join(dir, COMPLETE_MARK))) return dir;
  await mkdir(CACHE_DIR, { recursive: true });
  // Roots left half-built by runs that were killed.
  for (const name of await readdir(CACHE_DIR)) {
    const owner = /\.building-(\d+)$/.exec(name);
    if (owner && !processAlive(Number(owner[1]))) await rm(join(CACHE_DIR, name), { recursive: true, force: true });
  }
  const building = `${dir}.building-${process.pid}`;
  log(`debootstrap ${SUITE} (minbase, ${MACHINE_PACKAGES.join(',')}) into ${dir}: about a minute, once`);
  try {
    await run('debootstrap', ['--variant=minbase', `--include=${MACHINE_PACKAGES.join(',')}`, SUITE, building, MIRROR], {
      timeout: DEBOOTSTRAP_TIMEOUT_MS, killSignal: 'SIGKILL', maxBuffer: 64 * 1024 * 1024,
    });
    await writeFile(join(building, COMPLETE_MARK), `${new Date().toISOString()} ${MACHINE_PACKAGES.join(' ')}\n`);
    await rename(building, dir).catch(async (err: unknown) => {
      // Another run put its root in place first: use that one.
      if (!(await exists(join(dir, COMPLETE_MARK)))) throw err;
    });
    return dir;
  } finally {
    await rm(building, { recursive: true, force: true });
  }
}

export interface Bind {
  host: string;
  /** Where it appears in the machine (default: the host path). */
  machine?: string;
  readOnly?: boolean;
}

export interface ExecResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** The PID (on the host) of the machine's PID 1: the child of nspawn that is PID 1 in its own namespace. */
async function findLeader(nspawnPid: number): Promise<number | undefined> {
  const children = await readFile(`/proc/${nspawnPid}/task/${nspawnPid}/children`, 'utf8').catch(() => '');
  for (const pid of children.split(' ').filter((p) => p !== '').map(Number)) {
    const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
    const nspid = /^NSpid:\s+(.*)$/m.exec(status)?.[1]?.trim().split(/\s+/);
    if (nspid && nspid.length > 1 && nspid[nspid.length - 1] === '1') return pid;
  }
  return undefined;
}

/** Remove a cgroup and everything below it, deepest first (cgroupfs directories go with rmdir). */
async function removeCgroup(dir: string): Promise<void> {
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
  for (const entry of entries) if (entry.isDirectory()) await removeCgroup(join(dir, entry.name));
  await rmdir(dir).catch((err: NodeJS.ErrnoException) => { if (err.code !== 'ENOENT') throw err; });
}

async function cgroupProcesses(dir: string): Promise<number[]> {
  const pids = (await readFile(join(dir, 'cgroup.procs'), 'utf8').catch(() => '')).split('\n').filter((l) => l !== '').map(Number);
  for (const entry of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
    if (entry.isDirectory()) pids.push(...await cgroupProcesses(join(dir, entry.name)));
  }
  return pids;
}

/** A booted machine: systemd as its PID 1, commands run in it through nsenter. */
export class Machine {
  private console = '';

  private constructor(
    readonly name: string,
    private readonly nspawn: ChildProcess,
    private readonly cgroups: string[],
    /** The host PID of the machine's PID 1. */
    public leader: number,
  ) {}

  /** The last part of the machine's console (boot messages), for failure reports. */
  consoleTail(): string {
    return this.console.slice(-4000);
  }

  /**
   * Boot `root` in a cgroup of its own and wait (bounded) until its systemd
   * has finished starting up. On any failure the machine and its cgroups
   * are gone before this rejects.
   */
  static async boot(root: string, binds: Bind[]): Promise<Machine> {
    const roots = await cgroupRoots();
    if (!roots) throw new Error('no cgroup2 hierarchy');
    const name = `layerd-test-${process.pid}-${randomBytes(3).toString('hex')}`;
    const cgroups = roots.map((r) => join(r, name));
    for (const dir of cgroups) await mkdir(dir);
    const args = [
      '-b', '-D', root, '--volatile=overlay', '-M', name,
      '--register=no', '--keep-unit', '--console=read-only', '--system-call-filter=bpf', '--private-network',
      '--bind=/dev/fuse',
      ...binds.map((b) => `--bind${b.readOnly ? '-ro' : ''}=${b.host}:${b.machine ?? b.host}`),
    ];
    // The shell puts itself in the new cgroups, then becomes nspawn (same PID).
    const nspawn = spawn('sh', ['-c', 'for d in $LAYERD_CGROUPS; do echo $$ > "$d/cgroup.procs" || exit 97; done; exec "$@"', 'sh', 'systemd-nspawn', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LAYERD_CGROUPS: cgroups.join(' '), SYSTEMD_NSPAWN_UNIFIED_HIERARCHY: '1' },
    });
    const machine = new Machine(name, nspawn, cgroups, 0);
    const keep = (d: Buffer): void => { machine.console = (machine.console + d.toString()).slice(-64_000); };
    nspawn.stdout!.on('data', keep);
    nspawn.stderr!.on('data', keep);
    try {
      await waitFor('the machine\'s PID 1', async () => {
        if (nspawn.exitCode !== null) throw new Error(`systemd-nspawn exited (${nspawn.exitCode}): ${machine.consoleTail()}`);
        machine.leader = (await findLeader(nspawn.pid!)) ?? 0;
        return machine.leader !== 0;
      }, 30_000);
      let state = '';
      await waitFor('the machine\'s systemd to finish starting up', async () => {
        if (nspawn.exitCode !== null) throw new Error(`systemd-nspawn exited (${nspawn.exitCode}): ${machine.consoleTail()}`);
        // Fails until systemd listens on its private socket; then waits for the boot to finish.
        state = (await machine.exec(['systemctl', 'is-system-running', '--wait'], { timeoutMs: 20_000 })).stdout.trim();
        return state === 'running' || state === 'degraded';
      }, BOOT_TIMEOUT_MS, 200);
      if (state === 'degraded') {
        const failed = await machine.exec(['systemctl', '--failed', '--no-legend']);
        throw new Error(`the machine booted degraded: ${failed.stdout}`);
      }
      return machine;
    } catch (err) {
      await machine.shutdown().catch(() => undefined);
      throw new Error(`${(err as Error).message}\nconsole:\n${machine.consoleTail()}`);
    }
  }

  /** Run `command` in the machine (all its namespaces, a clean environment), bounded by `timeoutMs`. */
  exec(command: string[], options: { timeoutMs?: number } = {}): Promise<ExecResult> {
    return new Promise((resolve, reject) => {
      const child = this.spawn(command);
      let stdout = '';
      let stderr = '';
      child.stdout!.on('data', (d: Buffer) => { stdout += d.toString(); });
      child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
      const timeoutMs = options.timeoutMs ?? 60_000;
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`timed out after ${timeoutMs} ms: ${command.join(' ')}\n${stdout}${stderr}`));
      }, timeoutMs);
      child.on('error', (err) => { clearTimeout(timer); reject(err); });
      child.on('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr }); });
    });
  }

  /** Like exec, but a non-zero exit is an error carrying the output. */
  async check(command: string[], options: { timeoutMs?: number } = {}): Promise<string> {
    const r = await this.exec(command, options);
    if (r.code !== 0) throw new Error(`${command.join(' ')} exited ${r.code}:\n${r.stdout}${r.stderr}`);
    return r.stdout;
  }

  /** A process in the machine (its namespaces; the test's cgroup), for the caller to stop by PID. */
  spawn(command: string[]): ChildProcess {
    return spawn('nsenter', ['-t', String(this.leader), '-a', 'env', '-i', ...MACHINE_ENV, ...command], { stdio: ['ignore', 'pipe', 'pipe'] });
  }

  /** A path inside the machine as the host reaches it (through its PID 1's root). */
  hostPath(path: string): string {
    return `/proc/${this.leader}/root${path}`;
  }

  /**
   * Power the machine off (nspawn turns SIGTERM into a clean shutdown of its
   * systemd), bounded; if it does not go, SIGKILL its PID 1 (ending its PID
   * namespace) and nspawn. Then the machine's cgroups are removed.
   */
  async shutdown(): Promise<void> {
    if (this.nspawn.exitCode === null && this.nspawn.signalCode === null) {
      try {
        await stopChild(this.nspawn, { signal: 'SIGTERM', graceMs: POWEROFF_TIMEOUT_MS, what: `systemd-nspawn of ${this.name}` });
      } finally {
        if (this.leader !== 0 && processAlive(this.leader)) process.kill(this.leader, 'SIGKILL');
      }
    }
    const left: string[] = [];
    for (const dir of this.cgroups) {
      const emptied = await waitFor(`the processes of ${dir} to end`, async () => (await cgroupProcesses(dir)).length === 0, 15_000).then(() => true, () => false);
      if (!emptied) left.push(`${dir}: ${(await cgroupProcesses(dir)).join(' ')}`);
      else await removeCgroup(dir);
    }
    if (left.length > 0) throw new Error(`processes left in the machine's cgroups: ${left.join('; ')}`);
  }
}
