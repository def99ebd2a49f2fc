/**
 * Sequential read of the synthetic stack's 1 GiB file, cold and warm, with
 * the three implementations mounted side by side for the whole run and the
 * reads interleaved (the order rotates each repetition). Unlike the mount
 * bench's rows, the mounts stay up: a cold read here is `sync`, drop caches,
 * read, so every repetition of every implementation meets the same state of
 * the host's cache as nearly as a shared machine allows.
 *
 *   node dist/bench/seqRead.js [--reps N]      (root; part of `make bench`)
 *
 * Writes bench/results/seq-read-<timestamp>.{md,json}.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { IMPLS, type Impl, type Mounted, clearMountsUnder, mountStack } from './mounts.js';
import { argOf, stats, time, writeResults } from './report.js';
import { SYNTHETIC_PATHS, syntheticDataset } from './synthetic.js';

const run = promisify(execFile);

async function dropCaches(): Promise<void> {
  await run('sync');
  await writeFile('/proc/sys/vm/drop_caches', '3');
}

async function main(): Promise<void> {
  const reps = Number(argOf('--reps', '5'));
  if (!Number.isInteger(reps) || reps < 1) throw new Error('--reps must be a positive integer');
  const dataset = await syntheticDataset();
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-seq-'));
  const mounts = new Map<Impl, Mounted>();
  const none = (): Record<Impl, number[]> => Object.fromEntries(IMPLS.map((i) => [i, []])) as unknown as Record<Impl, number[]>;
  const samples: Record<'cold' | 'warm', Record<Impl, number[]>> = { cold: none(), warm: none() };
  try {
    for (const impl of IMPLS) mounts.set(impl, await mountStack(impl, dataset, join(work, impl)));
    const read = (impl: Impl): Promise<number> => time(() => run('dd', [`if=${join(mounts.get(impl)!.mnt, SYNTHETIC_PATHS.bigFile)}`, 'of=/dev/null', 'bs=1M', 'status=none']));
    for (let r = 0; r < reps; r++) {
      for (const impl of [...IMPLS.slice(r % IMPLS.length), ...IMPLS.slice(0, r % IMPLS.length)]) {
        process.stderr.write(`seq read bench: rep ${r + 1}/${reps} ${impl}\n`);
        await dropCaches();
        samples.cold[impl].push(await read(impl));
        samples.warm[impl].push(await read(impl));
      }
    }
  } finally {
    for (const m of mounts.values()) await m.stop().catch(() => undefined);
    await clearMountsUnder(work);
    await rm(work, { recursive: true, force: true });
  }
  const mbs = (ms: number): string => (SYNTHETIC_PATHS.bigBytes / 1e6 / (ms / 1000)).toFixed(0);
  const lines = [
    `# Sequential read of a 1 GiB file (synthetic stack), ${reps} repetitions, ${new Date().toISOString()}`,
    '',
    '| read | layerd MB/s | overlayfs MB/s | fuse-overlayfs MB/s | layerd / fuse-overlayfs (throughput) | ms, median (min–max): layerd · overlayfs · fuse-overlayfs |',
    '|---|---|---|---|---|---|',
  ];
  for (const kind of ['cold', 'warm'] as const) {
    const s = Object.fromEntries(IMPLS.map((i) => [i, stats(samples[kind][i])])) as Record<Impl, ReturnType<typeof stats>>;
    const range = (i: Impl): string => `${s[i].median.toFixed(0)} (${s[i].min.toFixed(0)}–${s[i].max.toFixed(0)})`;
    lines.push(`| ${kind} | ${mbs(s.layerd.median)} | ${mbs(s.overlayfs.median)} | ${mbs(s['fuse-overlayfs'].median)} | ${(s['fuse-overlayfs'].median / s.layerd.median).toFixed(2)} | ${IMPLS.map(range).join(' · ')} |`);
  }
  lines.push('', 'Cold: `sync`, `echo 3 > /proc/sys/vm/drop_caches`, then `dd bs=1M`; warm: the same read again. The disk is virtual: a cold read is served by the host\'s cache when it has the blocks, which no guest can control.', '');
  await writeResults('seq-read', lines, { reps, samples });
}

await main();
