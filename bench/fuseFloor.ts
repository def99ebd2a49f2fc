/**
 * How much of layerd's metadata cost is the FUSE binding itself?
 *
 * Mounts the merged tree of debian-multi four ways and times the same
 * metadata workloads from separate processes, interleaved, several
 * repetitions:
 * - "floor": a fuse-native filesystem in this process that answers getattr
 *   and readdir from precomputed objects: no union logic, no I/O. Nothing
 *   built on fuse-native (libfuse 2 high-level API, one JS round trip per
 *   operation) can be faster than this;
 * - layerd (`layerd mount`, the union) on its own /dev/fuse binding, and on
 *   fuse-native (LAYERD_FUSE=libfuse2, the binding it used before);
 * - fuse-overlayfs (C, libfuse 3 low-level API) on the same layers;
 * - kernel overlayfs, for scale.
 * Two cache policies: none (entry/attr timeout 0: every stat is a round
 * trip, which measures the cost per operation) and each implementation's
 * default. `lstat all (no cache)` divided by the number of paths gives the
 * cost of one lookup round trip.
 *
 *   node dist/bench/fuseFloor.js [--reps N]      (root)
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import Fuse from 'fuse-native';
import type { FuseStat } from 'fuse-native';
import { LowerInoAllocator } from '../mount/inodes.js';
import { MergedTree } from '../mount/mergedTree.js';
import { lowerStat } from '../mount/nodeStats.js';
import { LAYER_TAR, tarLayerSource } from '../storage/layerIndex.js';
import { readLayerIndex } from '../storage/store.js';
import { clearMountsUnder, debianMultiStack, mountStack } from './mounts.js';
import { argOf, stats, time, writeResults } from './report.js';

const run = promisify(execFile);

type Impl = 'floor' | 'layerd' | 'layerd on fuse-native' | 'fuse-overlayfs' | 'overlayfs';
const IMPLS: Impl[] = ['floor', 'layerd', 'layerd on fuse-native', 'fuse-overlayfs', 'overlayfs'];
type Policy = 'no cache' | 'default cache';

/** A fuse-native filesystem answering from precomputed stats and listings. */
class FloorFuse extends Fuse {
  constructor(mnt: string, private readonly options: string, files: Map<string, FuseStat>, dirs: Map<string, string[]>) {
    super(mnt, {
      getattr: (path, cb) => { const st = files.get(path); return st ? cb(0, st) : cb(Fuse.ENOENT); },
      readdir: (path, cb) => { const names = dirs.get(path); return names ? cb(0, names) : cb(Fuse.ENOENT); },
    }, { timeout: false });
  }

  protected override _fuseOptions(): string { return this.options; }
}

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

    // The floor's answers: the same merged tree and stats layerd computes, precomputed.
    const tree = new MergedTree();
    const inos = new LowerInoAllocator();
    for (const dir of stack.layerDirs) tree.addLayer(tarLayerSource(await readLayerIndex(dir), join(dir, LAYER_TAR)), inos);
    const files = new Map<string, FuseStat>();
    const dirs = new Map<string, string[]>();
    for (const path of tree.paths()) {
      const node = tree.get(path)!;
      const fusePath = '/' + path;
      const st = lowerStat(path, node, 0);
      files.set(path === '' ? '/' : fusePath, { ...st, atime: st.atime.sec * 1000, mtime: st.mtime.sec * 1000, ctime: st.ctime.sec * 1000 });
      if (node.kind === 'dir') dirs.set(path === '' ? '/' : fusePath, [...(node.children ?? [])]);
    }
    const pathList = join(work, 'paths.txt');
    await writeFile(pathList, [...files.keys()].filter((p) => p !== '/').join('\n') + '\n');

    let seq = 0;
    const mount = async (impl: Impl, policy: Policy): Promise<Mounted> => {
      const base = join(work, `run-${seq++}`);
      let m: Mounted;
      if (impl === 'floor') {
        const mnt = join(base, 'mnt');
        await mkdir(mnt, { recursive: true });
        const cache = policy === 'no cache' ? 0 : 1;
        const fuse = new FloorFuse(mnt, `-oallow_other,use_ino,entry_timeout=${cache},attr_timeout=${cache},negative_timeout=0`, files, dirs);
        await new Promise<void>((done, fail) => fuse.mount((err) => (err ? fail(err) : done())));
        m = { mnt, stop: () => new Promise<void>((done) => fuse.unmount(() => done())) };
      } else {
        const cacheSeconds = policy === 'no cache' ? 0 : undefined;
        const env = impl === 'layerd on fuse-native' ? { env: { ...process.env, LAYERD_FUSE: 'libfuse2' } } : {};
        m = await mountStack(impl === 'layerd on fuse-native' ? 'layerd' : impl, stack, base, { ...(cacheSeconds === undefined ? {} : { cacheSeconds }), ...env });
      }
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

    const n = files.size - 1;
    const med = (xs: number[] | undefined): number | undefined => (xs ? stats(xs).median : undefined);
    const fmt = (v: number | undefined, digits = 0): string => (v === undefined ? '–' : v.toFixed(digits));
    const lines = [
      `# The FUSE binding's floor on debian-multi (${n} paths), ${reps} repetitions, ${new Date().toISOString()}`,
      '',
      '| workload | floor ms | layerd ms | layerd on fuse-native ms | fuse-overlayfs ms | overlayfs ms | floor / fuse-overlayfs | layerd / floor | layerd / fuse-overlayfs | layerd on fuse-native / fuse-overlayfs |',
      '|---|---|---|---|---|---|---|---|---|---|',
    ];
    for (const [w, s] of Object.entries(samples)) {
      const [f, l, lfn, fo, o] = [med(s.floor), med(s.layerd), med(s['layerd on fuse-native']), med(s['fuse-overlayfs']), med(s.overlayfs)];
      const ratio = (a: number | undefined, b: number | undefined): string => (a === undefined || b === undefined ? '–' : (a / b).toFixed(2));
      lines.push(`| ${w} | ${fmt(f)} | ${fmt(l)} | ${fmt(lfn)} | ${fmt(fo)} | ${fmt(o)} | ${ratio(f, fo)} | ${ratio(l, f)} | ${ratio(l, fo)} | ${ratio(lfn, fo)} |`);
    }
    const noCache = samples['lstat all (cold dentries), no cache'];
    if (noCache) {
      lines.push('', `One lookup round trip (lstat with no cache, ${n} paths): ` + IMPLS.filter((i) => noCache[i]).map((i) => `${i} ${fmt((med(noCache[i])! * 1000) / n, 1)} µs`).join(', ') + '.');
    }
    lines.push('', 'floor = fuse-native answering from memory: the best any fuse-native (libfuse 2) filesystem can do. Default caches: fuse-overlayfs without expiry; layerd on its own binding 3600 s; layerd on fuse-native 1 s on writable mounts (its hard-link limit).', '');
    await writeResults('fuse-floor', lines, { reps, paths: n, samples });
  } finally {
    for (const m of active) await m.stop().catch(() => undefined);
    await clearMountsUnder(work);
    await rm(work, { recursive: true, force: true });
  }
}

await main();
