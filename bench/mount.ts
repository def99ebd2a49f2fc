/**
 * Union mounts compared on the same layers, in one run: layerd (`layerd
 * mount --layers …`, one process per mount as the daemon's store layers),
 * kernel overlayfs and fuse-overlayfs (lower directories laid out from the
 * same layer tars), each with a fresh empty upper where a workload writes.
 * Two datasets, each its own table:
 *  - debian-multi: the corpus image (4 real Debian layers, ~7k files);
 *  - synthetic: bench/synthetic.ts (4 layers, 63,941 merged files with
 *    overrides, whiteouts and an opaque directory, one 1 GiB file), built
 *    once and cached under /var/tmp/layerd-bench-synthetic.
 * Workloads run in separate processes, the three implementations
 * interleaved (the order rotates each repetition), several repetitions;
 * medians, min–max and ratios, plus the CPU time the mount server spent on
 * each workload (/proc/PID/stat before and after). Cold workloads unmount,
 * `sync; echo 3 > /proc/sys/vm/drop_caches`, and mount again first.
 * Only ratios from one run mean anything on a shared, noisy machine.
 *
 *   node dist/bench/mount.js [--reps N] [--dataset debian-multi|synthetic|all] [--only REGEX] [--fuse-wake-here on|off|as-is]   (root; part of `make bench`)
 *
 * `--only` runs just the workloads whose names match (e.g. 'read all|python3').
 *
 * layerd serves files of store layers through their content-addressed
 * objects (storage/objectStore.ts) once a mount has opened them: every mount
 * of a run shares the store, so the timed mounts find the objects the
 * warm-up mounts and earlier workloads made (the steady state).
 *
 * Writes bench/results/mount-<timestamp>.{md,json}.
 */
import { execFile } from 'node:child_process';
import { access, mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { type Impl, IMPLS_WITH_PASSTHROUGH_OFF as IMPLS, type LayerStack, type Mounted, clearMountsUnder, debianMultiStack, mountStack } from './mounts.js';
import { type CpuTimes, cpuDelta, cpuTimes } from './procstat.js';
import { argOf, stats, writeResults } from './report.js';
import { SYNTHETIC_PATHS, syntheticDataset } from './synthetic.js';
import { fuseWakeHereForRun } from './wakeHere.js';
import { LAYER_TAR } from '../storage/layerIndex.js';
import { readLayerIndex } from '../storage/store.js';
import { makeLayerObjects } from '../storage/objectStore.js';

const run = promisify(execFile);
const CACHE = process.env['LAYERD_BENCH_CACHE'] ?? '/var/tmp/layerd-bench-synthetic';
const EXDEV_EXIT = 18;

type DatasetName = 'debian-multi' | 'synthetic';
const DATASETS: DatasetName[] = ['debian-multi', 'synthetic'];

interface Workload {
  /** Unmount, drop the caches, mount again before it. */
  cold?: boolean;
  /** A fresh mount (empty upper) before it. */
  fresh?: boolean;
  /** Untimed, before the script (e.g. load its input into the page cache). */
  prepare?: string;
  /** Timed, in its own process; $MNT is the mount, $SRC_TAR the untar input. Exit 18 with "EXDEV" = the rename was refused. */
  script: string;
  /** Untimed, after: checks the workload did what it says. */
  check?: string;
  /** Bytes it reads or writes, for MB/s. */
  bytes?: number;
}

interface Dataset {
  name: DatasetName;
  title: string;
  stack: LayerStack;
  workloads: Record<string, Workload>;
  notes: string[];
}

/** One measurement: wall time, server CPU (undefined: kernel), or the error a peer answers with. */
interface Sample { ms: number; cpu?: CpuTimes; error?: 'EXDEV' }

const py = (body: string): string => `python3 -c "${body.replace(/"/g, '\\"')}"`;

/** Rename a lower directory with one rename(2); EXDEV is an answer, not a failure. */
function renameWorkload(src: string, dst: string, check: string): Workload {
  return {
    fresh: true,
    script: py(`
import errno,os,sys
m=os.environ['MNT']
try: os.rename(m+'/${src}', m+'/${dst}')
except OSError as e:
    if e.errno!=errno.EXDEV: raise
    print('EXDEV'); sys.exit(${EXDEV_EXIT})`),
    check: `test ! -e "$MNT/${src}" && ${check}`,
  };
}

/** Workloads both datasets run; paths differ. */
function commonWorkloads(o: { readAllExclude: string; copyUpRoot: string; rmPaths: string[]; untarBytes: number }): Record<string, Workload> {
  // GNU tar skips reading file data when its archive is /dev/null: pipe it.
  const readAll = `tar -cf - -C "$MNT" ${o.readAllExclude} . | cat > /dev/null`;
  const stat = 'find "$MNT" -printf "%s %m %u\\n" > /dev/null';
  return {
    'find (cold)': { cold: true, script: 'find "$MNT" > /dev/null' },
    'find (warm)': { script: 'find "$MNT" > /dev/null' },
    'stat all (cold)': { cold: true, script: stat },
    'stat all (warm)': { script: stat },
    'read all (cold)': { cold: true, script: readAll },
    'read all (warm)': { script: readAll },
    'create 10k files': {
      fresh: true, script: py(`
import os
d=os.environ['MNT']+'/bench-new'; os.mkdir(d); b=b'x'*4096
for i in range(10000):
    with open(f'{d}/f{i}','wb') as f: f.write(b)`),
    },
    'copy-up 1k files': {
      fresh: true, script: py(`
import os
root=os.environ['MNT']+'/${o.copyUpRoot}'; n=0
for dp,dn,fn in os.walk(root):
    for f in fn:
        p=os.path.join(dp,f)
        if os.path.islink(p): continue
        with open(p,'ab') as h: h.write(b'!')
        n+=1
        if n==1000: raise SystemExit
raise SystemExit('only %d files' % n)`),
    },
    'rm -rf 5k lower files': { fresh: true, script: `cd "$MNT" && rm -rf ${o.rmPaths.join(' ')}`, check: `cd "$MNT" && for p in ${o.rmPaths.join(' ')}; do test ! -e "$p" || exit 1; done` },
    'write a 512 MiB file': {
      fresh: true, bytes: 512 * 1024 * 1024,
      script: 'dd if=/dev/zero of="$MNT/bench-big" bs=1M count=512 status=none',
      check: 'test "$(stat -c %s "$MNT/bench-big")" -eq 536870912',
    },
    'read it back (warm)': { bytes: 512 * 1024 * 1024, script: 'dd if="$MNT/bench-big" of=/dev/null bs=1M status=none' },
    'untar source tree': {
      fresh: true, prepare: 'cat "$SRC_TAR" > /dev/null', bytes: o.untarBytes,
      script: 'mkdir "$MNT/untar" && tar -xf "$SRC_TAR" -C "$MNT/untar"',
      check: 'test "$(tar -tf "$SRC_TAR" | wc -l)" -eq "$(cd "$MNT/untar" && find . | wc -l)"',
    },
  };
}

/** A tar of the host's /usr/include (without the node and llvm headers), made once. */
async function untarSource(): Promise<{ path: string; bytes: number; entries: number }> {
  const path = join(CACHE, 'untar-src-v1.tar');
  if (!(await access(path).then(() => true, () => false))) {
    await mkdir(CACHE, { recursive: true });
    await run('tar', ['-cf', `${path}.tmp`, '-C', '/usr/include', '--exclude=./node', '--exclude=./llvm-14', '.']);
    await rename(`${path}.tmp`, path);
  }
  const { stdout } = await run('sh', ['-c', 'wc -c < "$0"; tar -tf "$0" | wc -l', path]);
  const [bytes, entries] = stdout.trim().split('\n').map(Number);
  return { path, bytes: bytes!, entries: entries! };
}

async function debianMulti(work: string, untar: { bytes: number }): Promise<Dataset> {
  const rmPaths = ['usr/lib/python3.11', 'usr/share/zoneinfo', 'etc/ssl'];
  return {
    name: 'debian-multi',
    title: 'debian-multi (4 layers, ~7k files)',
    stack: await debianMultiStack(join(work, 'debian-multi')),
    workloads: {
      ...commonWorkloads({ readAllExclude: '', copyUpRoot: 'usr/share', rmPaths, untarBytes: untar.bytes }),
      // mmap'd executables and libraries (python3 and libpython from layer 2), 20 runs after an untimed one.
      'python3 -c "import argparse" ×20 in a chroot (warm)': {
        fresh: true, prepare: 'chroot "$MNT" /usr/bin/python3 -c "import argparse"',
        script: 'i=0; while [ $i -lt 20 ]; do chroot "$MNT" /usr/bin/python3 -c "import argparse" || exit 1; i=$((i+1)); done',
      },
      'rename lower dir (usr/share/zoneinfo, 1.3k entries)': renameWorkload('usr/share/zoneinfo', 'usr/share/zoneinfo.moved', 'test -f "$MNT/usr/share/zoneinfo.moved/UTC"'),
    },
    notes: [],
  };
}

async function synthetic(untar: { bytes: number }): Promise<Dataset> {
  const d = await syntheticDataset(CACHE);
  const big = SYNTHETIC_PATHS.bigFile;
  const seqRead = `dd if="$MNT/${big}" of=/dev/null bs=1M status=none`;
  return {
    name: 'synthetic',
    title: `synthetic (${d.layerDirs.length} layers, ${d.mergedFiles.toLocaleString('en')} merged files, one 1 GiB file)`,
    stack: d,
    workloads: {
      ...commonWorkloads({ readAllExclude: `--exclude=./${big.split('/')[0]}`, copyUpRoot: SYNTHETIC_PATHS.copyUpRoot, rmPaths: [...SYNTHETIC_PATHS.rmPaths], untarBytes: untar.bytes }),
      'rename lower dir (1,000 entries)': renameWorkload(SYNTHETIC_PATHS.renameDir, 'rename/dst', `test "$(ls -A "$MNT/rename/dst" | wc -l)" -eq ${SYNTHETIC_PATHS.renameEntries}`),
      'sequential read 1 GiB (cold)': { cold: true, script: seqRead, bytes: SYNTHETIC_PATHS.bigBytes },
      'sequential read 1 GiB (warm)': { script: seqRead, bytes: SYNTHETIC_PATHS.bigBytes },
    },
    notes: [
      `Layers: ${d.layerEntries.map((n, i) => `${n.toLocaleString('en')} entries / ${(d.layerBytes[i]! / 1e6).toFixed(0)} MB`).join(', ')} (tar entries / uncompressed bytes, bottom → top).`,
      `"read all" leaves out the 1 GiB file (big/), which the sequential-read rows cover; it reads the other ${(d.mergedFiles - 1).toLocaleString('en')} files.`,
      '"rm -rf 5k lower files" removes data/d000…d020 (5,061 files, top versions in layers 1–3).',
    ],
  };
}

async function loadAverage(): Promise<string> {
  return (await readFile('/proc/loadavg', 'utf8')).split(' ')[0]!;
}

async function dropCaches(): Promise<void> {
  await run('sync');
  await writeFile('/proc/sys/vm/drop_caches', '3');
}

async function runWorkload(w: Workload, m: Mounted, env: NodeJS.ProcessEnv): Promise<Sample> {
  const opts = { env: { ...env, MNT: m.mnt }, maxBuffer: 1 << 26 };
  if (w.prepare) await run('sh', ['-c', w.prepare], opts);
  const before = m.pid !== undefined ? await cpuTimes(m.pid) : undefined;
  const t0 = performance.now();
  let error: Sample['error'];
  try {
    await run('sh', ['-c', w.script], opts);
  } catch (err) {
    const e = err as { code?: unknown; stdout?: string };
    if (e.code !== EXDEV_EXIT || !String(e.stdout).includes('EXDEV')) throw err;
    error = 'EXDEV';
  }
  const ms = performance.now() - t0;
  const cpu = before && m.pid !== undefined ? cpuDelta(before, await cpuTimes(m.pid)) : undefined;
  if (!error && w.check) await run('sh', ['-c', w.check], opts);
  return { ms, ...(cpu ? { cpu } : {}), ...(error ? { error } : {}) };
}

type Samples = Record<string, Record<Impl, Sample[]>>;

async function benchDataset(ds: Dataset, reps: number, work: string, env: NodeJS.ProcessEnv, active: Set<Mounted>, only: RegExp | undefined): Promise<Samples> {
  const samples: Samples = {};
  const add = (w: string, impl: Impl, s: Sample): void => {
    ((samples[w] ??= Object.fromEntries(IMPLS.map((i) => [i, []])) as unknown as Record<Impl, Sample[]>)[impl]).push(s);
  };
  let seq = 0;
  const mount = async (impl: Impl): Promise<Mounted> => {
    const m = await mountStack(impl, ds.stack, join(work, `run-${ds.name}-${seq++}`));
    active.add(m);
    return m;
  };
  const unmount = async (m: Mounted): Promise<void> => { await m.stop(); active.delete(m); };
  // The objects layerd's mounts pass lower files through to (storage/objectStore.ts), made now as
  // first opens would make them one by one: the timed mounts measure the steady state.
  const t0 = performance.now();
  let files = 0;
  for (const dir of ds.stack.layerDirs) files += await makeLayerObjects(await readLayerIndex(dir), join(dir, LAYER_TAR));
  process.stderr.write(`mount bench: ${ds.name}: objects of ${files} files made in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
  for (let r = 0; r < reps; r++) {
    for (const impl of [...IMPLS.slice(r % IMPLS.length), ...IMPLS.slice(0, r % IMPLS.length)]) {
      process.stderr.write(`mount bench: ${ds.name} rep ${r + 1}/${reps} ${impl}\n`);
      await unmount(await mount(impl)); // warm-up: server binaries and layer indexes in the page cache
      const ready = await mount(impl);
      add('mount until ready', impl, { ms: ready.readyMs, ...(ready.pid !== undefined ? { cpu: await cpuTimes(ready.pid) } : {}) });
      await unmount(ready);
      let m: Mounted | undefined;
      for (const [name, w] of Object.entries(ds.workloads).filter(([n]) => only === undefined || only.test(n))) {
        if (m === undefined || w.cold || w.fresh) {
          if (m) await unmount(m);
          if (w.cold) await dropCaches();
          m = await mount(impl);
        }
        add(name, impl, await runWorkload(w, m, env));
      }
      if (m) await unmount(m);
    }
  }
  return samples;
}

function table(ds: Dataset, samples: Samples): string[] {
  const ms = (xs: Sample[]): number[] => xs.map((s) => s.ms);
  const med = (xs: number[]): number => stats(xs).median;
  const failed = (xs: Sample[]): string | undefined => xs.find((s) => s.error)?.error;
  const cell = (xs: Sample[]): string => failed(xs) ?? `${med(ms(xs)).toFixed(0)} (${Math.min(...ms(xs)).toFixed(0)}–${Math.max(...ms(xs)).toFixed(0)})`;
  const ratio = (a: Sample[], b: Sample[]): string => (failed(a) || failed(b) ? '–' : (med(ms(a)) / med(ms(b))).toFixed(2));
  const cpu = (xs: Sample[]): string => {
    const c = xs.map((s) => s.cpu).filter((x) => x !== undefined);
    if (c.length === 0) return 'kernel';
    const total = med(c.map((x) => x.self + x.children));
    const children = med(c.map((x) => x.children));
    return children >= 0.005 ? `${total.toFixed(2)} (${children.toFixed(2)} children)` : total.toFixed(2);
  };
  const others = IMPLS.filter((i) => i !== 'overlayfs');
  const lines = [
    `## ${ds.title}`,
    '',
    `| workload | ${IMPLS.map((i) => `${i} ms`).join(' | ')} | ${others.map((i) => `${i} / overlayfs`).join(' | ')} | layerd / fuse-overlayfs | ${IMPLS.map((i) => `${i} server CPU s`).join(' | ')} |`,
    `|---|${IMPLS.map(() => '---|').join('')}${others.map(() => '---|').join('')}---|${IMPLS.map(() => '---|').join('')}`,
  ];
  for (const [w, s] of Object.entries(samples)) {
    lines.push(`| ${w} | ${IMPLS.map((i) => cell(s[i])).join(' | ')} | ${others.map((i) => ratio(s[i], s.overlayfs)).join(' | ')} | ${ratio(s.layerd, s['fuse-overlayfs'])} | ${IMPLS.map((i) => cpu(s[i])).join(' | ')} |`);
  }
  const withBytes = Object.entries(ds.workloads).filter(([w, wl]) => wl.bytes !== undefined && samples[w] !== undefined);
  if (withBytes.length > 0) {
    const mbs = (xs: Sample[], bytes: number): string => failed(xs) ?? (bytes / 1e6 / (med(ms(xs)) / 1000)).toFixed(0);
    lines.push('', `| throughput (MB/s = 10^6 bytes/s, from the median time) | ${IMPLS.join(' | ')} |`, `|---|${IMPLS.map(() => '---|').join('')}`);
    for (const [w, wl] of withBytes) {
      const s = samples[w]!;
      lines.push(`| ${w} (${(wl.bytes! / 1e6).toFixed(0)} MB) | ${IMPLS.map((i) => mbs(s[i], wl.bytes!)).join(' | ')} |`);
    }
  }
  if (ds.notes.length > 0) lines.push('', ...ds.notes.map((n) => `- ${n}`));
  lines.push('');
  return lines;
}

async function main(): Promise<void> {
  const reps = Number(argOf('--reps', '3'));
  const which = argOf('--dataset', 'all');
  if (!Number.isInteger(reps) || reps < 1) throw new Error('--reps must be a positive integer');
  if (which !== 'all' && !DATASETS.includes(which as DatasetName)) throw new Error(`--dataset must be one of ${DATASETS.join(', ')}, all`);
  const chosen = which === 'all' ? DATASETS : [which as DatasetName];
  const onlyArg = argOf('--only', '');
  const only = onlyArg === '' ? undefined : new RegExp(onlyArg);
  const wakeHere = await fuseWakeHereForRun();
  const started = performance.now();
  const loadStart = await loadAverage();
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-mount-'));
  const active = new Set<Mounted>();
  const cleanup = async (): Promise<void> => {
    for (const m of active) await m.stop().catch(() => undefined);
    await clearMountsUnder(work);
    await rm(work, { recursive: true, force: true });
    await wakeHere.restore();
  };
  const onSignal = (): void => { void cleanup().finally(() => process.exit(130)); };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const untar = await untarSource();
    const env = { ...process.env, SRC_TAR: untar.path };
    const lines = [`# Union mounts: layerd vs kernel overlayfs vs fuse-overlayfs, ${reps} repetitions, ${new Date().toISOString()}`, ''];
    const data: Record<string, Samples> = {};
    for (const name of chosen) {
      const ds = name === 'synthetic' ? await synthetic(untar) : await debianMulti(work, untar);
      data[name] = await benchDataset(ds, reps, work, env, active, only);
      lines.push(...table(ds, data[name]));
    }
    const minutes = (performance.now() - started) / 60_000;
    lines.push(
      'Times are medians (min–max) in ms of the workload process, which also pays its own start-up (sh, python3: ~10–30 ms).',
      'Ratios are layerd time / peer time (lower is better for layerd). "EXDEV": rename(2) of a lower directory was refused (overlayfs without redirect_dir, fuse-overlayfs); `mv` would fall back to copying.',
      'Server CPU s: user+system time of the mount server process during the workload (/proc/PID/stat utime+stime, plus cutime+cstime of helper processes it ran, shown as "children"); "kernel": overlayfs has no server process. For "mount until ready" it is the CPU from spawn until ready.',
      'Mount until ready: from spawning the server (or running mount(8)) until the mount shows in /proc/self/mountinfo; measured after one untimed warm-up mount.',
      `Cold rows: unmount, \`sync; echo 3 > /proc/sys/vm/drop_caches\`, mount again. "untar source tree": \`tar -xf\` of ${(untar.bytes / 1e6).toFixed(0)} MB (${untar.entries.toLocaleString('en')} entries, the host's /usr/include without node/ and llvm-14/) into a new directory of a fresh mount; input in the page cache.`,
      wakeHere.note,
      `Whole run: ${minutes.toFixed(1)} min. Load average (1 min) at start ${loadStart}, at end ${await loadAverage()} on ${cpus().length} CPUs: other work on the machine shares them.`,
      '',
    );
    await writeResults('mount', lines, { reps, datasets: chosen, untar, samples: data });
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await cleanup();
  }
}

await main();
