/**
 * Background prefetch of lazily pulled eStargz layers (storage/lazy/lazyLayer.ts),
 * from a real registry (docker-registry 2.8.2 on 127.0.0.1) through a relay that
 * counts range requests and can corrupt their answers.
 *
 * The image has two layers made by test/support/estargz.ts (64 KiB chunks):
 *  - a layer laid out as `ctr-remote image optimize` lays one out: the files a
 *    workload read (`hot/`), then `.prefetch.landmark`, then the rest (`cold/`);
 *  - a layer of many small files in one directory (`lib/`), no landmark.
 *
 * Observable: the landmark's prefix arrives with no read asking for it (reading
 * it afterwards makes no range request), a program reading `lib/` file after
 * file makes its own range request (a stall) about once instead of once per
 * synchronous read-ahead, and a prefetch answered with wrong bytes is never served.
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import tarStream from 'tar-stream';
import { execFileAsync, scratch } from './support/env.js';
import { writeEstargzLayout } from './support/estargz.js';
import { waitFor } from './support/daemon.js';
import { lazyStats } from './support/treeSample.js';
import { TestRegistry, layerctlR, startProxy, type TestProxy } from './support/registry.js';
import { startLayerdServer, stopLayerdServer } from './fixtures/mount/harness.js';

const HOT = Array.from({ length: 24 }, (_, i) => ({ path: `hot/h-${String(i).padStart(2, '0')}`, bytes: randomBytes(40 * 1024) }));
const COLD = Array.from({ length: 8 }, (_, i) => ({ path: `cold/c-${i}`, bytes: randomBytes(256 * 1024) }));
const LIB = Array.from({ length: 120 }, (_, i) => ({ path: `lib/m-${String(i).padStart(3, '0')}`, bytes: randomBytes(20 * 1024) }));
const MTIME = new Date(1_700_000_000_000);

async function tarOf(dirs: string[], files: { path: string; bytes: Buffer }[]): Promise<Buffer> {
  const pack = tarStream.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c: Buffer) => chunks.push(c));
  const done = new Promise<void>((resolve, reject) => { pack.on('end', resolve); pack.on('error', reject); });
  for (const name of dirs) pack.entry({ name: `${name}/`, type: 'directory', mode: 0o755, mtime: MTIME });
  for (const f of files) pack.entry({ name: f.path, type: 'file', mode: 0o644, mtime: MTIME }, f.bytes);
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

describe('lazy pull: background prefetch (landmark, read-ahead)', function () {
  this.timeout(240_000);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let proxy: TestProxy;
  let ranges = 0;
  let corrupt = false;
  const servers: { child: ChildProcess; mnt: string }[] = [];

  async function pullAndMount(name: string, env: NodeJS.ProcessEnv = {}, beforeMount: () => void = () => undefined): Promise<{ root: string; mnt: string }> {
    const root = join(work.dir, name);
    const r = await layerctlR(['--root', root, 'pull', '--lazy', `${proxy.host}/lazy/prefetch:v1`, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    expect((JSON.parse(r.stdout) as { lazyLayers: string[] }).lazyLayers).to.have.length(2);
    beforeMount();
    const mnt = join(work.dir, `mnt-${name}`);
    const upper = join(work.dir, `upper-${name}`);
    await mkdir(mnt, { recursive: true });
    await mkdir(upper, { recursive: true });
    const child = await startLayerdServer(['--root', root, '--image', `${proxy.host}/lazy/prefetch:v1`, '--upper', upper], mnt, { ...process.env, ...env });
    servers.push({ child, mnt });
    return { root, mnt };
  }

  before(async () => {
    work = await scratch('layerd-lazy-prefetch-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    const landmark = { path: '.prefetch.landmark', bytes: Buffer.from([0x0f]) };
    const tars = [await tarOf(['hot', 'cold'], [...HOT, landmark, ...COLD]), await tarOf(['lib'], LIB)];
    const layout = join(work.dir, 'layout');
    await writeEstargzLayout(layout, tars, 64 * 1024);
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', `oci:${layout}:latest`, `docker://${registry.host}/lazy/prefetch:v1`]);
    const bogus = gzipSync(Buffer.alloc(1024 * 1024));
    proxy = await startProxy(registry.host, {
      intercept: (req) => {
        if (req.headers.range !== undefined && req.url?.includes('/blobs/')) ranges++;
        return false;
      },
      // A well-formed gzip stream of other bytes: only the chunk digests can tell.
      mapChunk: (req, chunk, offset) => {
        if (!corrupt || req.headers.range === undefined || !req.url?.includes('/blobs/')) return chunk;
        const bad = Buffer.alloc(chunk.length);
        bogus.copy(bad, 0, Math.min(offset, bogus.length), Math.min(offset + chunk.length, bogus.length));
        return bad;
      },
    });
  });

  after(async () => {
    for (const s of servers.reverse()) await stopLayerdServer(s.child, s.mnt).catch(() => undefined);
    await proxy?.close();
    await registry?.stop();
    await work?.remove();
  });

  it('fetches the files before .prefetch.landmark as soon as the layer is mounted: reading them then makes no range request', async () => {
    const { root, mnt } = await pullAndMount('landmark');
    await waitFor('the prefetch of the landmark\'s prefix', async () => (await lazyStats(root)).prefetchedChunks! >= HOT.length, 60_000);
    const before = ranges;
    for (const f of HOT) expect((await readFile(join(mnt, f.path))).equals(f.bytes), f.path).to.equal(true);
    expect(ranges - before, 'range requests for the prefetched files').to.equal(0);
    // What follows the landmark is not prefetched: reading it asks the registry.
    expect((await readFile(join(mnt, COLD[0]!.path))).equals(COLD[0]!.bytes)).to.equal(true);
    expect(ranges - before).to.be.greaterThan(0);
  });

  it('reads ahead in the background: a program reading a directory file after file makes its own range request (a stall) at most twice', async () => {
    const { root, mnt } = await pullAndMount('readahead');
    for (const f of LIB) expect((await readFile(join(mnt, f.path))).equals(f.bytes), f.path).to.equal(true);
    const readEnd = Date.now();
    // The serving process writes its counters at most 1 s after a change: wait for a write after the last read.
    await waitFor('the counters after the reads', async () => {
      const written = await stat(join(root, 'lazy', 'stats')).then(async (d) => d.isDirectory() && (await readdir(join(root, 'lazy', 'stats'))).length > 0, () => false);
      return written && Date.now() > readEnd + 2_000;
    }, 30_000);
    const stats = await lazyStats(root);
    // 120 files of 20 KiB: a synchronous read-ahead of 512 KiB alone stalls five times.
    expect(stats.stalls, 'reads that waited for their own range request').to.be.at.most(2);
    expect(stats.prefetchRequests, 'background requests').to.be.greaterThan(0);
  });

  it('never serves a prefetched chunk that does not verify: wrong answers are dropped and the read fetches the bytes itself', async () => {
    let root = '';
    let mnt = '';
    try {
      // Wrong answers from the mount on (the pull's TOC reads are honest).
      ({ root, mnt } = await pullAndMount('corrupt-prefetch', { LAYERD_LAZY_READ_TIMEOUT_MS: '5000' }, () => { corrupt = true; }));
      await waitFor('the landmark prefetch to be answered', async () => (await lazyStats(root)).prefetchRequests! >= 1, 60_000);
      // A read of a hot file while every answer is wrong: EIO, never the bogus bytes.
      let error: NodeJS.ErrnoException | undefined;
      try {
        await readFile(join(mnt, HOT[0]!.path));
      } catch (err) {
        error = err as NodeJS.ErrnoException;
      }
      expect(error?.code).to.equal('EIO');
      expect((await lazyStats(root)).prefetchedChunks).to.equal(0);
    } finally {
      corrupt = false;
    }
    const before = ranges;
    for (const f of HOT) expect((await readFile(join(mnt, f.path))).equals(f.bytes), f.path).to.equal(true);
    expect(ranges - before, 'the hot files fetched again').to.be.greaterThan(0);
  });
});
