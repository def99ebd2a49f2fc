/**
 * How much of layerd's metadata cost is the FUSE round trip itself?
 *
 * Mounts the merged tree of debian-multi three ways and times the same
 * metadata workloads from separate processes, interleaved, several
 * repetitions:
 * - layerd (`layerd mount`, the union) on its own /dev/fuse binding;
 * - fuse-overlayfs (C, libfuse 3 low-level API) on the same layers: the
 *   floor a FUSE union server reaches;
 * - kernel overlayfs, for scale.
 * (An in-process "floor" filesystem on fuse-native and layerd on fuse-native
 * were measured here until that binding was retired; docs/performance.md
 * keeps their last numbers.)
 * Two cache policies: none (entry/attr timeout 0: every stat is a round
 * trip, which measures the cost per operation) and each implementation's
 * default. `lstat all (no cache)` divided by the number of paths gives the
 * cost of one lookup round trip.
 *
 *   node dist/bench/fuseFloor.js [--reps N]      (root)
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { LowerInoAllocator } from '../mount/inodes.js';
import { MergedTree } from '../mount/mergedTree.js';
import { LAYER_TAR, tarLayerSource } from '../storage/layerIndex.js';
import { readLayerIndex } from '../storage/store.js';
import { clearMountsUnder, debianMultiStack, mountStack } from './mounts.js';
import { argOf, stats, time, writeResults } from './report.js';

const run = promisify(execFile);

type Impl = 'layerd' | 'fuse-overlayfs' | 'overlayfs';
const IMPLS: Impl[] = ['layerd', 'fuse-overlayfs', 'overlayfs'];
type Policy = 'no cache' | 'default cache';

interface Mounted { mnt: string; stop(): Promise<void> }

const WORKLOADS: Record<string, string> = {
  'lstat all (cold dentries)': `python3 -c "
import os,sys
paths=[l.rstrip('\\n') for l in open(sys.argv[1])]
for p in paths: os.lstat(os.environ['MNT']+p)" "$PATHS"`,
  'find -printf (stat all)': 'find "$MNT" -printf "%s %m %u\\n" > /dev/null',
};

async function main(): Promise<void> {
  const reps = Number(argOf('--reps', '5'));
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-floor-'));
  const active = new Set<Mounted>();
  try {
    const stack = await debianMultiStack(work);

    // The paths to lstat: those of the merged tree every implementation serves.
    const tree = new MergedTree();
    const inos = new LowerInoAllocator();
    for (const dir of stack.layerDirs) tree.addLayer(tarLayerSource(await readLayerIndex(dir), join(dir, LAYER_TAR)), inos);
    const paths = [...tree.paths()].filter((p) => p !== '').map((p) => '/' + p);
    const pathList = join(work, 'paths.txt');
    await writeFile(pathList, paths.join('\n') + '\n');

    let seq = 0;
    const mount = async (impl: Impl, policy: Policy): Promise<Mounted> => {
      const base = join(work, `run-${seq++}`);
      const cacheSeconds = policy === 'no cache' ? 0 : undefined;
      const m: Mounted = await mountStack(impl, stack, base, cacheSeconds === undefined ? {} : { cacheSeconds });
      active.add(m);
      return m;
    };

    const samples: Record<string, Partial<Record<Impl, number[]>>> = {};
    for (let r = 0; r < reps; r++) {
      for (const policy of ['no cache', 'default cache'] as Policy[]) {
        for (const impl of IMPLS) {
          // The kernel has no such knob.
          if (impl === 'overlayfs' && policy === 'no cache') continue;
          for (const [name, script] of Object.entries(WORKLOADS)) {
            const m = await mount(impl, policy);
            try {
              // First pass loads the page cache of the layers; the timed pass is warm apart from FUSE's own caches.
              const env = { ...process.env, MNT: m.mnt, PATHS: pathList };
              await run('sh', ['-c', script], { env, maxBuffer: 1 << 26 });
              if (policy === 'default cache') await new Promise((res) => setTimeout(res, 1100)); // let 1 s timeouts lapse: fair to all
              const key = `${name}, ${policy}`;
              ((samples[key] ??= {})[impl] ??= []).push(await time(() => run('sh', ['-c', script], { env, maxBuffer: 1 << 26 })));
            } finally {
              await m.stop();
              active.delete(m);
            }
          }
        }
      }
    }

    const n = paths.length;
    const med = (xs: number[] | undefined): number | undefined => (xs ? stats(xs).median : undefined);
    const fmt = (v: number | undefined, digits = 0): string => (v === undefined ? '–' : v.toFixed(digits));
    const lines = [
      `# The FUSE binding's floor on debian-multi (${n} paths), ${reps} repetitions, ${new Date().toISOString()}`,
      '',
      '| workload | layerd ms | fuse-overlayfs ms | overlayfs ms | layerd / fuse-overlayfs |',
      '|---|---|---|---|---|',
    ];
    for (const [w, s] of Object.entries(samples)) {
      const [l, fo, o] = [med(s.layerd), med(s['fuse-overlayfs']), med(s.overlayfs)];
      const ratio = (a: number | undefined, b: number | undefined): string => (a === undefined || b === undefined ? '–' : (a / b).toFixed(2));
      lines.push(`| ${w} | ${fmt(l)} | ${fmt(fo)} | ${fmt(o)} | ${ratio(l, fo)} |`);
    }
    const noCache = samples['lstat all (cold dentries), no cache'];
    if (noCache) {
      lines.push('', `One lookup round trip (lstat with no cache, ${n} paths): ` + IMPLS.filter((i) => noCache[i]).map((i) => `${i} ${fmt((med(noCache[i])! * 1000) / n, 1)} µs`).join(', ') + '.');
    }
    lines.push('', 'Default caches: fuse-overlayfs without expiry; layerd 3600 s.', '');
    await writeResults('fuse-floor', lines, { reps, paths: n, samples });
  } finally {
    for (const m of active) await m.stop().catch(() => undefined);
    await clearMountsUnder(work);
    await rm(work, { recursive: true, force: true });
  }
}

await main();
