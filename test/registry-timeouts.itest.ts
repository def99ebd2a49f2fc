/**
 * Pulls that must end: a server that accepts and never answers, a front
 * that never answers one layer's GET, and one that drips it a byte a
 * second, each with small configured timeouts, offline (`layerctl --root`)
 * and through the daemon (its `registryTimeouts` key); a daemon pull whose
 * API client disconnects, and an offline pull that gets SIGINT. Each time
 * the error is typed and names the registry (and the layer), the serving
 * side sees its connection closed, and tmp/ is empty right after.
 */
import { expect } from 'chai';
import { type ChildProcess, spawn } from 'node:child_process';
import { statSync } from 'node:fs';
import { readdir, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { type Socket, connect } from 'node:net';
import { join } from 'node:path';
import { BUSYBOX, DEBIAN_MULTI, LAYERCTL, layerctl, layerctlJson, scratch } from './support/env.js';
import { type RunningDaemon, http, startDaemon } from './support/daemon.js';
import { TestRegistry, layerctlR, pushCorpus } from './support/registry.js';
import { type FaultyFront, type SilentServer, startFaultyFront, startSilentServer, waitFor } from './support/registryFronts.js';

const BIG_LAYER = 'sha256:c03315e586d033da36cda954a86e572ab9f2601a0000dc3377c6baef8fcf8639';
const BIG_SIZE = statSync(join(DEBIAN_MULTI, 'blobs', 'sha256', BIG_LAYER.slice(7))).size;

describe('registry timeouts and cancellation', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let silent: SilentServer;
  let hanging: FaultyFront;
  let dripping: FaultyFront;
  const daemons: RunningDaemon[] = [];
  const children: ChildProcess[] = [];
  let n = 0;
  const freshRoot = (): string => join(work.dir, `store-${n++}`);
  const tmpEntries = async (root: string): Promise<string[]> => readdir(join(root, 'tmp')).catch(() => []);

  before(async () => {
    work = await scratch('layerd-registry-timeouts-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    await pushCorpus(registry.host, ['debian-multi:latest'], work.dir);
    silent = await startSilentServer();
    hanging = await startFaultyFront(registry.host, BIG_LAYER, 'hang', BIG_SIZE);
    dripping = await startFaultyFront(registry.host, BIG_LAYER, 'drip', BIG_SIZE);
  });
  after(async () => {
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    for (const d of daemons) await d.stop();
    await dripping?.close();
    await hanging?.close();
    await silent?.close();
    await registry?.stop();
    await work?.remove();
  });

  /** The store holds nothing of a failed pull. */
  async function expectNothingLeft(root: string): Promise<void> {
    expect(await tmpEntries(root)).to.deep.equal([]);
    expect(await layerctlJson<unknown[]>(['--root', root, 'images'])).to.deep.equal([]);
    const fsck = await layerctl(['--root', root, 'fsck']);
    expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
  }

  it('a server that accepts and never answers: EIO (idle timeout) naming the registry', async () => {
    const root = freshRoot();
    const r = await layerctlR(['--root', root, 'pull', '--idle-timeout', '1', `${silent.host}/x/y:latest`]);
    expect(r.code, r.stderr).to.equal(1);
    expect(r.stderr).to.match(new RegExp(`EIO: registry ${silent.host}: GET \\S+/v2/x/y/manifests/latest: nothing received for 1 s \\(idle timeout\\)`));
    expect(silent.connections).to.be.greaterThan(0);
    expect(await tmpEntries(root)).to.deep.equal([]);
  });

  it('a listener whose accept queue is full (connections never complete): EIO (connect timeout)', async () => {
    // python3 listens with a backlog of 0 and never accepts; one connection fills the queue, later SYNs are dropped.
    const listener = spawn('python3', ['-c', [
      'import socket, sys, time',
      's = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(0)',
      'print(s.getsockname()[1], flush=True)',
      'sys.stdin.read()',
    ].join('\n')], { stdio: ['pipe', 'pipe', 'inherit'] });
    children.push(listener);
    let filler: Socket | undefined;
    try {
      const port = await new Promise<number>((resolve, reject) => {
        listener.stdout!.once('data', (d: Buffer) => resolve(Number(d.toString().trim())));
        listener.once('exit', () => reject(new Error('python3 listener exited')));
      });
      filler = connect(port, '127.0.0.1');
      await new Promise<void>((resolve, reject) => { filler!.once('connect', resolve); filler!.once('error', reject); });
      const root = freshRoot();
      const r = await layerctlR(['--root', root, 'pull', '--connect-timeout', '1', `127.0.0.1:${port}/x/y:latest`]);
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stderr).to.contain(`EIO: registry 127.0.0.1:${port}: GET http://127.0.0.1:${port}/v2/x/y/manifests/latest: no connection within 1 s (connect timeout)`);
      expect(await tmpEntries(root)).to.deep.equal([]);
    } finally {
      filler?.destroy();
      listener.stdin!.end(); // its read returns and it exits
    }
  });

  // Timeouts of 2 s where real transfers run beside the fault, so that a slow moment of a busy machine is not mistaken for it.
  it('a layer GET never answered (idle timeout from the environment): EIO naming the layer; the connection is closed, tmp/ empty', async () => {
    const root = freshRoot();
    const before = hanging.faultStarted;
    const r = await layerctlR(['--root', root, 'pull', `${hanging.host}/corpus/debian-multi:latest`], { LAYERD_REGISTRY_IDLE_TIMEOUT: '2' });
    expect(r.code, r.stderr).to.equal(1);
    expect(r.stderr).to.contain(`EIO: registry ${hanging.host}`);
    expect(r.stderr).to.contain(`/blobs/${BIG_LAYER}: nothing received for 2 s (idle timeout)`);
    expect(hanging.faultStarted).to.equal(before + 1); // a timeout is not retried
    await waitFor('the hanging GET closed', () => hanging.faultClosed === hanging.faultStarted);
    await expectNothingLeft(root);
  });

  it('a layer dripped a byte a second: EIO after the overall limit, naming the layer; the connection is closed, tmp/ empty', async () => {
    const root = freshRoot();
    const r = await layerctlR(['--root', root, 'pull', '--timeout', '3', `${dripping.host}/corpus/debian-multi:latest`]);
    expect(r.code, r.stderr).to.equal(1);
    expect(r.stderr).to.contain(`EIO: registry ${dripping.host}`);
    expect(r.stderr).to.contain(`/blobs/${BIG_LAYER}: over the overall time limit of 3 s`);
    await waitFor('the dripping GET closed', () => dripping.faultClosed === dripping.faultStarted);
    await expectNothingLeft(root);
  });

  it('a push whose upload is never answered: EIO (idle timeout) naming the blob; the connection is closed, tmp/ empty', async () => {
    const uploadHang = await startFaultyFront(registry.host, '', 'hang', 0, (req) => req.method === 'PUT' && (req.url ?? '').includes('/blobs/uploads/'));
    try {
      const root = freshRoot();
      await layerctlJson(['--root', root, 'import', BUSYBOX]);
      const r = await layerctlR(['--root', root, 'push', '--idle-timeout', '2', 'busybox:amd64', `${uploadHang.host}/hang/bb:1`]);
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stderr).to.match(new RegExp(`EIO: registry ${uploadHang.host}: PUT \\S+/v2/hang/bb/blobs/uploads/\\S+digest=sha256%3A[0-9a-f]{64}: nothing received for 2 s \\(idle timeout\\)`));
      expect(uploadHang.faultStarted).to.be.greaterThan(0); // up to 3 blobs are uploaded at once
      await waitFor('the hanging PUTs closed', () => uploadHang.faultClosed === uploadHang.faultStarted);
      expect(await tmpEntries(root)).to.deep.equal([]);
    } finally {
      await uploadHang.close();
    }
  });

  it('bad timeout flags are EINVAL', async () => {
    const r = await layerctlR(['--root', freshRoot(), 'pull', '--idle-timeout', 'soon', `${registry.host}/corpus/debian-multi:latest`]);
    expect(r.code, r.stderr).to.equal(2);
    expect(r.stderr).to.contain('EINVAL');
  });

  it('an offline pull that gets SIGINT stops downloading and removes its tmp/ directory', async () => {
    const root = freshRoot();
    const before = dripping.faultStarted;
    const child = spawn(LAYERCTL, ['--root', root, 'pull', `${dripping.host}/corpus/debian-multi:latest`], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    await waitFor('the dripping GET', () => dripping.faultStarted > before, 30_000);
    await waitFor('files in tmp/', async () => (await tmpEntries(root)).length > 0);
    process.kill(child.pid!, 'SIGINT');
    expect(await exited, stderr).to.equal(1);
    expect(stderr).to.match(/EIO: .*cancelled \(layerctl got SIGINT\)/);
    await waitFor('the dripping GET closed', () => dripping.faultClosed === dripping.faultStarted);
    await expectNothingLeft(root);
  });

  describe('through the daemon', () => {
    it('registryTimeouts in the daemon config applies (totalSeconds)', async () => {
      const dir = join(work.dir, `daemon-${n++}`);
      const config = join(work.dir, `layerd-${n++}.json`);
      await writeFile(config, JSON.stringify({ registryTimeouts: { totalSeconds: 2 } }));
      const daemon = await startDaemon(dir, ['--config', config, '--mount-root', join(dir, 'mounts')]);
      daemons.push(daemon);
      const r = await layerctl(['--socket', daemon.socket, 'pull', `${dripping.host}/corpus/debian-multi:latest`]);
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stderr).to.contain(`/blobs/${BIG_LAYER}: over the overall time limit of 2 s`);
      await waitFor('the dripping GET closed', () => dripping.faultClosed === dripping.faultStarted);
      expect(await tmpEntries(daemon.root)).to.deep.equal([]);
      const flags = await layerctl(['--socket', daemon.socket, 'pull', '--timeout', '5', `${dripping.host}/corpus/debian-multi:latest`]);
      expect(flags.code).to.equal(2);
      expect(flags.stderr).to.contain('registryTimeouts');
    });

    for (const streamed of [true, false]) {
      it(`a pull whose API client disconnects stops downloading and empties tmp/ promptly (${streamed ? 'NDJSON progress' : 'plain JSON'})`, async () => {
        const dir = join(work.dir, `daemon-${n++}`);
        const daemon = await startDaemon(dir, ['--mount-root', join(dir, 'mounts')]);
        daemons.push(daemon);
        const before = dripping.faultStarted;
        const body = JSON.stringify({ ref: `${dripping.host}/corpus/debian-multi:latest` });
        const req = request({
          socketPath: daemon.socket, method: 'POST', path: '/v1/images/pull',
          headers: {
            'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)), ...(streamed ? { accept: 'application/x-ndjson' } : {}),
          },
        });
        req.on('error', () => undefined); // destroyed below on purpose
        req.on('response', (res) => res.resume());
        req.end(body);
        await waitFor('the dripping GET', () => dripping.faultStarted > before, 30_000);
        await waitFor('files in tmp/', async () => (await tmpEntries(daemon.root)).length > 0);
        req.destroy();
        await waitFor('the dripping GET closed', () => dripping.faultClosed === dripping.faultStarted);
        await waitFor('tmp/ empty', async () => (await tmpEntries(daemon.root)).length === 0);
        expect((await http(daemon.socket, 'GET', '/v1/health')).status).to.equal(200);
        const images = await layerctl(['--socket', daemon.socket, 'images', '--json']);
        expect(JSON.parse(images.stdout)).to.deep.equal([]);
      });
    }
  });
});
