/**
 * containerd on layerd as a containerd user measures it: `ctr images pull`
 * (pull + unpack), the first `ctr run` of the image and later runs, with
 * layerd as the proxy snapshotter next to containerd's own overlayfs
 * snapshotter — the same image (debian-multi:l3-whiteouts, three real
 * Debian layers), the same loopback registry, the same containerd,
 * interleaved in one run. Every repetition pulls into a fresh containerd
 * namespace after the previous one's image, content and snapshots were
 * collected, so each pull downloads and unpacks everything again.
 *
 *   node dist/bench/containerd.js [--reps N] [--runs N]
 *
 * Writes bench/results/containerd-<timestamp>.{md,json}. Needs root,
 * containerd, runc and skopeo (make debian-deps).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CORPUS, argOf, stats, time, writeResults } from './report.js';
import { ContainerdEnv, missingTools, ok } from '../test/support/containerd.js';
import { TestRegistry } from '../test/support/registry.js';

const run = promisify(execFile);
const TAG = 'l3-whiteouts';
const SNAPSHOTTERS = ['layerd', 'overlayfs'] as const;
type Snapshotter = (typeof SNAPSHOTTERS)[number];
const TARGETS = { pull: 1.2, first: 1.5, later: 1.3 } as const;

async function main(): Promise<void> {
  const missing = missingTools();
  if (missing) {
    console.warn(`containerd bench skipped: ${missing}`);
    return;
  }
  const reps = Number(argOf('--reps', '3'));
  const laterRuns = Number(argOf('--runs', '4'));
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-ctrd-'));
  const env = new ContainerdEnv(work, { namespace: 'bench-warmup' });
  let registry: TestRegistry | undefined;
  try {
    registry = await TestRegistry.start(join(work, 'registry'));
    await run('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests',
      `oci:${join(CORPUS, 'oci', 'debian-multi')}:${TAG}`, `docker://${registry.host}/corpus/debian-multi:${TAG}`]);
    const ref = `${registry.host}/corpus/debian-multi:${TAG}`;
    await env.start();
    const plugins = ok('ctr plugins ls', await env.ctr(['plugins', 'ls']));
    if (!/io\.containerd\.snapshotter\.v1\s+overlayfs\s+\S+\s+ok/.test(plugins)) throw new Error(`containerd's overlayfs snapshotter is not usable here:\n${plugins}`);

    const ctr = (namespace: string, ...args: string[]): Promise<string> => env.ctrOk(args, { namespace, timeoutMs: 600_000 });
    /** One repetition: pull + unpack, a first run, later runs; then everything of the namespace collected. */
    const once = async (snapshotter: Snapshotter, namespace: string): Promise<{ pull: number; first: number; later: number[] }> => {
      const pull = await time(() => ctr(namespace, 'images', 'pull', '--plain-http', '--snapshotter', snapshotter, ref));
      const runIt = (id: string): Promise<number> => time(async () => {
        const out = await ctr(namespace, 'run', '--rm', '--snapshotter', snapshotter, ref, id, 'python3', '-c', 'print(42)');
        if (out.trim() !== '42') throw new Error(`${snapshotter}: the container printed ${JSON.stringify(out)}`);
      });
      const first = await runIt('first');
      const later: number[] = [];
      for (let i = 0; i < laterRuns; i++) later.push(await runIt(`later-${i}`));
      await ctr(namespace, 'images', 'rm', ref);
      await ctr(namespace, 'leases', 'create', '--id', 'gc');
      await ctr(namespace, 'leases', 'rm', '--sync', 'gc');
      return { pull, first, later };
    };

    // warm-up: the registry, the page cache, a mount host of each kind
    for (const s of SNAPSHOTTERS) await once(s, `bench-warm-${s}`);
    const samples: Record<Snapshotter, { pull: number[]; first: number[]; later: number[] }> = {
      layerd: { pull: [], first: [], later: [] }, overlayfs: { pull: [], first: [], later: [] },
    };
    for (let r = 0; r < reps; r++) {
      // interleaved, and the order alternates, so neither side always runs on a warmer machine
      const order = r % 2 === 0 ? SNAPSHOTTERS : [...SNAPSHOTTERS].reverse();
      for (const s of order) {
        const one = await once(s, `bench-${s}-${r}`);
        samples[s].pull.push(one.pull);
        samples[s].first.push(one.first);
        samples[s].later.push(...one.later);
      }
    }
    const summary = Object.fromEntries(SNAPSHOTTERS.map((s) => [s, {
      pull: stats(samples[s].pull), first: stats(samples[s].first), later: stats(samples[s].later),
    }])) as Record<Snapshotter, Record<'pull' | 'first' | 'later', { median: number; min: number; max: number }>>;
    const ratio = (k: keyof typeof TARGETS): number => summary.layerd[k].median / summary.overlayfs[k].median;
    const ratios = { pull: ratio('pull'), first: ratio('first'), later: ratio('later') };
    const row = (what: string, k: keyof typeof TARGETS): string => {
      const l = summary.layerd[k];
      const o = summary.overlayfs[k];
      const verdict = ratios[k] <= TARGETS[k] ? 'met' : 'NOT met';
      return `| ${what} | ${l.median.toFixed(0)} (${l.min.toFixed(0)}–${l.max.toFixed(0)}) | ${o.median.toFixed(0)} (${o.min.toFixed(0)}–${o.max.toFixed(0)}) | ${ratios[k].toFixed(2)} | ≤ ${TARGETS[k]} ${verdict} |`;
    };
    const lines = [
      `# containerd 1.6: layerd vs overlayfs snapshotter, debian-multi:${TAG} from a loopback registry, ${reps} repetitions (${laterRuns} later runs each), ${new Date().toISOString()}`,
      '',
      '| ms, median (min–max) | layerd | overlayfs | ratio | target |',
      '|---|---|---|---|---|',
      row('`ctr images pull` (pull + unpack)', 'pull'),
      row('first `ctr run --rm … python3 -c print(42)`', 'first'),
      row('later runs', 'later'),
      '',
    ];
    await writeResults('containerd', lines, { reps, laterRuns, samples, summary, ratios, targets: TARGETS });
  } finally {
    await env.stop().catch((err: unknown) => console.error(`cleanup: ${String(err)}`));
    await registry?.stop();
    await rm(work, { recursive: true, force: true });
  }
}

await main();
