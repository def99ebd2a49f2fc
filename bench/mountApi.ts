/**
 * Mount until ready, the way container runtimes ask for it: `POST
 * /v1/containers` to a running daemon, timed at the client until the answer
 * (the daemon answers once the mount serves). debian-multi, one container
 * after another, each with its own empty upper:
 *  - "first": the image's first mount (the daemon binds its spare mount host
 *    to the image: layer indexes loaded, layers merged);
 *  - "next": every later one (a host that already serves the image).
 * The peers have no daemon: their row in bench/mount.ts ("mount until
 * ready") is the process they start per mount.
 *
 *   node dist/bench/mountApi.js [--count 30] [--rounds 3]     (root)
 *
 * Each round starts a fresh daemon on a fresh store. Writes
 * bench/results/mount-api-<timestamp>.{md,json}.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { socketBackend } from '../cli/socketBackend.js';
import { sleep } from '../common/process.js';
import { clearMountsUnder } from './mounts.js';
import { argOf, CORPUS, REPO, stats, time, writeResults } from './report.js';


interface Round { first: number; next: number[] }

async function round(count: number): Promise<Round> {
  const work = await mkdtemp(join(tmpdir(), 'layerd-bench-api-'));
  const socket = join(work, 'layerd.sock');
  const daemon = spawn(join(REPO, 'bin', 'layerd'), ['--root', join(work, 'root'), '--socket', socket, '--mount-root', join(work, 'mounts')], { stdio: 'ignore' });
  const exited = new Promise<void>((done) => daemon.once('exit', () => done()));
  const api = socketBackend(socket);
  const containers = api.containers!;
  const ids: string[] = [];
  try {
    for (let tries = 0; ; tries++) {
      try { await containers.health(); break; } catch (err) {
        if (tries > 200) throw err;
        await sleep(100);
      }
    }
    await api.importPath({ path: join(CORPUS, 'oci', 'debian-multi') });
    await sleep(3000); // the spare host is started and idle, as on a running machine
    const samples: number[] = [];
    for (let i = 0; i < count; i++) {
      const id = `bench-${i}`;
      samples.push(await time(() => containers.create({ image: 'debian-multi:latest', id })));
      ids.push(id);
      await sleep(50); // one after another, not back to back: what a runtime starting containers does
    }
    return { first: samples[0]!, next: samples.slice(1) };
  } finally {
    for (const id of ids) await containers.remove(id, false).catch(() => undefined);
    daemon.kill('SIGTERM');
    await exited;
    await clearMountsUnder(work);
    await rm(work, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('run as root (FUSE mounts with allow_other)');
  const count = Number(argOf('--count', '30'));
  const rounds = Number(argOf('--rounds', '3'));
  const load0 = loadavg()[0]!;
  const results: Round[] = [];
  for (let r = 0; r < rounds; r++) results.push(await round(count));
  const firsts = stats(results.map((r) => r.first));
  const next = results.flatMap((r) => r.next).sort((a, b) => a - b);
  const pct = (p: number): number => next[Math.min(next.length - 1, Math.floor(p * next.length))]!;
  const f = (ms: number): string => ms.toFixed(0);
  const md = [
    `# Mount until ready through the daemon (POST /v1/containers), debian-multi, ${rounds} rounds × ${count} containers, ${new Date().toISOString()}`,
    '',
    '| | median ms | min–max ms | p90 ms | under 100 ms |',
    '|---|---|---|---|---|',
    `| first mount of the image (spare host bound) | ${f(firsts.median)} | ${f(firsts.min)}–${f(firsts.max)} | – | ${results.filter((r) => r.first < 100).length}/${rounds} |`,
    `| later mounts (host serves the image) | ${f(pct(0.5))} | ${f(next[0]!)}–${f(next.at(-1)!)} | ${f(pct(0.9))} | ${next.filter((ms) => ms < 100).length}/${next.length} |`,
    '',
    `Load average (1 min) at start ${load0.toFixed(2)}, at end ${loadavg()[0]!.toFixed(2)} on ${cpus().length} CPUs.`,
    '',
  ];
  await writeResults('mount-api', md, { rounds: results, load: [load0, loadavg()[0]] });
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exitCode = 1;
});
