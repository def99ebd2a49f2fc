/**
 * `layerctl pull --lazy` of eStargz images from a real registry (Debian's
 * docker-registry 2.8.2 on 127.0.0.1): debian-multi's four layers made into
 * eStargz by test/support/estargz.ts (64 KiB chunks), pushed with skopeo.
 *
 * Lazily read bytes are compared with a full pull of the same image mounted
 * beside it; a relay on 127.0.0.1 that corrupts range answers gives EIO and
 * never wrong bytes; a registry that is gone gives EIO within the configured
 * bound, leaves the mount serving, and reads work again once it is back; the
 * daemon's background fill turns the layers into ordinary stored ones (fsck,
 * the same diffIDs and sizes as a full pull), resuming when it starts and when
 * the registry returns.
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { type IncomingMessage, type ServerResponse, createServer, request as httpRequest } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { mkdir, readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { DEBIAN_MULTI, execFileAsync, layerctl, layerctlJson, scratch } from './support/env.js';
import { lazyAllocated, prng, readRange, walk } from './support/treeSample.js';
import { writeEstargzLayout } from './support/estargz.js';
import { http, startDaemon, waitFor, type RunningDaemon } from './support/daemon.js';
import { TestRegistry, layerctlR, startProxy, type TestProxy } from './support/registry.js';
import { startLayerdServer, stopLayerdServer } from './fixtures/mount/harness.js';

const BOGUS_MEMBER = gzipSync(Buffer.alloc(4 * 1024 * 1024));

interface LazyPulled { images: { id: string; refs: string[] }[]; lazyLayers: string[]; fallback?: string }
interface InspectLayer { diffId: string; digest: string | null; uncompressedSize: number; entries: number; state: string; filled?: number }
interface Inspect { Id: string; Layers: InspectLayer[] }

describe('lazy pull of eStargz images (docker-registry 2.8.2)', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let ref: string;
  let fullRoot: string;
  let fullInspect: Inspect;
  const fullMnt = (): string => join(work.dir, 'mnt-full');
  const servers: { child: ChildProcess; mnt: string }[] = [];
  let fullTree: Awaited<ReturnType<typeof walk>>;

  async function mountImage(root: string, image: string, name: string, env: NodeJS.ProcessEnv = {}): Promise<string> {
    const mnt = join(work.dir, `mnt-${name}`);
    const upper = join(work.dir, `upper-${name}`);
    await mkdir(mnt, { recursive: true });
    await mkdir(upper, { recursive: true });
    const child = await startLayerdServer(['--root', root, '--image', image, '--upper', upper], mnt, { ...process.env, ...env });
    servers.push({ child, mnt });
    return mnt;
  }

  async function lazyPull(root: string, reference: string): Promise<LazyPulled> {
    const r = await layerctlR(['--root', root, 'pull', '--lazy', reference, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    return JSON.parse(r.stdout) as LazyPulled;
  }

  before(async () => {
    work = await scratch('layerd-lazy-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    // debian-multi's layer tars, as a store keeps them, made into eStargz.
    const src = join(work.dir, 'src');
    await layerctlJson(['--root', src, 'import', DEBIAN_MULTI]);
    const info = await layerctlJson<{ RootFS: { Layers: string[] } }>(['--root', src, 'inspect', 'debian-multi:latest']);
    const tars = await Promise.all(info.RootFS.Layers.map((d) => readFile(join(src, 'layers', 'sha256', d.slice(7), 'layer.tar'))));
    const layout = join(work.dir, 'estargz-layout');
    await writeEstargzLayout(layout, tars, 64 * 1024);
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', `oci:${layout}:latest`, `docker://${registry.host}/lazy/dm:v1`]);
    ref = `${registry.host}/lazy/dm:v1`;
    // The full pull everything lazy is compared with.
    fullRoot = join(work.dir, 'full');
    const pulled = await layerctlR(['--root', fullRoot, 'pull', ref]);
    expect(pulled.code, pulled.stderr).to.equal(0);
    fullInspect = await layerctlJson<Inspect>(['--root', fullRoot, 'inspect', ref]);
    await mountImage(fullRoot, ref, 'full');
    fullTree = await walk(fullMnt());
  });

  after(async () => {
    for (const s of servers.reverse()) await stopLayerdServer(s.child, s.mnt).catch(() => undefined);
    await registry?.stop();
    await work?.remove();
  });

  it('records the image from the TOCs alone, mounts it at once, and serves the full pull\'s bytes', async () => {
    const root = join(work.dir, 'lazy-read');
    const pulled = await lazyPull(root, ref);
    expect(pulled.fallback).to.equal(undefined);
    expect(pulled.lazyLayers).to.have.length(4);
    const info = await layerctlJson<Inspect>(['--root', root, 'inspect', ref]);
    expect(info.Id).to.equal(fullInspect.Id);
    expect(info.Layers.map((l) => l.state)).to.deep.equal(['lazy', 'lazy', 'lazy', 'lazy']);
    expect(info.Layers.map((l) => l.diffId)).to.deep.equal(fullInspect.Layers.map((l) => l.diffId));
    const fsck = await layerctl(['--root', root, 'fsck']);
    expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    const before = await lazyAllocated(root);

    const mnt = await mountImage(root, ref, 'lazy-read');
    const tree = await walk(mnt);
    expect(tree.listing).to.deep.equal(fullTree.listing);
    const random = prng(16);
    for (let i = 0; i < 40; i++) {
      const f = fullTree.files[Math.floor(random() * fullTree.files.length)]!;
      if (i % 2 === 0) {
        expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMnt(), f.path))), `/${f.path}`).to.equal(true);
      } else {
        const at = Math.floor(random() * f.size);
        const length = 1 + Math.floor(random() * Math.min(256 * 1024, f.size - at));
        const lazyBytes = await readRange(join(mnt, f.path), at, length);
        expect(lazyBytes.equals(await readRange(join(fullMnt(), f.path), at, length)), `/${f.path} [${at}, +${length})`).to.equal(true);
      }
    }
    // What needs the whole layer refuses while it is lazy, saying so.
    const push = await layerctlR(['--root', root, 'push', ref, `${registry.host}/lazy/copy:v1`]);
    expect(push.code, push.stderr).to.equal(4);
    expect(push.stderr).to.match(/pulled lazily and is not complete yet \(lazy\)/);
    // Only what was read was fetched: far less than the layers' file bytes.
    const fetched = await lazyAllocated(root) - before;
    const total = fullTree.files.reduce((n, f) => n + f.size, 0);
    expect(fetched).to.be.greaterThan(0);
    expect(fetched).to.be.lessThan(total / 2);
  });

  it('reads ahead: the files of one directory, read one after another, come in far fewer range requests than files', async () => {
    let ranges = 0;
    const proxy = await startProxy(registry.host, {
      intercept: (req) => {
        if (req.headers.range !== undefined && req.url?.includes('/blobs/')) ranges++;
        return false;
      },
    });
    try {
      const root = join(work.dir, 'lazy-readahead');
      const pulled = await lazyPull(root, `${proxy.host}/lazy/dm:v1`);
      const mnt = await mountImage(root, pulled.images[0]!.refs[0]!, 'lazy-readahead');
      const etc = fullTree.files.filter((f) => /^etc\/[^/]+$/.test(f.path));
      expect(etc.length, 'files directly in /etc').to.be.at.least(20);
      const before = ranges;
      for (const f of etc) expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMnt(), f.path))), `/${f.path}`).to.equal(true);
      // (the background read-ahead's requests count too: a layer's first read starts up to two more, of up to 512 KiB each)
      expect(ranges - before, `range requests for ${etc.length} files`).to.be.greaterThan(0).and.lessThan(etc.length / 2);
    } finally {
      await proxy.close();
    }
  });

  it('answers EIO, never wrong bytes, when a relay serves other bytes for the chunks; serves them once the relay is honest', async () => {
    let corrupt = false;
    let corrupted = 0;
    const proxy: TestProxy = await startProxy(registry.host, {
      mapChunk: (req, chunk, offset) => {
        if (!corrupt || req.headers.range === undefined || !req.url?.includes('/blobs/')) return chunk;
        // A well-formed gzip member of other bytes (zeros): it inflates fine, only the chunk digest can tell.
        if (offset === 0) corrupted++;
        const bad = Buffer.alloc(chunk.length);
        BOGUS_MEMBER.copy(bad, 0, Math.min(offset, BOGUS_MEMBER.length), Math.min(offset + chunk.length, BOGUS_MEMBER.length));
        return bad;
      },
    });
    try {
      const root = join(work.dir, 'lazy-corrupt');
      const pulled = await lazyPull(root, `${proxy.host}/lazy/dm:v1`);
      const mnt = await mountImage(root, pulled.images[0]!.refs[0]!, 'lazy-corrupt', { LAYERD_LAZY_READ_TIMEOUT_MS: '5000' });
      corrupt = true;
      const sample = fullTree.files.filter((f) => f.size > 1000).slice(0, 5);
      for (const f of sample) {
        const before = corrupted;
        let error: NodeJS.ErrnoException | undefined;
        try {
          await readFile(join(mnt, f.path));
        } catch (err) {
          error = err as NodeJS.ErrnoException;
        }
        expect(error?.code, `/${f.path}`).to.equal('EIO');
        // Refetched once after the first bad answer, then given up.
        expect(corrupted - before).to.be.at.least(2);
      }
      corrupt = false;
      for (const f of sample) expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMnt(), f.path))), `/${f.path}`).to.equal(true);
    } finally {
      await proxy.close();
    }
  });

  it('fails a read with EIO within the bound while the registry is gone, keeps serving, and reads again once it is back', async () => {
    const root = join(work.dir, 'lazy-down');
    await lazyPull(root, ref);
    const mnt = await mountImage(root, ref, 'lazy-down', { LAYERD_LAZY_READ_TIMEOUT_MS: '3000' });
    const [a, b] = fullTree.files.filter((f) => f.size > 1000).slice(-2);
    const aBytes = await readFile(join(mnt, a!.path));
    await registry.stop();
    try {
      const started = Date.now();
      let error: NodeJS.ErrnoException | undefined;
      try {
        await readFile(join(mnt, b!.path));
      } catch (err) {
        error = err as NodeJS.ErrnoException;
      }
      const elapsed = Date.now() - started;
      expect(error?.code).to.equal('EIO');
      expect(elapsed).to.be.lessThan(3000 + 5000);
      // The mount (and its server) are alive: what was fetched is served, directories list.
      expect((await readFile(join(mnt, a!.path))).equals(aBytes)).to.equal(true);
      expect(await readdir(mnt)).to.include('etc');
    } finally {
      await registry.restart();
    }
    expect((await readFile(join(mnt, b!.path))).equals(await readFile(join(fullMnt(), b!.path)))).to.equal(true);
  });

  it('through the daemon: pull --lazy returns, a container created at once reads the bytes of the full pull, the fill completes', async () => {
    const dir = join(work.dir, 'daemon-create');
    let daemon: RunningDaemon | undefined;
    let container: string | undefined;
    try {
      daemon = await startDaemon(dir);
      const socket = { LAYERD_SOCKET: daemon.socket };
      const pulled = await layerctl(['pull', '--lazy', ref, '--json'], socket);
      expect(pulled.code, pulled.stderr).to.equal(0);
      expect((JSON.parse(pulled.stdout) as LazyPulled).lazyLayers).to.have.length(4);
      const created = await layerctl(['create', ref, '--name', 'lazy1', '--json'], socket);
      expect(created.code, created.stderr).to.equal(0);
      container = 'lazy1';
      const mnt = (JSON.parse(created.stdout) as { mountpoint: string }).mountpoint;
      const random = prng(7);
      for (let i = 0; i < 20; i++) {
        const f = fullTree.files[Math.floor(random() * fullTree.files.length)]!;
        expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMnt(), f.path))), `/${f.path}`).to.equal(true);
      }
      // The mount host's fetches show in the daemon's metrics.
      const metric = async (name: string): Promise<number> => {
        const text = (await http(daemon!.socket, 'GET', '/metrics')).body;
        return Number(new RegExp(`^${name} (\\d+)$`, 'm').exec(text)?.[1] ?? -1);
      };
      await waitFor('lazy-read metrics', async () => (await metric('layerd_lazy_range_requests_total')) > 0, 20_000, 200);
      expect(await metric('layerd_lazy_fetched_bytes_total')).to.be.greaterThan(0);
      const inspect = async (): Promise<Inspect> => JSON.parse((await layerctl(['inspect', ref], socket)).stdout) as Inspect;
      await waitFor('every layer complete', async () => (await inspect()).Layers.every((l) => l.state === 'complete'), 120_000, 250);
      // The container still serves (from the lazy layers it mounted), and new mounts use the complete layers.
      const f = fullTree.files[fullTree.files.length - 1]!;
      expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMnt(), f.path)))).to.equal(true);
      const fsck = await layerctl(['fsck'], socket);
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    } finally {
      if (container && daemon) await layerctl(['rm', container], { LAYERD_SOCKET: daemon.socket });
      await daemon?.stop();
    }
  });

  it('an offline lazy pull is not filled until `layerctl --root … fill` completes it in the foreground, as a full pull would', async () => {
    const root = join(work.dir, 'offline-fill');
    await lazyPull(root, ref);
    // Without a daemon nothing fills: still lazy after a read through a mount.
    const mnt = await mountImage(root, ref, 'offline-fill');
    const f = fullTree.files[0]!;
    expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMnt(), f.path)))).to.equal(true);
    expect((await layerctlJson<Inspect>(['--root', root, 'inspect', ref])).Layers.map((l) => l.state)).to.deep.equal(['lazy', 'lazy', 'lazy', 'lazy']);
    const filled = await layerctlR(['--root', root, 'fill', ref, '--json']);
    expect(filled.code, filled.stderr).to.equal(0);
    expect((JSON.parse(filled.stdout) as { filled: string[] }).filled).to.have.length(4);
    const info = await layerctlJson<Inspect>(['--root', root, 'inspect', ref]);
    expect(info.Layers.map(({ diffId, digest, uncompressedSize, entries, state }) => ({ diffId, digest, uncompressedSize, entries, state })))
      .to.deep.equal(fullInspect.Layers.map(({ diffId, digest, uncompressedSize, entries }) => ({ diffId, digest, uncompressedSize, entries, state: 'complete' })));
    const fsck = await layerctl(['--root', root, 'fsck']);
    expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    // The mount made while lazy goes on serving; nothing is left to fill.
    const g = fullTree.files[fullTree.files.length - 1]!;
    expect((await readFile(join(mnt, g.path))).equals(await readFile(join(fullMnt(), g.path)))).to.equal(true);
    const again = await layerctlR(['--root', root, 'fill', '--json']);
    expect(JSON.parse(again.stdout)).to.deep.equal({ filled: [], broken: [] });
  });

  it('through the daemon: the fill lets go of the link while a container\'s read waits, and resumes from where it was after', async () => {
    const dir = join(work.dir, 'daemon-yield');
    const [upHost, upPort] = registry.host.split(':') as [string, string];
    /** Whole-blob answers (the fills): paced while `slow`; their fate. Range requests: held while `holdRanges`. */
    let slow = true;
    let holdRanges = false;
    const fills: { range: string | undefined; length: number; sent: number; closedEarly: boolean; done: boolean }[] = [];
    const heldRanges: (() => void)[] = [];
    const forward = (req: IncomingMessage, res: ServerResponse, fill?: (typeof fills)[number]): void => {
      const up = httpRequest({ host: upHost, port: Number(upPort), method: req.method, path: req.url, headers: req.headers }, (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        if (!fill) { answer.pipe(res); return; }
        fill.length = Number(answer.headers['content-length'] ?? 0);
        res.on('close', () => { if (!fill.done) { fill.closedEarly = true; answer.destroy(); } });
        void (async () => {
          for await (const chunk of answer as AsyncIterable<Buffer>) {
            for (let at = 0; at < chunk.length && !res.destroyed; at += 32 * 1024) {
              const part = chunk.subarray(at, at + 32 * 1024);
              if (slow) await sleep(20);
              if (res.destroyed) return;
              fill.sent += part.length;
              res.write(part);
            }
          }
          fill.done = true;
          res.end();
        })().catch(() => res.destroy());
      });
      up.on('error', () => res.destroy());
      req.pipe(up);
    };
    const front = createServer((req, res) => {
      const blob = req.url?.includes('/blobs/') === true && req.method === 'GET';
      const whole = blob && (req.headers.range === undefined || /^bytes=\d+-$/.test(req.headers.range));
      if (blob && whole) {
        const fill = { range: req.headers.range, length: 0, sent: 0, closedEarly: false, done: false };
        fills.push(fill);
        forward(req, res, fill);
      } else if (blob && holdRanges) heldRanges.push(() => forward(req, res));
      else forward(req, res);
    });
    await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve));
    const frontRef = `127.0.0.1:${(front.address() as { port: number }).port}/lazy/dm:v1`;
    let daemon: RunningDaemon | undefined;
    let container: string | undefined;
    let reader: ChildProcess | undefined;
    try {
      daemon = await startDaemon(dir);
      const socket = { LAYERD_SOCKET: daemon.socket };
      const pulled = await layerctl(['pull', '--lazy', frontRef, '--json'], socket);
      expect(pulled.code, pulled.stderr).to.equal(0);
      await waitFor('the fills to be sending', () => fills.length > 0 && fills.some((f) => f.sent > 0), 30_000, 50);
      const farFromEnd = (x: (typeof fills)[number]): boolean => !x.done && !x.closedEarly && x.length - x.sent > 8 * 1024 * 1024;
      await waitFor('a fill far from its end (paced: seconds away)', () => fills.some(farFromEnd), 30_000, 20);
      const beforeCreate = fills.filter(farFromEnd);
      const created = await layerctl(['create', frontRef, '--name', 'yield1', '--json'], socket);
      expect(created.code, created.stderr).to.equal(0);
      container = 'yield1';
      const mnt = (JSON.parse(created.stdout) as { mountpoint: string }).mountpoint;
      // A container made on lazy layers will read them: the fills let go at once, before any read waits (the daemon
      // expects reads, the mount host opening the layers too), and go on once nothing was read for the quiet second.
      await waitFor('the fills under way to let go at the create', () => beforeCreate.every((x) => x.done || x.closedEarly), 30_000, 20);
      expect(beforeCreate.map((x) => x.closedEarly), 'each let go of its answer at the create').to.deep.equal(beforeCreate.map(() => true));
      await waitFor('the fills to go on', () => fills.some((x) => farFromEnd(x) && x.range !== undefined && x.sent > 0), 30_000, 20);

      // Reads that wait for the registry: their range requests are held. (Several files across the
      // image: one of a small layer may be complete already, and be read from disk.)
      // The fills that are far from their end (paced: seconds away) when the reads start must all let go.
      const inProgress = fills.filter((x) => !x.done && !x.closedEarly && x.length - x.sent > 8 * 1024 * 1024);
      expect(inProgress.length, 'fills under way when the reads start').to.be.greaterThan(0);
      holdRanges = true;
      const big = fullTree.files.filter((x) => x.size > 100_000);
      const sample = [0, 0.2, 0.4, 0.6, 0.8, 1].map((q) => big[Math.min(big.length - 1, Math.floor(q * big.length))]!);
      // (In a child process: reads blocked in this one would hold its libuv threads, which the test's own fs calls need.)
      const sha256sum = (root: string): Promise<string> => {
        const run = execFileAsync('sha256sum', sample.map((x) => x.path), { cwd: root });
        reader = run.child;
        return run.then((r) => r.stdout);
      };
      const reading = sha256sum(mnt);
      reading.catch(() => undefined); // (awaited below)
      await waitFor('the read\'s range request', () => heldRanges.length > 0, 30_000, 20);
      await waitFor('the fills under way to end', () => inProgress.every((x) => x.done || x.closedEarly), 60_000, 20);
      expect(inProgress.map((x) => x.closedEarly), 'each let go of its answer (none finished meanwhile)').to.deep.equal(inProgress.map(() => true));
      const wholeRequests = fills.length;
      // While the read waits, its mount host writes heartbeats; the fill asks for nothing meanwhile.
      const demandDir = join(dir, 'root', 'lazy', 'demand');
      const heartbeats = new Set<number>();
      await waitFor('four heartbeats of the waiting read', async () => {
        for (const name of await readdir(demandDir)) heartbeats.add((await stat(join(demandDir, name))).mtimeMs);
        return heartbeats.size >= 4;
      }, 30_000, 50);
      expect(fills.length, 'no fill request while the read waits').to.equal(wholeRequests);

      // The read is answered with the full pull's bytes; the fill resumes where each download was.
      slow = false;
      holdRanges = false;
      for (const go of heldRanges.splice(0)) go();
      expect(await reading).to.equal(await sha256sum(fullMnt()));
      await waitFor('a fill to resume with Range', () => fills.some((x) => x.range !== undefined && /^bytes=[1-9]\d*-$/.test(x.range)), 60_000, 50);
      const inspect = async (): Promise<Inspect> => JSON.parse((await layerctl(['inspect', frontRef], socket)).stdout) as Inspect;
      await waitFor('every layer complete', async () => (await inspect()).Layers.every((l) => l.state === 'complete'), 120_000, 250);
      expect((await inspect()).Layers.map((l) => l.diffId)).to.deep.equal(fullInspect.Layers.map((l) => l.diffId));
    } finally {
      holdRanges = false;
      for (const go of heldRanges.splice(0)) go();
      if (reader?.exitCode === null && reader.pid !== undefined) process.kill(reader.pid, 'SIGKILL');
      if (container && daemon) await layerctl(['rm', container], { LAYERD_SOCKET: daemon.socket });
      await daemon?.stop();
      front.closeAllConnections();
      await new Promise<void>((resolve) => front.close(() => resolve()));
    }
  });

  it('falls back to a full pull, and says so, for an image whose layers are no eStargz', async () => {
    const root = join(work.dir, 'lazy-fallback');
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', `oci:${DEBIAN_MULTI}:latest`, `docker://${registry.host}/plain/dm:v1`]);
    const r = await layerctlR(['--root', root, 'pull', '--lazy', `${registry.host}/plain/dm:v1`]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.match(/not eStargz .*pulled in full/);
    const info = await layerctlJson<Inspect>(['--root', root, 'inspect', `${registry.host}/plain/dm:v1`]);
    expect(info.Layers.every((l) => l.state === 'complete')).to.equal(true);
  });

  it('a daemon killed during a fill finishes it when it starts again', async () => {
    const dir = join(work.dir, 'daemon-crash');
    const root = join(dir, 'root');
    // Once the image is recorded, whole-blob downloads (the fill) are held, unanswered, until the daemon is gone; Range requests pass.
    let hold = false;
    const held: ServerResponse[] = [];
    const proxy = await startProxy(registry.host, {
      intercept: (req, res) => {
        if (!hold || req.headers.range !== undefined || !req.url?.includes('/blobs/')) return false;
        held.push(res);
        return true;
      },
    });
    let daemon: RunningDaemon | undefined;
    try {
      const reference = (await lazyPull(root, `${proxy.host}/lazy/dm:v1`)).images[0]!.refs[0]!;
      hold = true;
      daemon = await startDaemon(dir);
      const first = daemon;
      const inspect = async (d: RunningDaemon): Promise<Inspect> => JSON.parse((await layerctl(['inspect', reference], { LAYERD_SOCKET: d.socket })).stdout) as Inspect;
      await waitFor('the fills to be under way', () => held.length >= 4, 30_000, 100);
      expect((await inspect(first)).Layers.every((l) => l.state === 'filling')).to.equal(true);
      process.kill(first.pid, 'SIGKILL');
      await first.stop();
      hold = false;
      for (const res of held) res.destroy();
      daemon = await startDaemon(dir);
      const second = daemon;
      await waitFor('every layer complete', async () => (await inspect(second)).Layers.every((l) => l.state === 'complete'), 120_000, 250);
      const fsck = await layerctl(['fsck'], { LAYERD_SOCKET: second.socket });
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    } finally {
      hold = false;
      for (const res of held) res.destroy();
      await daemon?.stop();
      await proxy.close();
    }
  });

  it('marks a layer broken (inspect, fsck) when its whole blob does not verify', async () => {
    const dir = join(work.dir, 'daemon-broken');
    const root = join(dir, 'root');
    let corrupt = false;
    const proxy = await startProxy(registry.host, {
      mapChunk: (req, chunk) => {
        if (!corrupt || req.headers.range !== undefined || !req.url?.includes('/blobs/')) return chunk;
        const bad = Buffer.from(chunk);
        bad[0]! ^= 0xff;
        return bad;
      },
    });
    let daemon: RunningDaemon | undefined;
    try {
      const reference = (await lazyPull(root, `${proxy.host}/lazy/dm:v1`)).images[0]!.refs[0]!;
      corrupt = true;
      daemon = await startDaemon(dir);
      const socket = { LAYERD_SOCKET: daemon.socket };
      const inspect = async (): Promise<Inspect> => JSON.parse((await layerctl(['inspect', reference], socket)).stdout) as Inspect;
      await waitFor('the layers to be marked broken', async () => (await inspect()).Layers.every((l) => l.state === 'broken'), 60_000, 250);
      const fsck = await layerctl(['fsck'], socket);
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(7);
      expect(fsck.stdout + fsck.stderr).to.match(/broken/);
    } finally {
      await daemon?.stop();
      await proxy.close();
    }
  });

  it('completes the layers in the background when a daemon holds the store, resuming once the registry returns', async () => {
    const dir = join(work.dir, 'daemon');
    const root = join(dir, 'root');
    await lazyPull(root, ref);
    await registry.stop();
    let daemon: RunningDaemon | undefined;
    try {
      daemon = await startDaemon(dir);
      const socket = { LAYERD_SOCKET: daemon.socket };
      const inspect = async (): Promise<Inspect> => JSON.parse((await layerctl(['inspect', ref], socket)).stdout) as Inspect;
      // The fill starts (resumed by the daemon's start) and cannot get anywhere while the registry is gone.
      await waitFor('the fills to start', async () => (await inspect()).Layers.every((l) => l.state === 'filling'), 30_000, 100);
      expect((await inspect()).Layers.every((l) => l.filled === 0)).to.equal(true);
      await registry.restart();
      await waitFor('every layer complete', async () => (await inspect()).Layers.every((l) => l.state === 'complete'), 120_000, 250);
      const info = await inspect();
      expect(info.Layers.map(({ diffId, digest, uncompressedSize, entries }) => ({ diffId, digest, uncompressedSize, entries })))
        .to.deep.equal(fullInspect.Layers.map(({ diffId, digest, uncompressedSize, entries }) => ({ diffId, digest, uncompressedSize, entries })));
      const fsck = await layerctl(['fsck'], socket);
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
      expect(await readdir(join(root, 'lazy', 'sha256'))).to.deep.equal([]);
    } finally {
      await registry.restart();
      await daemon?.stop();
    }
  });
});
