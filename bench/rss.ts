/**
 * Memory of idle mounts: 1, 10 and 100 writable mounts of one image
 * (debian-multi, each with its own empty upper), summed over every process
 * serving them: VmRSS (/proc/PID/status, as asked; counts shared pages once
 * per process) and Pss (/proc/PID/smaps_rollup; shared pages split, so the
 * sum is what the mounts really cost). Measured SETTLE_MS after the last
 * mount is ready, nothing touching the mounts.
 *
 * layerd's servers are started by layerdMountServers(count, …), the one
 * place that decides the server model:
 *  - 'process per mount': one `layerd mount --layers …` process per mount;
 *  - 'mount host': what daemon/mountServer.ts does (startMount: one
 *    `layerd mount-host` process per layer stack serving all its mounts,
 *    plus the spare host the daemon keeps started ahead of need).
 * fuse-overlayfs: one process per mount. Kernel overlayfs: no process (n/a).
 *
 *   node dist/bench/rss.js [--counts 1,10,100]     (root)
 *
 * Writes bench/results/rss-<timestamp>.{md,json}.
 */
import { mkdir, mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { processAlive, sleep } from '../common/process.js';
import { prewarmMountHost, startMount, stopMount } from '../daemon/mountServer.js';
import { type LayerStack, type Mounted, clearMountsUnder, debianMultiStack, mountStack } from './mounts.js';
import { pssKiB, rssKiB } from './procstat.js';
import { argOf, writeResults } from './report.js';

const SETTLE_MS = 3000;
const CONCURRENCY = 4;

export type LayerdServerModel = 'process per mount' | 'mount host';
/** What layerd is measured as unless told otherwise; switch here when the daemon's model changes. */
export const DEFAULT_LAYERD_MODEL: LayerdServerModel = 'mount host';

/** `count` mounts being served: by which processes, and how to stop them all. */
export interface MountServers {
  mountpoints: string[];
  /** Every process serving them (for the mount host model also the spare). */
  pids(): Promise<number[]>;
  /** Wall time until all `count` mounts were ready. */
  readyMs: number;
  stop(): Promise<void>;
}

/** Where servers are started: the layer stack and a scratch directory for mountpoints and uppers. */
export interface RssContext { stack: LayerStack; work: string }

let seq = 0;

/** Run `fn` for 0…count-1, at most `limit` at a time. */
async function bounded<T>(count: number, limit: number, fn: (i: number) => Promise<T>): Promise<T[]> {
  const out: T[] = new Array<T>(count);
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(limit, count) }, async () => {
    while (next < count) { const i = next++; out[i] = await fn(i); }
  }));
  return out;
}

/** `count` mounts each served by its own process (layerd mount or fuse-overlayfs). */
async function processPerMount(impl: 'layerd' | 'fuse-overlayfs', count: number, ctx: RssContext): Promise<MountServers> {
  const mounted: Mounted[] = [];
  const t0 = performance.now();
  try {
    await bounded(count, CONCURRENCY, async () => { mounted.push(await mountStack(impl, ctx.stack, join(ctx.work, `m-${seq++}`))); });
  } catch (err) {
    await Promise.all(mounted.map((m) => m.stop().catch(() => undefined)));
    throw err;
  }
  return {
    mountpoints: mounted.map((m) => m.mnt),
    readyMs: performance.now() - t0,
    pids: async () => mounted.map((m) => m.pid!),
    stop: async () => { await bounded(mounted.length, CONCURRENCY, (i) => mounted[i]!.stop()); },
  };
}

/** Processes whose command line mentions `dir` (the mount hosts started for it, spare included). */
async function processesMentioning(dir: string): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.split('\0').some((arg) => arg.startsWith(dir + '/'))) pids.push(Number(name));
  }
  return pids;
}

/** `count` mounts through daemon/mountServer.ts, as the daemon makes them (a spare host prewarmed first). */
async function mountHosts(count: number, ctx: RssContext): Promise<MountServers> {
  const base = join(ctx.work, `hosts-${seq++}`);
  const hostsDir = join(base, 'hosts');
  const served: { pid: number; mountpoint: string }[] = [];
  const stopAll = async (): Promise<void> => {
    for (const s of served) await stopMount(s.pid, s.mountpoint).catch(() => undefined);
    // The hosts were started for this run: end them (by PID) rather than wait for their idle exit.
    const pids = await processesMentioning(hostsDir);
    for (const pid of pids) process.kill(pid, 'SIGTERM');
    for (let i = 0; i < 400 && pids.some(processAlive); i++) await sleep(25);
    for (const pid of pids.filter(processAlive)) process.kill(pid, 'SIGKILL');
  };
  try {
    await prewarmMountHost(hostsDir);
    const t0 = performance.now();
    await bounded(count, CONCURRENCY, async () => {
      const dir = join(base, `m-${seq++}`);
      await mkdir(join(dir, 'upper'), { recursive: true });
      await mkdir(join(dir, 'mnt'), { recursive: true });
      served.push(await startMount({ layers: ctx.stack.layerDirs, upper: join(dir, 'upper'), mountpoint: join(dir, 'mnt'), readOnly: false, hostsDir }));
    });
    const readyMs = performance.now() - t0;
    return { mountpoints: served.map((s) => s.mountpoint), readyMs, pids: () => processesMentioning(hostsDir), stop: stopAll };
  } catch (err) {
    await stopAll();
    throw err;
  }
}

/** layerd serving `count` mounts of the stack, in the given server model (the one switch point for it). */
export function layerdMountServers(count: number, ctx: RssContext, model: LayerdServerModel = DEFAULT_LAYERD_MODEL): Promise<MountServers> {
  return model === 'mount host' ? mountHosts(count, ctx) : processPerMount('layerd', count, ctx);
}

interface Measured { count: number; processes: number; rssMiB: number; pssMiB: number; readyMs: number }

async function measure(servers: MountServers, count: number): Promise<Measured> {
  await sleep(SETTLE_MS);
  const pids = await servers.pids();
  let rss = 0;
  let pss = 0;
  for (const pid of pids) { rss += await rssKiB(pid); pss += await pssKiB(pid); }
  return { count, processes: pids.length, rssMiB: rss / 1024, pssMiB: pss / 1024, readyMs: servers.readyMs };
}

async function main(): Promise<void> {
  const counts = argOf('--counts', '1,10,100').split(',').map(Number);
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-rss-'));
  const loadStart = (await readFile('/proc/loadavg', 'utf8')).split(' ')[0];
  let live: MountServers | undefined;
  const cleanup = async (): Promise<number> => {
    await live?.stop().catch(() => undefined);
    const left = await clearMountsUnder(work);
    await rm(work, { recursive: true, force: true });
    return left;
  };
  const onSignal = (): void => { void cleanup().finally(() => process.exit(130)); };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const ctx: RssContext = { stack: await debianMultiStack(join(work, 'dataset')), work };
    const rows: Record<string, Measured[]> = { 'layerd, process per mount': [], 'layerd, mount host': [], 'fuse-overlayfs, process per mount': [] };
    const start: Record<string, (n: number) => Promise<MountServers>> = {
      'layerd, process per mount': (n) => layerdMountServers(n, ctx, 'process per mount'),
      'layerd, mount host': (n) => layerdMountServers(n, ctx, 'mount host'),
      'fuse-overlayfs, process per mount': (n) => processPerMount('fuse-overlayfs', n, ctx),
    };
    let leftBehind = 0;
    for (const count of counts) {
      for (const [name, fn] of Object.entries(start)) {
        process.stderr.write(`rss bench: ${count} × ${name}\n`);
        live = await fn(count);
        try {
          rows[name]!.push(await measure(live, count));
        } finally {
          await live.stop();
          live = undefined;
        }
        leftBehind += await clearMountsUnder(work); // must be 0: every server unmounted its mounts
      }
    }
    const cell = (m: Measured | undefined): string => (m ? `${m.rssMiB.toFixed(0)} / ${m.pssMiB.toFixed(0)} (${m.processes} proc)` : '–');
    const per = (ms: Measured[]): string => {
      const [a, b] = [ms[0], ms[ms.length - 1]];
      return a && b && b.count > a.count ? `${((b.rssMiB - a.rssMiB) / (b.count - a.count)).toFixed(1)} / ${((b.pssMiB - a.pssMiB) / (b.count - a.count)).toFixed(1)}` : '–';
    };
    const lines = [
      `# Memory of idle mounts of debian-multi, ${new Date().toISOString()}`,
      '',
      `| server model | ${counts.map((c) => `${c} mount${c === 1 ? '' : 's'}: Σ VmRSS / Σ Pss MiB`).join(' | ')} | each extra mount, MiB (VmRSS / Pss) |`,
      `|---|${counts.map(() => '---|').join('')}---|`,
      ...Object.entries(rows).map(([name, ms]) => `| ${name} | ${counts.map((c) => cell(ms.find((m) => m.count === c))).join(' | ')} | ${per(ms)} |`),
      `| kernel overlayfs | ${counts.map(() => 'n/a (kernel)').join(' | ')} | n/a |`,
      '',
      `| time until all mounts ready, s | ${counts.map((c) => `${c}`).join(' | ')} |`,
      `|---|${counts.map(() => '---|').join('')}`,
      ...Object.entries(rows).map(([name, ms]) => `| ${name} | ${counts.map((c) => { const m = ms.find((x) => x.count === c); return m ? (m.readyMs / 1000).toFixed(2) : '–'; }).join(' | ')} |`),
      '',
      `Σ over every serving process, ${SETTLE_MS / 1000} s after the last mount was ready, with nothing touching the mounts. VmRSS counts shared pages (node, libraries) once per process; Pss splits them, so its sum is the real cost.`,
      `layerd is started through layerdMountServers(count, …) (bench/rss.ts); default model '${DEFAULT_LAYERD_MODEL}'. 'mount host' = daemon/mountServer.ts startMount (what the daemon does since the mount-host change): one host for the image plus the spare host the daemon keeps prewarmed (counted).`,
      `Mounts started ${CONCURRENCY} at a time. Mounts left behind after stopping the servers: ${leftBehind}. Load average (1 min) at start ${loadStart}, at end ${(await readFile('/proc/loadavg', 'utf8')).split(' ')[0]} on ${cpus().length} CPUs.`,
      '',
    ];
    await writeResults('rss', lines, { counts, settleMs: SETTLE_MS, rows, leftBehind });
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await cleanup();
  }
}

await main();
