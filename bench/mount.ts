/**
 * Union mounts compared on the same layers, in one run: layerd (store
 * layers), kernel overlayfs and fuse-overlayfs (lower directories laid out
 * from the same layer tars), each with a fresh empty upper per workload.
 * Workloads run in separate processes, the three implementations
 * interleaved, several repetitions; medians, min–max and ratios reported.
 * Only ratios from one run mean anything on a shared, noisy machine.
 *
 *   node dist/bench/mount.js [--reps N]       (root; part of `make bench`)
 *
 * Writes bench/results/mount-<timestamp>.{md,json}.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stats, time, writeResults } from './report.js';
import { promisify } from 'node:util';
import { clearDeadMount, findMount } from '../mount/deadMount.js';
import { StoreOperations } from '../storage/operations.js';
import { Store } from '../storage/store.js';
import { overlayLower } from '../test/support/overlayLower.js';

const run = promisify(execFile);
const REPO = resolve(fileURLToPath(import.meta.url), '..', '..', '..');
const CORPUS = process.env['LAYERD_CORPUS'] ?? resolve(REPO, '..', 'shared', 'corpus');
const IMAGE = 'debian-multi:latest';

type Impl = 'layerd' | 'overlayfs' | 'fuse-overlayfs';
const IMPLS: Impl[] = ['layerd', 'overlayfs', 'fuse-overlayfs'];

interface Mounted { mnt: string; stop(): Promise<void>; server?: ChildProcess }

/** Shell workloads, run in a separate process against MNT. */
const WORKLOADS: Record<string, { cold: boolean; script: string }> = {
  'find (cold)': { cold: true, script: 'find "$MNT" > /dev/null' },
  'find (warm)': { cold: false, script: 'find "$MNT" > /dev/null' },
  'stat all (cold)': { cold: true, script: 'find "$MNT" -printf "%s %m %u\\n" > /dev/null' },
  'stat all (warm)': { cold: false, script: 'find "$MNT" -printf "%s %m %u\\n" > /dev/null' },
  'read all (cold)': { cold: true, script: 'tar -cf - -C "$MNT" . > /dev/null' },
  'read all (warm)': { cold: false, script: 'tar -cf - -C "$MNT" . > /dev/null' },
  'create 10k files': { cold: false, script: `python3 -c "
import os,sys
d=os.environ['MNT']+'/bench-new'; os.mkdir(d); b=b'x'*4096
for i in range(10000):
    with open(f'{d}/f{i}','wb') as f: f.write(b)"` },
  'copy-up 1k files': { cold: false, script: `python3 -c "
import os
root=os.environ['MNT']+'/usr/share'; n=0
for dp,dn,fn in os.walk(root):
    for f in fn:
        p=os.path.join(dp,f)
        if os.path.islink(p): continue
        with open(p,'ab') as h: h.write(b'!')
        n+=1
        if n==1000: raise SystemExit"` },
  'rm -rf 5k lower files': { cold: false, script: 'rm -rf "$MNT/usr/lib/python3.11" "$MNT/usr/share/zoneinfo" "$MNT/etc/ssl"' },
};

async function waitMounted(mnt: string, fstype: string): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if ((await findMount(mnt))?.fstype.startsWith(fstype)) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`${mnt} did not mount`);
}

async function main(): Promise<void> {
  const repsArg = process.argv.indexOf('--reps');
  const reps = repsArg > 0 ? Number(process.argv[repsArg + 1]) : 3;
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-mount-'));
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
    let seq = 0;
    const mount = async (impl: Impl): Promise<Mounted> => {
      const base = join(work, `run-${seq++}`);
      const [upper, wd, mnt] = [join(base, 'upper'), join(base, 'work'), join(base, 'mnt')];
      for (const d of [upper, wd, mnt]) await mkdir(d, { recursive: true });
      let m: Mounted;
      if (impl === 'overlayfs') {
        await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lowers.join(':')},upperdir=${upper},workdir=${wd}`, mnt]);
        m = { mnt, stop: async () => { await run('umount', [mnt]); } };
      } else {
        const server = impl === 'layerd'
          ? spawn(join(REPO, 'bin', 'layerd'), ['mount', '--root', root, '--image', IMAGE, '--upper', upper, mnt], { stdio: ['ignore', 'ignore', 'inherit'] })
          : spawn('fuse-overlayfs', ['-f', '-o', `lowerdir=${lowers.join(':')},upperdir=${upper},workdir=${wd}`, mnt], { stdio: 'ignore' });
        await waitMounted(mnt, 'fuse');
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
    const unmount = async (m: Mounted): Promise<void> => { await m.stop(); active.delete(m); };

    const samples: Record<string, Record<Impl, number[]>> = {};
    const add = (w: string, impl: Impl, ms: number): void => {
      ((samples[w] ??= { layerd: [], overlayfs: [], 'fuse-overlayfs': [] })[impl]).push(ms);
    };
    for (let r = 0; r < reps; r++) {
      for (const impl of IMPLS) {
        // mount until ready
        add('mount until ready', impl, await time(async () => { const m = await mount(impl); await unmount(m); }));
        let m: Mounted | undefined;
        for (const [name, w] of Object.entries(WORKLOADS)) {
          if (w.cold || m === undefined || name.startsWith('create') || name.startsWith('copy-up') || name.startsWith('rm')) {
            if (m) await unmount(m);
            if (w.cold) await writeFile('/proc/sys/vm/drop_caches', '3');
            m = await mount(impl);
          }
          const mnt = m.mnt;
          add(name, impl, await time(() => run('sh', ['-c', w.script], { env: { ...process.env, MNT: mnt }, maxBuffer: 1 << 26 })));
        }
        if (m) await unmount(m);
      }
    }
    const med = (xs: number[]): number => stats(xs).median;
    const lines = [
      `# Union mounts on debian-multi (4 layers, ~7k files), ${reps} repetitions, ${new Date().toISOString()}`,
      '',
      '| workload | layerd ms | overlayfs ms | fuse-overlayfs ms | layerd / overlayfs | layerd / fuse-overlayfs |',
      '|---|---|---|---|---|---|',
    ];
    for (const [w, s] of Object.entries(samples)) {
      const cell = (xs: number[]): string => `${med(xs).toFixed(0)} (${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)})`;
      lines.push(`| ${w} | ${cell(s.layerd)} | ${cell(s.overlayfs)} | ${cell(s['fuse-overlayfs'])} | ${(med(s.layerd) / med(s.overlayfs)).toFixed(2)} | ${(med(s.layerd) / med(s['fuse-overlayfs'])).toFixed(2)} |`);
    }
    lines.push('', 'Ratios are layerd time / peer time (lower is better for layerd).', '');
    await writeResults('mount', lines, { reps, samples });
  } finally {
    for (const m of active) await m.stop().catch(() => undefined);
    await rm(work, { recursive: true, force: true });
  }
}

await main();
