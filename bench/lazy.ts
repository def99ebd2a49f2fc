/**
 * Lazy pull (issue 16): time from "image not in the store" to the first
 * output of a command in a container, for an image of which the command
 * reads a small part (bench/lazyImage.ts: debian-multi's first three real
 * layers plus 256 MiB of incompressible files it never reads), once as eStargz
 * and once as unmodified gzip layers with a gzip index (`layerctl index`), fetched through
 * a relay on 127.0.0.1 that throttles every answer to one shared ~25 MB/s
 * link (bench/throttledRelay.ts) in front of a loopback docker-registry.
 * Interleaved, the order alternating, in one run:
 *
 *  - lazy:  `layerctl pull --lazy` + `layerctl create` + the command in a chroot of the mount;
 *  - full:  `layerctl pull` + `layerctl create` + the same;
 *  - containerd: `ctr images pull` (overlayfs snapshotter, unpacks) + `ctr run` of the same
 *    command, on a private containerd (test/support/containerd.ts), if it can be started
 *    (the eStargz image only: it pulls either form alike).
 *
 * Each layerd repetition runs a fresh daemon on a fresh root. Also measured:
 * bytes fetched before the first output (the relay's count of chunk range
 * answers, the daemon's layerd_lazy_fetched_bytes_total once the mount host
 * wrote it, and everything the relay sent, the background fill included) as a
 * share of the image's compressed layers, and the background fill's duration
 * (lazy pull returned → every layer complete) next to the full pull's.
 *
 *   node dist/bench/lazy.js [--reps N] [--rate MB/s] [--chunk-size BYTES] [--images estargz,gzip] [--no-containerd]
 *
 * Writes bench/results/lazy-<timestamp>.{md,json}. Needs root, FUSE,
 * docker-registry and skopeo; containerd and runc for the third column.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { argOf, stats, writeResults } from './report.js';
import { fuseWakeHereForRun } from './wakeHere.js';
import { type LazyImage, type LazyImageFormat, lazyBenchImage } from './lazyImage.js';
import { type RelayCounters, type ThrottledRelay, startThrottledRelay } from './throttledRelay.js';
import { ContainerdEnv, missingTools, ok } from '../test/support/containerd.js';
import { http, startDaemon, waitFor, type RunningDaemon } from '../test/support/daemon.js';
import { execFileAsync, layerctl } from '../test/support/env.js';
import { TestRegistry } from '../test/support/registry.js';

/** Reads the interpreter, its libraries and a few dozen stdlib modules: a few MB of the image. */
const COMMAND = ['/usr/bin/python3', '-c', 'import argparse, email.parser, logging, subprocess, pathlib, hashlib, random, datetime; print(42)'];
const EXPECTED = '42';
const TARGETS = { lazyVsFull: 0.2, bytesBeforeFirst: 0.15, fillVsFull: 1.2 } as const;
const VARIANTS = ['lazy', 'full', 'containerd'] as const;
type Variant = (typeof VARIANTS)[number];

interface Sample {
  /** ms from the start to the first byte of the command's output. */
  firstOutput: number;
  /** ms the pull itself took (lazy: until `pull --lazy` returned). */
  pull: number;
  /** Relay counters at the first output, since the start. */
  atFirst: RelayCounters;
  /** Lazy only: the mount host's fetched bytes as the daemon's metrics say (after the command exited). */
  metricFetched?: number;
  /** Lazy only: ms from `pull --lazy` returning to every layer complete. */
  fill?: number;
}

function diff(a: RelayCounters, b: RelayCounters): RelayCounters {
  return { bytes: a.bytes - b.bytes, rangeBytes: a.rangeBytes - b.rangeBytes, rangeRequests: a.rangeRequests - b.rangeRequests };
}

/**
 * Run a command; resolves once it exited with the time (performance.now())
 * of its first stdout byte and the relay counters then. Killed by PID after `timeoutMs`.
 */
function runToFirstOutput(command: string, args: string[], relay: ThrottledRelay, timeoutMs = 600_000): Promise<{ at: number; counters: RelayCounters }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let first: { at: number; counters: RelayCounters } | undefined;
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => {
      first ??= { at: performance.now(), counters: { ...relay.counters } };
      stdout += d.toString();
    });
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    const timer = setTimeout(() => { if (child.pid !== undefined) process.kill(child.pid, 'SIGKILL'); }, timeoutMs);
    child.on('error', (err) => { clearTimeout(timer); reject(err); });
    child.on('close', (code) => {
      clearTimeout(timer);
      if (code !== 0 || stdout.trim() !== EXPECTED || !first) reject(new Error(`${command} ${args.join(' ')}: exit ${code}, stdout ${JSON.stringify(stdout)}, stderr ${stderr.trim()}`));
      else resolve(first);
    });
  });
}

async function layerctlOk(args: string[], daemon: RunningDaemon): Promise<string> {
  const r = await layerctl(args, { LAYERD_SOCKET: daemon.socket });
  if (r.code !== 0) throw new Error(`layerctl ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}

async function metric(daemon: RunningDaemon, name: string): Promise<number> {
  const text = (await http(daemon.socket, 'GET', '/metrics')).body;
  return Number(new RegExp(`^${name} (\\d+)$`, 'm').exec(text)?.[1] ?? NaN);
}

async function layerStates(daemon: RunningDaemon, ref: string): Promise<string[]> {
  const r = await http(daemon.socket, 'GET', `/v1/images/${encodeURIComponent(ref)}`);
  if (r.status !== 200) throw new Error(`inspect ${ref}: ${r.status} ${r.body}`);
  return r.json<{ Layers: { state: string }[] }>().Layers.map((l) => l.state);
}

/** One layerd repetition (lazy or full) on a fresh daemon and root. */
async function layerdOnce(lazy: boolean, dir: string, ref: string, relay: ThrottledRelay): Promise<Sample> {
  const daemon = await startDaemon(dir);
  let container: string | undefined;
  try {
    const start = { at: performance.now(), counters: { ...relay.counters } };
    await layerctlOk(['pull', ...(lazy ? ['--lazy'] : []), ref, '--json'], daemon);
    const pulled = { at: performance.now(), counters: { ...relay.counters } };
    const created = JSON.parse(await layerctlOk(['create', ref, '--name', 'bench', '--json'], daemon)) as { mountpoint: string };
    container = 'bench';
    const first = await runToFirstOutput('chroot', [created.mountpoint, ...COMMAND], relay);
    const exited = { ...relay.counters };
    const sample: Sample = { firstOutput: first.at - start.at, pull: pulled.at - start.at, atFirst: diff(first.counters, start.counters) };
    if (lazy) {
      // The mount host writes its counters at most once a second: wait until they cover its range answers.
      const mountHostBytes = diff(exited, pulled.counters).rangeBytes;
      await waitFor('the mount host\'s lazy metrics', async () => (await metric(daemon, 'layerd_lazy_fetched_bytes_total')) >= mountHostBytes, 20_000, 100);
      sample.metricFetched = await metric(daemon, 'layerd_lazy_fetched_bytes_total');
      await waitFor('every layer complete', async () => (await layerStates(daemon, ref)).every((s) => s === 'complete'), 600_000, 100);
      sample.fill = performance.now() - pulled.at;
    }
    return sample;
  } finally {
    if (container) await layerctl(['rm', container], { LAYERD_SOCKET: daemon.socket }).catch(() => undefined);
    await daemon.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

/** One containerd repetition in a fresh containerd namespace, collected afterwards. */
async function containerdOnce(env: ContainerdEnv, namespace: string, ref: string, relay: ThrottledRelay): Promise<Sample> {
  const ctr = (...args: string[]): Promise<string> => env.ctrOk(args, { namespace, timeoutMs: 600_000 });
  try {
    const start = { at: performance.now(), counters: { ...relay.counters } };
    await ctr('images', 'pull', '--plain-http', '--snapshotter', 'overlayfs', ref);
    const pulled = performance.now();
    const first = await runToFirstOutput('nsenter', ['-t', String(env.holderPid), '-m', '--', 'ctr', '-a', env.containerdSocket, '-n', namespace,
      'run', '--rm', '--snapshotter', 'overlayfs', ref, 'bench', ...COMMAND], relay);
    return { firstOutput: first.at - start.at, pull: pulled - start.at, atFirst: diff(first.counters, start.counters) };
  } finally {
    await ctr('images', 'rm', ref).catch(() => undefined);
    await ctr('leases', 'create', '--id', 'gc').catch(() => undefined);
    await ctr('leases', 'rm', '--sync', 'gc').catch(() => undefined);
  }
}

interface BenchImage {
  format: LazyImageFormat;
  image: LazyImage;
  /** Through the relay. */
  ref: string;
  variants: Variant[];
  /** The gzip image: how long `layerctl index` took (straight to the registry, not through the relay). */
  indexMs?: number;
}

async function main(): Promise<void> {
  const reps = Number(argOf('--reps', '3'));
  const rate = Number(argOf('--rate', '25')) * 1e6;
  const chunkSize = Number(argOf('--chunk-size', String(4 * 1024 * 1024)));
  const formats = argOf('--images', 'estargz,gzip').split(',').filter((f): f is LazyImageFormat => f === 'estargz' || f === 'gzip');
  if (formats.length === 0) throw new Error('--images: estargz, gzip or both (comma-separated)');
  const wakeHere = await fuseWakeHereForRun();
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-lazy-'));
  let registry: TestRegistry | undefined;
  let relay: ThrottledRelay | undefined;
  let containerd: ContainerdEnv | undefined;
  let containerdNote = '';
  try {
    registry = await TestRegistry.start(join(work, 'registry'));
    relay = await startThrottledRelay(registry.host, rate);
    const images: BenchImage[] = [];
    for (const format of formats) {
      const image = await lazyBenchImage(chunkSize, format);
      const tag = format === 'estargz' ? 'v1' : 'gzip';
      await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests',
        `oci:${image.layout}:latest`, `docker://${registry.host}/bench/lazy:${tag}`]);
      const bench: BenchImage = { format, image, ref: `${relay.host}/bench/lazy:${tag}`, variants: format === 'estargz' ? [...VARIANTS] : ['lazy', 'full'] };
      if (format === 'gzip') {
        // The publisher's one-time step: the image's gzip index, as an artifact next to it.
        const t0 = performance.now();
        const indexed = await layerctl(['index', `${registry.host}/bench/lazy:${tag}`]);
        if (indexed.code !== 0) throw new Error(`layerctl index failed (${indexed.code}): ${indexed.stderr}`);
        bench.indexMs = performance.now() - t0;
      }
      images.push(bench);
    }

    const wantsContainerd = images.some((i) => i.variants.includes('containerd'));
    const missing = !wantsContainerd ? 'left out (no eStargz image)' : process.argv.includes('--no-containerd') ? 'left out (--no-containerd)' : missingTools();
    if (missing === undefined) {
      try {
        containerd = new ContainerdEnv(join(work, 'containerd'), { namespace: 'bench-lazy' });
        await containerd.start();
        const plugins = ok('ctr plugins ls', await containerd.ctr(['plugins', 'ls']));
        if (!/io\.containerd\.snapshotter\.v1\s+overlayfs\s+\S+\s+ok/.test(plugins)) throw new Error('containerd\'s overlayfs snapshotter is not usable here');
      } catch (err) {
        containerdNote = `containerd could not be started: ${String(err)}`;
        await containerd?.stop().catch(() => undefined);
        containerd = undefined;
      }
    } else containerdNote = `containerd: ${missing}`;
    if (containerdNote) console.warn(containerdNote);
    for (const i of images) i.variants = i.variants.filter((v) => v !== 'containerd' || containerd !== undefined);

    let n = 0;
    const once = (v: Variant, ref: string): Promise<Sample> => {
      n++;
      if (v === 'containerd') return containerdOnce(containerd!, `bench-lazy-${n}`, ref, relay!);
      return layerdOnce(v === 'lazy', join(work, `layerd-${n}`), ref, relay!);
    };
    const load = loadavg()[0]!;
    // Warm-up: the registry's and the page cache, a mount host and a container of each kind.
    for (const i of images) for (const v of i.variants) await once(v, i.ref);
    const samples = new Map(images.map((i) => [i.format, Object.fromEntries(i.variants.map((v) => [v, [] as Sample[]])) as Partial<Record<Variant, Sample[]>>]));
    // Interleaved: each repetition runs every variant of every image, the order alternating.
    for (let r = 0; r < reps; r++) {
      const runs = images.flatMap((i) => i.variants.map((v) => ({ i, v })));
      for (const { i, v } of r % 2 === 0 ? runs : runs.reverse()) {
        const s = await once(v, i.ref);
        samples.get(i.format)![v]!.push(s);
        console.warn(`rep ${r + 1} ${i.format} ${v}: first output ${s.firstOutput.toFixed(0)} ms`);
      }
    }
    const loadAfter = loadavg()[0]!;

    const lines = [
      `# Lazy pull: image not in the store → first output, through a ${rate / 1e6} MB/s relay, ${reps} repetitions, ${new Date().toISOString()}`,
      '',
      `Load average (1 min) ${load.toFixed(2)} before, ${loadAfter.toFixed(2)} after. Command: \`${COMMAND.join(' ')}\`.${containerdNote ? ` ${containerdNote}.` : ''}`,
      wakeHere.note,
      '',
    ];
    const ratios: Record<string, Record<string, number>> = {};
    for (const i of images) {
      const report = reportImage(i, samples.get(i.format)!, chunkSize);
      lines.push(...report.lines);
      ratios[i.format] = report.ratios;
    }
    await writeResults('lazy', lines, {
      reps, rate, chunkSize, load, loadAfter, command: COMMAND, containerdNote, targets: TARGETS, ratios,
      images: images.map((i) => ({ format: i.format, image: i.image, indexMs: i.indexMs, samples: samples.get(i.format) })),
    });
  } finally {
    await containerd?.stop().catch((err: unknown) => console.error(`cleanup: ${String(err)}`));
    await relay?.close();
    await registry?.stop();
    await rm(work, { recursive: true, force: true });
    await wakeHere.restore();
  }
}

/** The tables of one image's variants, and the ratios judged against the targets. */
function reportImage(bench: BenchImage, samples: Partial<Record<Variant, Sample[]>>, chunkSize: number): { lines: string[]; ratios: Record<string, number> } {
  const { image, variants } = bench;
  const med = (v: Variant, f: (s: Sample) => number): { median: number; min: number; max: number } => stats(samples[v]!.map(f));
  const fmt = (s: { median: number; min: number; max: number }, unit = 1, digits = 0): string =>
    `${(s.median / unit).toFixed(digits)} (${(s.min / unit).toFixed(digits)}–${(s.max / unit).toFixed(digits)})`;
  const pct = (bytes: number): string => `${((100 * bytes) / image.layerBytes).toFixed(1)} %`;
  const lazyFirst = med('lazy', (s) => s.firstOutput);
  const fullFirst = med('full', (s) => s.firstOutput);
  const fullPull = med('full', (s) => s.pull);
  const lazyRange = med('lazy', (s) => s.atFirst.rangeBytes);
  const lazyRequests = med('lazy', (s) => s.atFirst.rangeRequests);
  const lazyAll = med('lazy', (s) => s.atFirst.bytes);
  const lazyMetric = med('lazy', (s) => s.metricFetched ?? NaN);
  const fill = med('lazy', (s) => s.fill ?? NaN);
  const ratios: Record<string, number> = {
    lazyVsFull: lazyFirst.median / fullFirst.median,
    bytesBeforeFirst: lazyRange.median / image.layerBytes,
    fillVsFull: fill.median / fullPull.median,
    ...(variants.includes('containerd') ? { lazyVsContainerd: lazyFirst.median / med('containerd', (s) => s.firstOutput).median } : {}),
  };
  const verdict = (v: number, t: number): string => `${v.toFixed(2)} (target ≤ ${t}: ${v <= t ? 'met' : 'NOT met'})`;
  const kind = bench.format === 'estargz'
    ? `eStargz image (${chunkSize / 1024} KiB chunks)`
    : `unmodified gzip image (gzip index published by \`layerctl index\` in ${((bench.indexMs ?? NaN) / 1000).toFixed(1)} s)`;
  return {
    ratios,
    lines: [
      `## ${(image.layerBytes / 1e6).toFixed(0)} MB ${kind}, ${image.layers} layers`,
      '',
      '| ms, median (min–max) | first output | of which the pull | relay bytes before first output (all) | chunk range bytes before first output |',
      '|---|---|---|---|---|',
      ...variants.map((v) => `| ${v} | ${fmt(med(v, (s) => s.firstOutput))} | ${fmt(med(v, (s) => s.pull))} | ${pct(med(v, (s) => s.atFirst.bytes).median)} | ${pct(med(v, (s) => s.atFirst.rangeBytes).median)} |`),
      '',
      '| lazy | value |',
      '|---|---|',
      `| first output lazy / full | ${verdict(ratios['lazyVsFull']!, TARGETS.lazyVsFull)} |`,
      ...(ratios['lazyVsContainerd'] !== undefined ? [`| first output lazy / containerd + overlayfs | ${ratios['lazyVsContainerd'].toFixed(2)} |`] : []),
      `| chunk bytes fetched before first output (relay), share of the image | ${verdict(ratios['bytesBeforeFirst']!, TARGETS.bytesBeforeFirst)} — ${fmt(lazyRange, 1e6, 1)} MB in ${fmt(lazyRequests)} range requests |`,
      `| layerd_lazy_fetched_bytes_total after the command (MB) | ${fmt(lazyMetric, 1e6, 1)} (${pct(lazyMetric.median)}) |`,
      `| everything the relay sent before first output (TOCs, chunks, the fill's stream) | ${fmt(lazyAll, 1e6, 1)} MB (${pct(lazyAll.median)}) |`,
      `| background fill (pull --lazy returned → all layers complete) / full pull | ${verdict(ratios['fillVsFull']!, TARGETS.fillVsFull)} — fill ${fmt(fill)} ms, full pull ${fmt(fullPull)} ms |`,
      '',
    ],
  };
}

await main();
