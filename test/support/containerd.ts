/**
 * A private containerd (Debian's 1.6) with layerd as its proxy snapshotter,
 * for integration tests. containerd 1.6 hard-codes /run/containerd/{s,fifo,runc},
 * so everything runs in a private mount namespace whose /run is a scratch
 * directory: a holder process (`unshare --mount --propagation private …
 * sleep infinity`) owns the namespace, and containerd, layerd (and so its
 * FUSE mount hosts, which must be visible to containerd's shims), ctr and
 * runc are all entered into it with `nsenter -t HOLDER -m`.
 *
 * `stop()` always cleans up: tasks and containers through ctr, containerd
 * and layerd by PID, then every process left in the namespace (shims,
 * container processes, mount hosts) by PID after aborting the namespace's
 * FUSE connections, then the holder, which takes the namespace's mounts
 * with it; cgroups containerd made for the test namespace are removed.
 *
 * "Its" FUSE connections are those of mounts made inside the namespace: it
 * starts as a copy of the host's mount table, with every FUSE mount that
 * existed then (other tests', other CI runs', a user's). A copy shares its
 * original's connection, so aborting it kills the original's server for
 * everyone (a mount host in another run then answers ENOTCONN). Those are
 * recorded when the namespace is made and left alone, and the copies are
 * detached inside the namespace (`umount -l` there touches only the copy): a
 * copy would keep the original's connection alive after its owner unmounts it.
 */
import { expect } from 'chai';
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, readlink, rm, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { loadSnapshotsService } from '../../daemon/snapshotter/server.js';
import { digestOf } from '../../storage/digest.js';
import { parseMountinfo } from '../../mount/deadMount.js';
import { REPO } from './env.js';
import { http } from './daemon.js';
import { signalAndWait, stopChild, waitPidGone } from './processes.js';
import { processAlive, sleep } from '../../common/process.js';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

const TOOLS = ['containerd', 'ctr', 'runc', 'containerd-shim-runc-v2', 'unshare', 'nsenter'];

/** Why the containerd tests cannot run here (a tool is missing), or undefined. */
export function missingTools(): string | undefined {
  const missing = TOOLS.filter((tool) => {
    try {
      execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
      return false;
    } catch {
      return true;
    }
  });
  return missing.length > 0 ? `not installed: ${missing.join(', ')} (apt-get install containerd runc)` : undefined;
}

/** Run a command to completion (killed by PID after `timeoutMs`). */
export function run(command: string, args: string[], options: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: [options.input !== undefined ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    if (options.input !== undefined) child.stdin!.end(options.input);
    const timer = setTimeout(() => { if (child.pid !== undefined) process.kill(child.pid, 'SIGKILL'); }, options.timeoutMs ?? 120_000);
    child.on('error', (err) => { clearTimeout(timer); reject(err); });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? (signal ? 128 : -1), stdout, stderr: signal ? `${stderr}\n(killed by ${signal})` : stderr });
    });
  });
}

/** Throw with the output unless the command succeeded. */
export function ok(what: string, r: RunResult): string {
  if (r.code !== 0) throw new Error(`${what} failed (${r.code}): ${r.stderr.trim()} ${r.stdout.trim()}`.trim());
  return r.stdout;
}

/** SIGTERM, then SIGKILL after `ms`; true once the process is gone, false if it outlived SIGKILL (bounded). */
async function terminate(pid: number, ms = 10_000): Promise<boolean> {
  if (!processAlive(pid)) return true;
  try { process.kill(pid, 'SIGTERM'); } catch { return true; }
  if (await waitPidGone(pid, ms)) return true;
  try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
  return waitPidGone(pid, 10_000);
}

export interface LayerdProcess {
  pid: number;
  child: ChildProcess;
  log(): string;
  exited: Promise<number | null>;
}

export interface ContainerdEnvOptions {
  /** The containerd namespace ctr uses (also the cgroup parent of the containers). */
  namespace?: string;
  /**
   * Enable the CRI plugin with layerd as its snapshotter and snapshot
   * annotations on (its image service on containerd's socket, namespace
   * `k8s.io`); `registryHosts` is its `config_path` (hosts.toml per registry,
   * read at each pull). No CNI: enough for the image service.
   */
  cri?: { registryHosts: string };
  /** Environment layerd runs with, beside the test's own (e.g. LAYERD_TEST_INGEST_GATE). */
  layerdEnv?: Record<string, string>;
  /** More arguments for layerd (e.g. another `--containerd-socket`). */
  layerdArgs?: string[];
}

/** The containerd namespace of the CRI plugin. */
export const CRI_NAMESPACE = 'k8s.io';

export class ContainerdEnv {
  readonly runDir: string;
  readonly layerdRoot: string;
  readonly layerdSocket: string;
  readonly snapshotterSocket: string;
  readonly containerdSocket: string;
  readonly namespace: string;
  holderPid = 0;
  /**
   * FUSE connections (device minors) the namespace inherited from the host
   * when it was made: not ours to abort. Undefined until recorded, before
   * anything mounts inside. (An inherited copy keeps its superblock, so its
   * minor, for the namespace's life: no mount made inside can have it.)
   */
  private inheritedFuse: Set<number> | undefined;
  containerd: ChildProcess | undefined;
  layerd: LayerdProcess | undefined;
  private containerdLog = '';
  /** Namespaces ctr was used with (cleaned at the end). */
  private readonly namespaces = new Set<string>();
  private gcRuns = 0;
  private scriptRuns = 0;

  constructor(readonly dir: string, private readonly options: ContainerdEnvOptions = {}) {
    this.runDir = join(dir, 'run');
    this.layerdRoot = join(dir, 'layerd-root');
    this.layerdSocket = join(dir, 'layerd.sock');
    this.snapshotterSocket = join(dir, 'snapshotter.sock');
    this.containerdSocket = join(dir, 'containerd.sock');
    this.namespace = options.namespace ?? `layerd-itest-${process.pid}`;
    this.namespaces.add(this.namespace);
    if (options.cri) this.namespaces.add(CRI_NAMESPACE);
  }

  /** The holder, layerd, then containerd with layerd as its `layerd` proxy snapshotter. */
  async start(): Promise<void> {
    await mkdir(this.runDir, { recursive: true });
    // The copies of FUSE mounts the namespace inherits are detached in it at once: a copy keeps its
    // original's connection alive after the original is unmounted, so a server waiting for its
    // unmount to end (fuse-overlayfs exits only then) would wait for this namespace to go.
    const detachInherited = `grep -E ' - fuse(\\.[^ ]+)? ' /proc/self/mountinfo | cut -d' ' -f5 | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done`;
    const holder = spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', `mount --bind '${this.runDir}' /run && { ${detachInherited}; } && exec sleep infinity`], { stdio: 'ignore' });
    this.holderPid = holder.pid!;
    const deadline = Date.now() + 10_000;
    while ((await readFile(`/proc/${this.holderPid}/comm`, 'utf8').catch(() => '')).trim() !== 'sleep') {
      if (Date.now() > deadline || holder.exitCode !== null) throw new Error('the mount namespace holder did not start');
      await sleep(20);
    }
    this.inheritedFuse = new Set(fuseMinors(await this.mountinfo()));
    await this.startLayerd(this.options.layerdArgs);
    const config = [
      'version = 2',
      `root = "${join(this.dir, 'containerd-root')}"`,
      `state = "${join(this.dir, 'containerd-state')}"`,
      ...this.criConfig(),
      '[grpc]',
      `  address = "${this.containerdSocket}"`,
      '[plugins."io.containerd.internal.v1.opt"]',
      `  path = "${join(this.dir, 'containerd-opt')}"`,
      // containerd's default GC schedule; tests that wait for a collection ask for one (gc()).
      // (Snapshots nothing references — e.g. made by hand without a lease — may go at any time.)
      '[proxy_plugins.layerd]',
      '  type = "snapshot"',
      `  address = "${this.snapshotterSocket}"`,
      '',
    ].join('\n');
    const configPath = join(this.dir, 'containerd.toml');
    await writeFile(configPath, config);
    const child = spawn('nsenter', ['-t', String(this.holderPid), '-m', '--', 'containerd', '--config', configPath], { stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout!.on('data', (d: Buffer) => { this.containerdLog += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { this.containerdLog += d.toString(); });
    this.containerd = child;
    for (const until = Date.now() + 20_000; ;) {
      const r = await this.ctr(['version'], { timeoutMs: 5000 }).catch(() => undefined);
      if (r?.code === 0) break;
      if (child.exitCode !== null || Date.now() > until) throw new Error(`containerd did not start: ${this.containerdLog.slice(-2000)}`);
      await sleep(100);
    }
    const plugins = ok('ctr plugins ls', await this.ctr(['plugins', 'ls']));
    if (!/io\.containerd\.snapshotter\.v1\s+layerd\s+\S+\s+ok/.test(plugins)) throw new Error(`containerd did not load the layerd proxy snapshotter:\n${plugins}`);
  }

  /** The CRI plugin's part of containerd's config: off, or on with layerd as its snapshotter. */
  private criConfig(): string[] {
    const cri = this.options.cri;
    if (!cri) return ['disabled_plugins = ["io.containerd.grpc.v1.cri"]'];
    return [
      '[plugins."io.containerd.grpc.v1.cri"]',
      // its streaming server (exec/attach), unused here: loopback and a port of the kernel's choice
      '  stream_server_address = "127.0.0.1"',
      '  stream_server_port = "0"',
      '[plugins."io.containerd.grpc.v1.cri".containerd]',
      '  snapshotter = "layerd"',
      '  disable_snapshot_annotations = false',
      '[plugins."io.containerd.grpc.v1.cri".cni]',
      `  bin_dir = "${join(this.dir, 'cni', 'bin')}"`,
      `  conf_dir = "${join(this.dir, 'cni', 'conf')}"`,
      '[plugins."io.containerd.grpc.v1.cri".registry]',
      `  config_path = "${cri.registryHosts}"`,
    ];
  }

  containerdOutput(): string { return this.containerdLog; }

  /**
   * Start layerd inside the namespace (again after `stopLayerd`) and wait until it answers.
   * It reads original layer blobs from this containerd's content store (`--containerd-socket`;
   * a later one in `extraArgs` wins).
   */
  async startLayerd(extraArgs: string[] = []): Promise<LayerdProcess> {
    const child = spawn('nsenter', ['-t', String(this.holderPid), '-m', '--', join(REPO, 'bin', 'layerd'),
      '--root', this.layerdRoot, '--socket', this.layerdSocket, '--snapshotter-socket', this.snapshotterSocket, '--log-level', 'debug',
      '--containerd-socket', this.containerdSocket, ...extraArgs],
    { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...this.options.layerdEnv } });
    let output = '';
    child.stdout!.on('data', (d: Buffer) => { output += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { output += d.toString(); });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const layerd: LayerdProcess = { pid: child.pid!, child, log: () => output, exited };
    this.layerd = layerd;
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`layerd exited (${child.exitCode}): ${output}`);
      const health = await http(this.layerdSocket, 'GET', '/v1/health').catch(() => undefined);
      if (health?.status === 200 && existsSync(this.snapshotterSocket)) return layerd;
      if (Date.now() > deadline) throw new Error(`layerd did not become ready: ${output}`);
      await sleep(100);
    }
  }

  /** SIGTERM layerd (by PID; SIGKILL after 15 s) and wait, bounded; resolves with its exit code (null if killed). */
  async stopLayerd(): Promise<number | null> {
    const layerd = this.layerd;
    if (!layerd) return null;
    this.layerd = undefined;
    return (await stopChild(layerd.child, { graceMs: 15_000, what: `layerd ${layerd.pid}` })).code;
  }

  /** A command inside the namespace. */
  ns(command: string, args: string[], options: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
    return run('nsenter', ['-t', String(this.holderPid), '-m', '--', command, ...args], options);
  }

  /** `ctr` on this containerd, in the test's containerd namespace unless `-n` is given. */
  ctr(args: string[], options: { timeoutMs?: number; namespace?: string } = {}): Promise<RunResult> {
    const namespace = options.namespace ?? this.namespace;
    this.namespaces.add(namespace);
    return this.ns('ctr', ['-a', this.containerdSocket, '-n', namespace, ...args], options);
  }

  /** `ctr-remote` (stargz-snapshotter's ctr) on this containerd; stdout, or it throws. */
  async ctrRemoteOk(args: string[], options: { timeoutMs?: number; namespace: string }): Promise<string> {
    this.namespaces.add(options.namespace);
    return ok(`ctr-remote ${args.join(' ')}`, await this.ns('ctr-remote', ['-a', this.containerdSocket, '-n', options.namespace, ...args], options));
  }

  /** A ctr command that must succeed; its stdout. */
  async ctrOk(args: string[], options: { timeoutMs?: number; namespace?: string } = {}): Promise<string> {
    return ok(`ctr ${args.join(' ')}`, await this.ctr(args, options));
  }

  /**
   * `ctr run --rm` of the shell script `script` in the image `ref` (it must exit 0); what it
   * wrote to its standard output. That comes back through a file on a bind mount at /mnt, not
   * through ctr's own stdout, which can lose the last lines of a process that exits right after
   * printing: ctr copies a task's output from FIFOs in the background and stops when the task is
   * deleted (a known kind of race in containerd clients, e.g. concourse/concourse#6775; ctr 1.6's
   * own code was not read). Seen once in three CI runs side by side: a `grep` that exited 0 came
   * back as ''.
   */
  async runScript(ref: string, id: string, script: string,
    options: { snapshotter?: string; timeoutMs?: number; namespace?: string; mounts?: string[] } = {}): Promise<string> {
    const out = join(this.dir, 'run-output', `${id}-${++this.scriptRuns}`);
    await mkdir(out, { recursive: true });
    const mounts = [`type=bind,src=${out},dst=/mnt,options=rbind:rw`, ...(options.mounts ?? [])].flatMap((m) => ['--mount', m]);
    await this.ctrOk(['run', '--rm', '--snapshotter', options.snapshotter ?? 'layerd', ...mounts, ref, id, 'sh', '-c', `{ ${script}\n} > /mnt/stdout`], options);
    return readFile(join(out, 'stdout'), 'utf8');
  }

  /** Run containerd's garbage collection now, and wait for it (a lease removed with --sync). */
  async gc(): Promise<void> {
    const id = `gc-${process.pid}-${++this.gcRuns}`;
    await this.ctrOk(['leases', 'create', '--id', id]);
    await this.ctrOk(['leases', 'rm', '--sync', id], { timeoutMs: 120_000 });
  }

  /** The namespace's mount table (as its processes see it). */
  async mountinfo(): Promise<string> {
    return readFile(`/proc/${this.holderPid}/mountinfo`, 'utf8');
  }

  /** Everything started here goes, whatever state it is in. */
  async stop(): Promise<void> {
    if (this.holderPid === 0) return;
    // 1. containers through containerd, while it runs
    if (this.containerd && this.containerd.exitCode === null) {
      for (const namespace of this.namespaces) {
        const tasks = await this.ctr(['tasks', 'ls', '-q'], { namespace, timeoutMs: 15_000 }).catch(() => undefined);
        for (const id of (tasks?.stdout ?? '').split('\n').filter(Boolean)) {
          await this.killTask(id, { namespace }).catch(() => undefined);
          await this.ctr(['tasks', 'rm', '-f', id], { namespace, timeoutMs: 15_000 }).catch(() => undefined);
        }
        const containers = await this.ctr(['containers', 'ls', '-q'], { namespace, timeoutMs: 15_000 }).catch(() => undefined);
        for (const id of (containers?.stdout ?? '').split('\n').filter(Boolean)) {
          await this.ctr(['containers', 'rm', id], { namespace, timeoutMs: 15_000 }).catch(() => undefined);
        }
      }
    }
    // 2. containerd and layerd
    const stuck: string[] = [];
    if (this.containerd?.pid !== undefined && !(await terminate(this.containerd.pid))) stuck.push(`containerd ${this.containerd.pid}`);
    await this.stopLayerd().catch((err: Error) => { stuck.push(err.message); });
    // 3. whatever is left in the namespace (shims, container processes, mount hosts): abort its
    //    FUSE connections first so nothing blocks, then kill by PID; then the holder. Only
    //    connections of mounts made inside (none if the inherited ones were never recorded).
    const inherited = this.inheritedFuse;
    const minors = inherited === undefined ? [] : fuseMinors(await this.mountinfo().catch(() => '')).filter((m) => !inherited.has(m));
    if (minors.length > 0) {
      await this.ns('sh', ['-c', `grep -q fusectl /proc/self/mountinfo || mount -t fusectl fusectl /sys/fs/fuse/connections; for m in ${minors.join(' ')}; do [ -e /sys/fs/fuse/connections/$m/abort ] && echo 1 > /sys/fs/fuse/connections/$m/abort; done; true`], { timeoutMs: 10_000 }).catch(() => undefined);
    }
    const leftovers = await processesOf(this.holderPid);
    await signalAndWait(leftovers, 'SIGKILL', 10_000).catch((err: Error) => { stuck.push(err.message); });
    if (!(await terminate(this.holderPid, 2000))) stuck.push(`the namespace holder ${this.holderPid}`);
    this.holderPid = 0;
    // 4. cgroups containerd made for the containers (/sys/fs/cgroup/<controller>/<namespace>/<id>)
    for (const namespace of this.namespaces) await removeCgroups(namespace);
    if (stuck.length > 0) throw new Error(`still running after the containerd environment stopped: ${stuck.join('; ')}`);
  }

  /** The status of container `id`'s task (`RUNNING`, `STOPPED`, ...), or undefined if it has none. */
  async taskStatus(id: string, options: { namespace?: string } = {}): Promise<string | undefined> {
    const out = await this.ctrOk(['tasks', 'ls'], { ...options, timeoutMs: 15_000 });
    for (const line of out.split('\n').slice(1)) {
      const [task, , status] = line.trim().split(/\s+/);
      if (task === id) return status;
    }
    return undefined;
  }

  /** SIGKILL container `id`'s task and wait (bounded) until containerd reports it stopped (or gone). */
  async killTask(id: string, options: { namespace?: string; timeoutMs?: number } = {}): Promise<void> {
    await this.ctrOk(['tasks', 'kill', '-s', 'SIGKILL', id], { namespace: options.namespace, timeoutMs: 15_000 });
    const deadline = Date.now() + (options.timeoutMs ?? 30_000);
    for (;;) {
      const status = await this.taskStatus(id, options);
      if (status === undefined || status === 'STOPPED') return;
      if (Date.now() > deadline) throw new Error(`task ${id} still ${status} after SIGKILL`);
      await sleep(100);
    }
  }

  /** Container `id` and its task gone: killed (waited for), task and container removed. */
  async removeContainer(id: string): Promise<void> {
    if ((await this.taskStatus(id)) !== undefined) {
      await this.killTask(id);
      await this.ctrOk(['tasks', 'rm', id], { timeoutMs: 15_000 });
    }
    await this.ctrOk(['containers', 'rm', id], { timeoutMs: 15_000 });
  }
}

/** Processes in the holder's mount namespace and all their descendants (e.g. containers), the holder excepted. */
async function processesOf(holderPid: number): Promise<number[]> {
  const ns = await readlink(`/proc/${holderPid}/ns/mnt`).catch(() => undefined);
  if (ns === undefined) return [];
  const parents = new Map<number, number>();
  const inNs = new Set<number>();
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    if (pid === holderPid || pid === process.pid) continue;
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
    if (stat === undefined) continue;
    parents.set(pid, Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
    if ((await readlink(`/proc/${pid}/ns/mnt`).catch(() => undefined)) === ns) inNs.add(pid);
  }
  const result = new Set(inNs);
  for (let grew = true; grew;) {
    grew = false;
    for (const [pid, ppid] of parents) {
      if (!result.has(pid) && result.has(ppid)) { result.add(pid); grew = true; }
    }
  }
  return [...result];
}

async function removeCgroups(namespace: string): Promise<void> {
  const roots = await readdir('/sys/fs/cgroup').catch(() => [] as string[]);
  for (const root of ['', ...roots]) {
    const dir = join('/sys/fs/cgroup', root, namespace);
    if (!existsSync(dir)) continue;
    for (const child of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      if (child.isDirectory()) await rmdir(join(dir, child.name)).catch(() => undefined);
    }
    await rmdir(dir).catch(() => undefined);
  }
}

/**
 * An OCI archive (what `ctr images import` reads) of an OCI layout holding
 * only the given tags of its index.
 */
export async function ociArchive(layout: string, tags: string[], out: string): Promise<void> {
  const index = JSON.parse(await readFile(join(layout, 'index.json'), 'utf8')) as { manifests: Array<{ annotations?: Record<string, string> }> };
  const kept = index.manifests.filter((m) => tags.includes(m.annotations?.['org.opencontainers.image.ref.name'] ?? ''));
  const indexDir = `${out}.index`;
  await mkdir(indexDir, { recursive: true });
  await writeFile(join(indexDir, 'index.json'), JSON.stringify({ ...index, manifests: kept }));
  ok('tar', await run('tar', ['-cf', out, '-C', layout, 'oci-layout', 'blobs', '-C', indexDir, 'index.json']));
  await rm(indexDir, { recursive: true, force: true });
}

/** What containerd needs to know of an image of an OCI layout: its digests, diffIDs and chain IDs. */
export interface ImageDocs { manifestDigest: string; configDigest: string; layers: string[]; diffIds: string[]; chain: string[] }

export async function imageDocs(layout: string, tag: string): Promise<ImageDocs> {
  const index = JSON.parse(await readFile(join(layout, 'index.json'), 'utf8')) as { manifests: Array<{ digest: string; annotations?: Record<string, string> }> };
  const blob = (d: string): Promise<string> => readFile(join(layout, 'blobs', 'sha256', d.slice('sha256:'.length)), 'utf8');
  const manifestDigest = index.manifests.find((m) => m.annotations?.['org.opencontainers.image.ref.name'] === tag)!.digest;
  const manifest = JSON.parse(await blob(manifestDigest)) as { config: { digest: string }; layers: { digest: string }[] };
  const config = JSON.parse(await blob(manifest.config.digest)) as { rootfs: { diff_ids: string[] } };
  const chain: string[] = [];
  for (const d of config.rootfs.diff_ids) chain.push(chain.length === 0 ? d : digestOf(`${chain.at(-1)!} ${d}`));
  return { manifestDigest, configDigest: manifest.config.digest, layers: manifest.layers.map((l) => l.digest), diffIds: config.rootfs.diff_ids, chain };
}

// --- a small client of the snapshots API (layerd's socket, or containerd's with a namespace) ---

export interface SnapshotsClient {
  call<T>(method: string, request: object): Promise<T>;
  list(filters?: string[]): Promise<WireInfoLike[]>;
  close(): void;
}

export interface WireInfoLike {
  name: string; parent: string; kind: string; labels: Record<string, string>;
  created_at: { seconds: number; nanos: number } | null; updated_at: { seconds: number; nanos: number } | null;
}

export function snapshotsClient(socket: string, options: { namespace?: string; lease?: string } = {}): SnapshotsClient {
  const Ctor = loadSnapshotsService();
  const client = new Ctor(`unix:${socket}`, grpc.credentials.createInsecure());
  const metadata = (): grpc.Metadata => {
    const md = new grpc.Metadata();
    if (options.namespace) md.set('containerd-namespace', options.namespace);
    if (options.lease) md.set('containerd-lease', options.lease);
    return md;
  };
  type Unary = (req: object, md: grpc.Metadata, cb: (err: grpc.ServiceError | null, res: unknown) => void) => void;
  type Streaming = (req: object, md: grpc.Metadata) => grpc.ClientReadableStream<{ info: WireInfoLike[] }>;
  const methods = client as unknown as Record<string, Unary | Streaming>;
  return {
    call<T>(method: string, request: object): Promise<T> {
      return new Promise((resolve, reject) => {
        (methods[method] as Unary).call(client, request, metadata(), (err, res) => (err ? reject(err) : resolve(res as T)));
      });
    },
    list(filters: string[] = []): Promise<WireInfoLike[]> {
      return new Promise((resolve, reject) => {
        const infos: WireInfoLike[] = [];
        const stream = (methods['List'] as Streaming).call(client, { snapshotter: 'layerd', filters }, metadata());
        stream.on('data', (msg: { info: WireInfoLike[] }) => infos.push(...msg.info));
        stream.on('error', reject);
        stream.on('end', () => resolve(infos));
      });
    },
    close(): void { client.close(); },
  };
}

/** The gRPC status code of a failed call (or undefined). */
export function grpcCode(err: unknown): number | undefined {
  return typeof err === 'object' && err !== null && 'code' in err ? (err as { code: number }).code : undefined;
}

/** Device minors of the FUSE mounts in a mountinfo text (a connection's name under /sys/fs/fuse/connections), once each. */
function fuseMinors(mountinfo: string): number[] {
  const fuse = parseMountinfo(mountinfo).filter((e) => e.major === 0 && (e.fstype === 'fuse' || e.fstype.startsWith('fuse.')));
  return [...new Set(fuse.map((e) => e.minor))];
}

/** What a containerd test suite holds: each part may be missing (a `before` that failed or skipped). */
export interface ContainerdTestParts {
  env: ContainerdEnv | undefined;
  work: { dir: string; remove(): Promise<void> } | undefined;
  /** Stopped after the environment, in order (registries, relays in front of them). */
  servers?: ReadonlyArray<{ stop(): Promise<unknown> } | { close(): Promise<unknown> } | undefined>;
  /** Print containerd's log tail too (besides layerd's) when the test failed. */
  containerdLog?: boolean;
}

/**
 * The end of a containerd test suite, for its `after` hook: stop the environment (printing
 * its logs' tails when the last test failed or `LAYERD_TEST_VERBOSE` is set), then the
 * servers, then remove the scratch directory — failing if a mount was left beneath it.
 */
export async function closeContainerdTest(test: Mocha.Context, parts: ContainerdTestParts): Promise<void> {
  if (parts.env) {
    const layerdLog = parts.env.layerd?.log() ?? '';
    const containerdLog = parts.env.containerdOutput();
    await parts.env.stop();
    if (test.currentTest?.state === 'failed' || process.env['LAYERD_TEST_VERBOSE']) {
      console.log(`layerd log (tail):\n${layerdLog.split('\n').slice(-40).join('\n')}`);
      if (parts.containerdLog) console.log(`containerd log (tail):\n${containerdLog.split('\n').slice(-30).join('\n')}`);
    }
  }
  for (const server of parts.servers ?? []) {
    if (server) await ('stop' in server ? server.stop() : server.close());
  }
  if (parts.work) {
    const work = parts.work;
    const left = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => l.includes(work.dir));
    await work.remove();
    expect(left, 'no mount left behind').to.deep.equal([]);
  }
}
