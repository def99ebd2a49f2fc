/**
 * Where a later `ctr run` spends its time, layerd vs containerd's overlayfs
 * snapshotter (issue 15: later runs): the image (debian-multi:l3-whiteouts)
 * is pulled into each and, for layerd, its layers ingested before anything
 * is measured; then later runs alternate between the two. Each run is
 *   ctr run --rm … sh -c 'date; python3 -c "print(42)"; date'
 * so a run splits into: start (ctr until the container's first command:
 * Prepare, mount, runc), python3 (its reads through the root filesystem)
 * and end (exit until ctr returns: task and container deletion, Remove).
 * For layerd also the daemon's Prepare/mount/Remove times (its log) and the
 * mount's FUSE operations with their server time (LAYERD_SNAPSHOT_STATS_DIR).
 *
 *   node dist/bench/containerdPhases.js [--runs N]
 *
 * Prints a markdown table (and writes bench/results/containerd-phases-*).
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CORPUS, argOf, stats, writeResults } from './report.js';
import { ContainerdEnv, missingTools } from '../test/support/containerd.js';
import { TestRegistry } from '../test/support/registry.js';
import { waitFor } from '../test/support/daemon.js';
import { readSnapshot, type OpStatsSnapshot } from '../mount/opStats.js';

const run = promisify(execFile);
const TAG = 'l3-whiteouts';
const LAYERS = 3;

interface Phases { total: number; start: number; python: number; end: number }
interface LayerdPhases { prepareMs?: number; mountMs?: number; removeMs?: number; warmMs?: number; warmOps?: number; ops?: OpStatsSnapshot }

function logLines(log: string, message: string): Record<string, unknown>[] {
  return log.split('\n').filter((l) => l.includes(`"message":"${message}"`)).map((l) => JSON.parse(l) as Record<string, unknown>);
}

async function main(): Promise<void> {
  const missing = missingTools();
  if (missing) {
    console.warn(`containerd phases bench skipped: ${missing}`);
    return;
  }
  const runs = Number(argOf('--runs', '6'));
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-phases-'));
  const statsDir = join(work, 'fuse-stats');
  await mkdir(statsDir);
  const namespace = 'phases';
  const env = new ContainerdEnv(work, { namespace, layerdEnv: { LAYERD_SNAPSHOT_STATS_DIR: statsDir } });
  let registry: TestRegistry | undefined;
  try {
    registry = await TestRegistry.start(join(work, 'registry'));
    await run('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests',
      `oci:${join(CORPUS, 'oci', 'debian-multi')}:${TAG}`, `docker://${registry.host}/corpus/debian-multi:${TAG}`]);
    const ref = `${registry.host}/corpus/debian-multi:${TAG}`;
    await env.start();
    const ctr = (ns: string, ...args: string[]): Promise<string> => env.ctrOk(args, { namespace: ns, timeoutMs: 600_000 });
    const log = (): string => env.layerd?.log() ?? '';
    for (const s of ['layerd', 'overlayfs']) await ctr(`${namespace}-${s}`, 'images', 'pull', '--plain-http', '--snapshotter', s, ref);
    // "later runs" are on an image already ingested (issue 15)
    await waitFor('the ingest of the pulled layers', () => logLines(log(), 'unpack snapshot layer ingested').length >= LAYERS, 300_000, 100);

    const once = async (snapshotter: string, id: string): Promise<Phases> => {
      const t0 = Date.now();
      const out = await ctr(`${namespace}-${snapshotter}`, 'run', '--rm', '--snapshotter', snapshotter, ref, id,
        'sh', '-c', 'a=$(date +%s%N); python3 -c "print(42)" >/dev/null; b=$(date +%s%N); echo $a $b');
      const t1 = Date.now();
      const [a, b] = out.trim().split(' ').map((n) => Number(BigInt(n) / 1_000_000n));
      return { total: t1 - t0, start: a! - t0, python: b! - a!, end: t1 - b! };
    };
    const samples: Record<string, Phases[]> = { layerd: [], overlayfs: [] };
    const daemon: LayerdPhases[] = [];
    for (const s of ['layerd', 'overlayfs']) await once(s, 'first');
    for (let i = 0; i < runs; i++) {
      for (const s of i % 2 === 0 ? ['layerd', 'overlayfs'] : ['overlayfs', 'layerd']) samples[s]!.push(await once(s, `later-${i}`));
      const key = `/later-${i}`;
      const prepared = logLines(log(), 'snapshot prepared').find((l) => String(l['snapshot']).endsWith(key));
      const removed = logLines(log(), 'snapshot removed').find((l) => String(l['snapshot']).endsWith(key));
      const warmed = logLines(log(), 'snapshot mount warmed').find((l) => String(l['snapshot']).endsWith(key));
      const id = /snapshots\/(\d+)\/mnt$/.exec(String(prepared?.['mountpoint']))?.[1];
      daemon.push({
        prepareMs: prepared?.['ms'] as number | undefined, mountMs: prepared?.['mountMs'] as number | undefined,
        removeMs: removed?.['ms'] as number | undefined,
        warmMs: warmed?.['ms'] as number | undefined, warmOps: warmed?.['repeated'] as number | undefined,
        ...(id !== undefined ? { ops: await readSnapshot(join(statsDir, `${id}.json`)) } : {}),
      });
    }
    const fmt = (xs: number[]): string => { const s = stats(xs); return `${s.median.toFixed(0)} (${s.min.toFixed(0)}–${s.max.toFixed(0)})`; };
    const phase = (k: keyof Phases): string => `| ${k} | ${fmt(samples['layerd']!.map((p) => p[k]))} | ${fmt(samples['overlayfs']!.map((p) => p[k]))} |`;
    const opsTotal: Record<string, { count: number[]; ms: number[] }> = {};
    for (const d of daemon) {
      for (const [op, c] of Object.entries(d.ops ?? {})) {
        const t = (opsTotal[op] ??= { count: [], ms: [] });
        t.count.push(c.count);
        t.ms.push(c.sumSeconds * 1000);
      }
    }
    const num = (xs: (number | undefined)[]): number[] => xs.filter((x): x is number => x !== undefined);
    const lines = [
      `# later \`ctr run\` phases, layerd vs overlayfs, debian-multi:${TAG}, ${runs} runs each, ${new Date().toISOString()}, load ${(await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ')}`,
      '',
      '| ms, median (min–max) | layerd | overlayfs |',
      '|---|---|---|',
      phase('total'), phase('start'), phase('python'), phase('end'),
      '',
      `layerd daemon: Prepare ${fmt(num(daemon.map((d) => d.prepareMs)))} ms (mount ${fmt(num(daemon.map((d) => d.mountMs)))}), Remove ${fmt(num(daemon.map((d) => d.removeMs)))} ms`
        + (daemon.some((d) => d.warmMs !== undefined) ? `; mount warm-up (background, from Prepare) ${fmt(num(daemon.map((d) => d.warmMs)))} ms, ${fmt(num(daemon.map((d) => d.warmOps)))} accesses` : ''),
      '',
      '| FUSE op (per run) | count | server ms |',
      '|---|---|---|',
      ...Object.entries(opsTotal).sort(([, a], [, b]) => stats(b.ms).median - stats(a.ms).median)
        .map(([op, t]) => `| ${op} | ${fmt(t.count)} | ${stats(t.ms).median.toFixed(1)} |`),
      '',
    ];
    await writeResults('containerd-phases', lines, { runs, samples, daemon });
  } finally {
    await env.stop().catch((err: unknown) => console.error(`cleanup: ${String(err)}`));
    await registry?.stop();
    await rm(work, { recursive: true, force: true });
  }
}

await main();
