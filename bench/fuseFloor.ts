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
 * - layerd (`layerd mount`, the union);
 * - fuse-overlayfs (C, libfuse 3 low-level API) on the same layers;
 * - kernel overlayfs, for scale.
 * Two cache policies: none (entry/attr timeout 0: every stat is a round
 * trip, which measures the cost per operation) and each implementation's
 * default. `lstat all (no cache)` divided by the number of paths gives the
 * cost of one lookup round trip.
 *
 *   node dist/bench/fuseFloor.js [--reps N]      (root)
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import Fuse from 'fuse-native';
import type { FuseStat } from 'fuse-native';
import { clearDeadMount, findMount } from '../mount/deadMount.js';
import { LowerInoAllocator } from '../mount/inodes.js';
import { MergedTree } from '../mount/mergedTree.js';
import { lowerStat } from '../mount/nodeStats.js';
import { tarLayerSource } from '../storage/layerIndex.js';
import { StoreOperations } from '../storage/operations.js';
import { Store } from '../storage/store.js';
import { overlayLower } from '../test/support/overlayLower.js';
import { REPO, stats, time, writeResults } from './report.js';

const run = promisify(execFile);
const CORPUS = process.env['LAYERD_CORPUS'] ?? join(REPO, '..', 'shared', 'corpus');
const IMAGE = 'debian-multi:latest';

type Impl = 'floor' | 'layerd' | 'layerd, 60 s cache' | 'fuse-overlayfs' | 'overlayfs';
const IMPLS: Impl[] = ['floor', 'layerd', 'layerd, 60 s cache', 'fuse-overlayfs', 'overlayfs'];
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

interface Mounted { mnt: string; stop(): Promise<void>; server?: ChildProcess }

async function waitMounted(mnt: string): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    if (await findMount(mnt)) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`${mnt} did not mount`);
}

const WORKLOADS: Record<string, string> = {
  'lstat all (cold dentries)': `python3 -c "
import os,sys
paths=[l.rstrip('\\n') for l in open(sys.argv[1])]
for p in paths: os.lstat(os.environ['MNT']+p)" "$PATHS"`,
  'find -printf (stat all)': 'find "$MNT" -printf "%s %m %u\\n" > /dev/null',
};

async function main(): Promise<void> {
  const repsArg = process.argv.indexOf('--reps');
  const reps = repsArg > 0 ? Number(process.argv[repsArg + 1]) : 5;
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-floor-'));
  const active = new Set<Mounted>();
  try {
    const root = join(work, 'store');
    const store = await Store.open(root, { durability: 'none' });
    await new StoreOperations(store).importPath({ path: join(CORPUS, 'oci', 'debian-multi') });
    const layers = await store.imageLayers(IMAGE);
    store.close();
    const lowers: string[] = [];
    for (const [i, l] of layers.entries()) {
      const dir = join(work, `lower-${i}`);
      await overlayLower(l.tarPath, dir);
      lowers.unshift(dir);
    }

    // The floor's answers: the same merged tree and stats layerd computes, precomputed.
    const tree = new MergedTree();
    const inos = new LowerInoAllocator();
    for (const l of layers) tree.addLayer(tarLayerSource(l.index, l.tarPath), inos);
    const files = new Map<string, FuseStat>();
    const dirs = new Map<string, string[]>();
    for (const path of tree.snapshotKinds().keys()) {
      const node = tree.get(path)!;
      const fusePath = '/' + path;
      files.set(path === '' ? '/' : fusePath, lowerStat(path, node) as FuseStat);
      if (node.kind === 'dir') dirs.set(path === '' ? '/' : fusePath, [...(node.children ?? [])]);
    }
    const pathList = join(work, 'paths.txt');
    await writeFile(pathList, [...files.keys()].filter((p) => p !== '/').join('\n') + '\n');

    let seq = 0;
    const mount = async (impl: Impl, policy: Policy): Promise<Mounted> => {
      const base = join(work, `run-${seq++}`);
      const [upper, wd, mnt] = [join(base, 'upper'), join(base, 'work'), join(base, 'mnt')];
      for (const d of [upper, wd, mnt]) await mkdir(d, { recursive: true });
      let m: Mounted;
      if (impl === 'overlayfs') {
        await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lowers.join(':')},upperdir=${upper},workdir=${wd}`, mnt]);
        m = { mnt, stop: async () => { await run('umount', [mnt]); } };
      } else if (impl === 'floor') {
        const cache = policy === 'no cache' ? 0 : 1;
        const fuse = new FloorFuse(mnt, `-oallow_other,use_ino,entry_timeout=${cache},attr_timeout=${cache},negative_timeout=0`, files, dirs);
        await new Promise<void>((done, fail) => fuse.mount((err) => (err ? fail(err) : done())));
        m = { mnt, stop: () => new Promise<void>((done) => fuse.unmount(() => done())) };
      } else {
        const isLayerd = impl !== 'fuse-overlayfs';
        const cacheArgs = impl === 'layerd, 60 s cache' ? ['--cache-seconds', '60']
          : policy === 'no cache' ? (isLayerd ? ['--cache-seconds', '0'] : [',timeout=0']) : [];
        const server = isLayerd
          ? spawn(join(REPO, 'bin', 'layerd'), ['mount', '--layers', layers.map((l) => join(root, 'layers', 'sha256', l.diffId.slice(7))).reverse().join(':'), '--upper', upper, ...cacheArgs, mnt], { stdio: ['ignore', 'ignore', 'inherit'] })
          : spawn('fuse-overlayfs', ['-f', '-o', `lowerdir=${lowers.join(':')},upperdir=${upper},workdir=${wd}${cacheArgs.join('')}`, mnt], { stdio: 'ignore' });
        await waitMounted(mnt);
        m = {
          mnt, server,
          stop: async () => {
            await run('umount', [mnt]).catch(() => clearDeadMount(mnt));
            if (server.exitCode === null) { server.kill('SIGTERM'); await new Promise((r) => server.once('exit', r)); }
          },
        };
      }
      active.add(m);
      return m;
    };

    const samples: Record<string, Partial<Record<Impl, number[]>>> = {};
    for (let r = 0; r < reps; r++) {
      for (const policy of ['no cache', 'default cache'] as Policy[]) {
        for (const impl of IMPLS) {
          // The kernel has no such knob; the 60 s variant only differs in its cache.
          if ((impl === 'overlayfs' || impl === 'layerd, 60 s cache') && policy === 'no cache') continue;
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
      '| workload | floor ms | layerd ms | layerd 60 s cache ms | fuse-overlayfs ms | overlayfs ms | floor / fuse-overlayfs | layerd / floor | layerd / fuse-overlayfs | layerd 60 s / fuse-overlayfs |',
      '|---|---|---|---|---|---|---|---|---|---|',
    ];
    for (const [w, s] of Object.entries(samples)) {
      const [f, l, l60, fo, o] = [med(s.floor), med(s.layerd), med(s['layerd, 60 s cache']), med(s['fuse-overlayfs']), med(s.overlayfs)];
      const ratio = (a: number | undefined, b: number | undefined): string => (a === undefined || b === undefined ? '–' : (a / b).toFixed(2));
      lines.push(`| ${w} | ${fmt(f)} | ${fmt(l)} | ${fmt(l60)} | ${fmt(fo)} | ${fmt(o)} | ${ratio(f, fo)} | ${ratio(l, f)} | ${ratio(l, fo)} | ${ratio(l60, fo)} |`);
    }
    const noCache = samples['lstat all (cold dentries), no cache'];
    if (noCache) {
      lines.push('', `One lookup round trip (lstat with no cache, ${n} paths): ` + IMPLS.filter((i) => noCache[i]).map((i) => `${i} ${fmt((med(noCache[i])! * 1000) / n, 1)} µs`).join(', ') + '.');
    }
    lines.push('', 'floor = fuse-native answering from memory: the best any fuse-native (libfuse 2) filesystem can do. fuse-overlayfs caches names and attributes without expiry by default; layerd writable mounts for 1 s (60 s read-only).', '');
    await writeResults('fuse-floor', lines, { reps, paths: n, samples });
  } finally {
    for (const m of active) await m.stop().catch(() => undefined);
    await rm(work, { recursive: true, force: true });
  }
}

await main();
