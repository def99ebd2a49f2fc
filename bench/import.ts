/**
 * Import throughput of debian-multi next to the bare decompressors
 * (`pigz -d`, `zstd -d`) on the same blobs, in the same run, interleaved
 * (the order of the cases rotates each repetition). Only ratios from one run
 * mean anything on a shared, noisy machine. Each import starts from an empty
 * store whose removal is not timed; it includes opening the store.
 *
 *   make bench            (or: node dist/bench/import.js [--reps N])
 *
 * Writes bench/results/import-<timestamp>.{md,json}.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CORPUS, argOf, stats, time, writeResults } from './report.js';
import { importFromSource } from '../storage/importer.js';
import { detectSource } from '../storage/sources/detect.js';
import { Store } from '../storage/store.js';

const run = promisify(execFile);
const LAYOUT = join(CORPUS, 'oci', 'debian-multi');
const LAYER_BLOBS = [
  'c03315e586d033da36cda954a86e572ab9f2601a0000dc3377c6baef8fcf8639',
  '5ed84ad7e40a78fab91ea775b355cbf16d84ee1a603977ccbdcf4df853ba1fb5',
  '48faf52126d0077448cde6c03a61d062a89191f0f26f542f8ff4c25d422bddde',
  'dd17963f6facdd5aa380bd5096c1233d3a57a73c168343b4875f369618766a96',
];
const UNCOMPRESSED_BYTES = 210_770_000; // sum of the four layer tars (CORPUS.generated.md)

async function decompressAll(tool: string, blobs: string[]): Promise<void> {
  for (const b of blobs) await run('sh', ['-c', `${tool} -dc '${b}' > /dev/null`]);
}

interface ImportCase { layout: string; durability: 'full' | 'none'; concurrency: number; layerFormat?: 'tar' | 'skeleton' }

async function importLayout(c: ImportCase, root: string): Promise<void> {
  const store = await Store.open(root, { durability: c.durability, layerFormat: c.layerFormat ?? 'tar' });
  try {
    const detected = await detectSource(c.layout, {});
    if (detected.kind !== 'image') throw new Error('not an image');
    await importFromSource(store, detected.source, { concurrency: c.concurrency });
  } finally {
    store.close();
  }
}

async function main(): Promise<void> {
  const reps = Number(argOf('--reps', '5'));
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-'));
  try {
    const zstdLayout = join(work, 'zstd');
    await run('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-compress-format', 'zstd', `oci:${LAYOUT}:latest`, `oci:${zstdLayout}:latest`]);
    const gzipBlobs = LAYER_BLOBS.map((h) => join(LAYOUT, 'blobs', 'sha256', h));
    const zstdBlobs = (await readdir(join(zstdLayout, 'blobs', 'sha256'))).map((h) => join(zstdLayout, 'blobs', 'sha256', h));
    // Only the layer blobs of the zstd layout: they are the zstd frames.
    const zstdLayerBlobs: string[] = [];
    for (const b of zstdBlobs) {
      const { stdout } = await run('sh', ['-c', `head -c 4 '${b}' | od -An -tx1`]);
      if (stdout.replace(/\s/g, '') === '28b52ffd') zstdLayerBlobs.push(b);
    }

    const store = join(work, 'store');
    const imports: Record<string, ImportCase> = {
      'layerd import gzip layout (durable)': { layout: LAYOUT, durability: 'full', concurrency: 1 },
      'layerd import gzip layout (no fsync)': { layout: LAYOUT, durability: 'none', concurrency: 1 },
      'layerd import gzip layout (no fsync, 2 layers at once)': { layout: LAYOUT, durability: 'none', concurrency: 2 },
      'layerd import zstd layout (durable)': { layout: zstdLayout, durability: 'full', concurrency: 1 },
      'layerd import zstd layout (no fsync)': { layout: zstdLayout, durability: 'none', concurrency: 1 },
      // Layers kept as skeleton + one object per file (docs/storage.md, issue 17 "one copy").
      'layerd import gzip layout (durable, skeleton)': { layout: LAYOUT, durability: 'full', concurrency: 1, layerFormat: 'skeleton' },
      'layerd import gzip layout (no fsync, skeleton)': { layout: LAYOUT, durability: 'none', concurrency: 1, layerFormat: 'skeleton' },
    };
    const cases: Record<string, () => Promise<void>> = {
      'pigz -d (gzip blobs)': () => decompressAll('pigz', gzipBlobs),
      'zstd -d (zstd blobs)': () => decompressAll('zstd', zstdLayerBlobs),
      ...Object.fromEntries(Object.entries(imports).map(([k, c]) => [k, () => importLayout(c, store)])),
    };
    const untimed = async (name: string): Promise<void> => {
      if (name in imports) await rm(store, { recursive: true, force: true });
    };
    const samples: Record<string, number[]> = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
    const names = Object.keys(cases);
    for (const name of names) { await untimed(name); await cases[name]!(); } // warm the page cache and the JIT
    const load = [loadavg()[0]!];
    for (let r = 0; r < reps; r++) {
      for (let i = 0; i < names.length; i++) {
        const name = names[(i + r) % names.length]!;
        await untimed(name);
        samples[name]!.push(await time(cases[name]!));
      }
    }
    load.push(loadavg()[0]!);
    const result = Object.fromEntries(Object.entries(samples).map(([k, v]) => [k, { ...stats(v), samples: v }]));
    const med = (k: string): number => result[k]!.median;
    const ratios = {
      'gzip import vs pigz -d (durable)': med('pigz -d (gzip blobs)') / med('layerd import gzip layout (durable)'),
      'gzip import vs pigz -d (no fsync)': med('pigz -d (gzip blobs)') / med('layerd import gzip layout (no fsync)'),
      'gzip import vs pigz -d (no fsync, 2 layers at once)': med('pigz -d (gzip blobs)') / med('layerd import gzip layout (no fsync, 2 layers at once)'),
      'zstd import vs zstd -d (durable)': med('zstd -d (zstd blobs)') / med('layerd import zstd layout (durable)'),
      'zstd import vs zstd -d (no fsync)': med('zstd -d (zstd blobs)') / med('layerd import zstd layout (no fsync)'),
      'gzip import vs pigz -d (durable, skeleton)': med('pigz -d (gzip blobs)') / med('layerd import gzip layout (durable, skeleton)'),
      'gzip import vs pigz -d (no fsync, skeleton)': med('pigz -d (gzip blobs)') / med('layerd import gzip layout (no fsync, skeleton)'),
    };
    const lines = [
      `# Import throughput, debian-multi (4 layers, ${(UNCOMPRESSED_BYTES / 1e6).toFixed(0)} MB of tar), ${reps} repetitions, ${new Date().toISOString()}`,
      '',
      `Load average (1 min) at the start and end of the timed runs: ${load.map((l) => l.toFixed(1)).join(' → ')} on ${availableParallelism()} CPUs.`,
      '',
      '| case | median ms | min–max ms | MB/s (uncompressed) |',
      '|---|---|---|---|',
      ...Object.entries(result).map(([k, s]) => `| ${k} | ${s.median.toFixed(0)} | ${s.min.toFixed(0)}–${s.max.toFixed(0)} | ${(UNCOMPRESSED_BYTES / 1e6 / (s.median / 1000)).toFixed(0)} |`),
      '',
      '| ratio (throughput of layerd / bare decompressor; goal ≥ 0.8) | value |',
      '|---|---|',
      ...Object.entries(ratios).map(([k, v]) => `| ${k} | ${v.toFixed(2)} |`),
      '',
    ];
    await writeResults('import', lines, { reps, load, result, ratios });
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
