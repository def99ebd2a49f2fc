/**
 * Pull throughput: `layerctl pull` of debian-multi from a loopback
 * docker-registry next to `skopeo copy docker://… oci:…` of the same image,
 * in the same run, interleaved. skopeo only stores the blobs (and checks
 * their digests); a layerd pull also decompresses every layer, checks its
 * diffID and indexes it — gunzip alone of these blobs takes longer than the
 * whole skopeo copy (bench/import.ts: `pigz -d`), so the second baseline is
 * what a pull replaces: skopeo copy, then a local import of the layout.
 *
 *   node dist/bench/pull.js [--reps N]
 *
 * Writes bench/results/pull-<timestamp>.{md,json}.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { argOf, stats, time, writeResults } from './report.js';
import { promisify } from 'node:util';
import { importFromSource } from '../storage/importer.js';
import { pullImage } from '../storage/registry/pull.js';
import { detectSource } from '../storage/sources/detect.js';
import { Store } from '../storage/store.js';
import { TestRegistry, pushCorpus } from '../test/support/registry.js';

const run = promisify(execFile);
const COMPRESSED_BYTES = 81_120_000; // debian-multi:latest layers (CORPUS.generated.md)

async function layerdPull(ref: string, root: string, durability: 'full' | 'none'): Promise<void> {
  await rm(root, { recursive: true, force: true });
  const store = await Store.open(root, { durability });
  try {
    await pullImage(store, ref);
  } finally {
    store.close();
  }
}

async function skopeoCopy(ref: string, dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  await run('skopeo', ['--insecure-policy', 'copy', '-q', '--src-tls-verify=false', `docker://${ref}`, `oci:${dir}:latest`]);
}

/** What a pull replaces: fetch the image with skopeo, then import the layout. */
async function skopeoThenImport(ref: string, dir: string, root: string): Promise<void> {
  await skopeoCopy(ref, dir);
  await rm(root, { recursive: true, force: true });
  const store = await Store.open(root, { durability: 'full' });
  try {
    const detected = await detectSource(dir, { name: 'dm' });
    if (detected.kind !== 'image') throw new Error('not an image layout');
    await importFromSource(store, detected.source, {});
  } finally {
    store.close();
  }
}

async function main(): Promise<void> {
  const reps = Number(argOf('--reps', '5'));
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-pull-'));
  const registry = await TestRegistry.start(join(work, 'registry'));
  try {
    await pushCorpus(registry.host, ['debian-multi:latest'], work);
    const ref = `${registry.host}/corpus/debian-multi:latest`;
    const cases: Record<string, () => Promise<void>> = {
      'skopeo copy docker:// → oci:': () => skopeoCopy(ref, join(work, 'skopeo')),
      'layerd pull (durable)': () => layerdPull(ref, join(work, 'store'), 'full'),
      'layerd pull (no fsync)': () => layerdPull(ref, join(work, 'store'), 'none'),
      'skopeo copy, then layerd import (durable)': () => skopeoThenImport(ref, join(work, 'skopeo'), join(work, 'store')),
    };
    const samples: Record<string, number[]> = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
    for (const fn of Object.values(cases)) await fn(); // warm the registry's and the page cache
    for (let r = 0; r < reps; r++) {
      for (const [name, fn] of Object.entries(cases)) samples[name]!.push(await time(fn));
    }
    const result = Object.fromEntries(Object.entries(samples).map(([k, v]) => [k, { ...stats(v), samples: v }]));
    const med = (k: string): number => result[k]!.median;
    const ratios = {
      'layerd pull (durable) / skopeo copy': med('layerd pull (durable)') / med('skopeo copy docker:// → oci:'),
      'layerd pull (no fsync) / skopeo copy': med('layerd pull (no fsync)') / med('skopeo copy docker:// → oci:'),
      'layerd pull (durable) / (skopeo copy + layerd import)': med('layerd pull (durable)') / med('skopeo copy, then layerd import (durable)'),
    };
    const lines = [
      `# Pull of debian-multi:latest from a loopback docker-registry (${(COMPRESSED_BYTES / 1e6).toFixed(0)} MB of layers), ${reps} repetitions, ${new Date().toISOString()}`,
      '',
      '| case | median ms | min–max ms | MB/s (compressed) |',
      '|---|---|---|---|',
      ...Object.entries(result).map(([k, s]) => `| ${k} | ${s.median.toFixed(0)} | ${s.min.toFixed(0)}–${s.max.toFixed(0)} | ${(COMPRESSED_BYTES / 1e6 / (s.median / 1000)).toFixed(0)} |`),
      '',
      '| ratio (time of layerd / time of skopeo; goal ≤ 1.0) | value |',
      '|---|---|',
      ...Object.entries(ratios).map(([k, v]) => `| ${k} | ${v.toFixed(2)} |`),
      '',
    ];
    await writeResults('pull', lines, { reps, result, ratios });
  } finally {
    await registry.stop();
    await rm(work, { recursive: true, force: true });
  }
}

await main();
