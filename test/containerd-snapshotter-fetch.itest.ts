/**
 * The snapshotter fetching layers itself, driven through its gRPC API
 * directly (no containerd) against a loopback registry: a labelled Prepare
 * whose labels name a layer on the registry is answered ALREADY_EXISTS once
 * layerd has fetched it; the image's later layers are fetched ahead; a
 * fetch that fails, or a layer that does not give the chain containerd
 * named, leaves the Prepare a normal unpack (containerd downloads itself).
 */
import { expect } from 'chai';
import { status } from '@grpc/grpc-js';
import { join } from 'node:path';
import { DEBIAN_MULTI, execFileAsync, layerctl, scratch } from './support/env.js';
import { type RunningDaemon, startDaemon, waitFor } from './support/daemon.js';
import { type SnapshotsClient, grpcCode, imageDocs, snapshotsClient } from './support/containerd.js';
import { clearMountsUnder } from './support/store.js';
import { TestRegistry, startProxy } from './support/registry.js';

/** No containerd in these tests: layerd never asks one (a host's) for original layer blobs. */
const NO_CONTAINERD = ['--containerd-socket', 'none'];

const TAG = 'l2-packages'; // two layers

describe('containerd snapshotter: fetching the layers Prepare labels name', function () {
  this.timeout(180_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;
  let registry: TestRegistry | undefined;
  let client: SnapshotsClient;

  const prepare = (key: string, parent: string, labels: Record<string, string>) =>
    client.call<{ mounts: { type: string }[] }>('Prepare', { snapshotter: 'layerd', key, parent, labels }).then((r) => r.mounts);
  const codeOf = async (p: Promise<unknown>): Promise<number | undefined> => p.then(() => undefined, (err: unknown) => grpcCode(err));
  const storeLayers = async (): Promise<string[]> => {
    const r = await layerctl(['--socket', daemon!.socket, 'layers', '--json']);
    if (r.code !== 0) throw new Error(`layerctl layers: ${r.stderr}`);
    return (JSON.parse(r.stdout) as { diffId: string }[]).map((l) => l.diffId);
  };
  const fetchLines = (digest: string): string[] => daemon!.log().split('\n').filter((l) => l.includes('snapshotter fetched a layer') && l.includes(digest));
  const criLabels = (target: string, reference: string, digest: string, layers: string[] = [digest]): Record<string, string> => ({
    'containerd.io/snapshot.ref': target,
    'containerd.io/snapshot/cri.image-ref': reference,
    'containerd.io/snapshot/cri.layer-digest': digest,
    'containerd.io/snapshot/cri.image-layers': layers.join(','),
  });

  before(async () => {
    work = await scratch('layerd-snapfetch-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests',
      `oci:${DEBIAN_MULTI}:${TAG}`, `docker://${registry.host}/corpus/debian-multi:${TAG}`]);
    daemon = await startDaemon(work.dir, [...NO_CONTAINERD, '--snapshotter-socket', join(work.dir, 'snap.sock')]);
    client = snapshotsClient(join(work.dir, 'snap.sock'));
  });

  after(async () => {
    client?.close();
    await daemon?.stop();
    await registry?.stop();
    await clearMountsUnder(work.dir);
    await work.remove();
  });

  it('fetches the named layer (ALREADY_EXISTS, the image\'s diffID) and the image\'s later layers ahead, each once', async () => {
    const docs = await imageDocs(DEBIAN_MULTI, TAG);
    const ref = `${registry!.host}/corpus/debian-multi:${TAG}`;
    expect(await storeLayers()).to.deep.equal([]);
    expect(await codeOf(prepare('ns/1/extract-1 base', '', criLabels(docs.chain[0]!, ref, docs.layers[0]!, docs.layers))), 'base').to.equal(status.ALREADY_EXISTS);
    const base = await client.list([`labels."containerd.io/snapshot.ref"==${docs.chain[0]!},parent==""`]);
    expect(base.map((s) => [s.kind, s.labels['containerd.io/snapshot/layerd.remote']])).to.deep.equal([['COMMITTED', docs.diffIds[0]]]);
    // the second layer was fetched meanwhile: its Prepare takes it without another download
    await waitFor('the second layer fetched ahead', () => fetchLines(docs.layers[1]!).length === 1);
    expect(fetchLines(docs.layers[1]!)[0]).to.contain('"why":"prefetch"');
    expect(await codeOf(prepare('ns/2/extract-2 top', base[0]!.name, criLabels(docs.chain[1]!, ref, docs.layers[1]!, [docs.layers[1]!]))), 'top').to.equal(status.ALREADY_EXISTS);
    expect(fetchLines(docs.layers[0]!)).to.have.length(1);
    expect(fetchLines(docs.layers[1]!)).to.have.length(1);
    expect((await storeLayers()).sort()).to.deep.equal([...docs.diffIds].sort());
    // another namespace: the layers are known by chain, nothing is fetched again
    expect(await codeOf(prepare('ns2/1/extract-3 base', '', criLabels(docs.chain[0]!, ref, docs.layers[0]!, docs.layers)))).to.equal(status.ALREADY_EXISTS);
    expect(fetchLines(docs.layers[0]!)).to.have.length(1);
    for (const s of (await client.list()).reverse()) await client.call('Remove', { snapshotter: 'layerd', key: s.name });
  });

  it('leaves the Prepare a normal unpack when the fetch fails or the layer gives another chain', async () => {
    const docs = await imageDocs(DEBIAN_MULTI, TAG);
    const ref = `${registry!.host}/corpus/debian-multi:${TAG}`;
    const missing = `sha256:${'2'.repeat(64)}`;
    const wrongTarget = `sha256:${'3'.repeat(64)}`;
    // the registry has no such blob
    const m1 = await prepare('ns/3/extract-4 a', '', criLabels(missing, ref, missing));
    expect(m1[0]!.type, 'an unpack directory').to.equal('overlay');
    await waitFor('the failed fetch logged', () => daemon!.log().split('\n').some((l) => l.includes('snapshotter could not fetch a layer') && l.includes(missing)));
    // no registry there at all
    const m2 = await prepare('ns/4/extract-5 b', '', criLabels(missing, '127.0.0.1:1/nothing/here:1', missing));
    expect(m2[0]!.type).to.equal('overlay');
    // a real layer, but containerd named another chain for it
    const m3 = await prepare('ns/5/extract-6 c', '', criLabels(wrongTarget, ref, docs.layers[0]!));
    expect(m3[0]!.type).to.equal('overlay');
    await waitFor('the layer of another chain logged', () => daemon!.log().includes('a layer source gave a layer of another chain'));
    for (const key of ['ns/3/extract-4 a', 'ns/4/extract-5 b', 'ns/5/extract-6 c']) await client.call('Remove', { snapshotter: 'layerd', key });
    expect(await client.list()).to.deep.equal([]);
  });
  it('a daemon stopping cancels a fetch in progress: it exits at once, and the waiting Prepare is answered', async () => {
    // a registry front that starts sending a blob and then stalls (a daemon waiting out its idle timeout would take a minute)
    const stall = await startProxy(registry!.host, {
      intercept: (req, res) => {
        if (!req.url?.includes('/blobs/')) return false;
        res.writeHead(200, { 'content-length': String(1024 * 1024) });
        res.write(Buffer.alloc(1024));
        return true;
      },
    });
    try {
      const digest = `sha256:${'4'.repeat(64)}`;
      const answered = prepare('ns/9/extract-9 s', '', criLabels(digest, `${stall.host}/corpus/debian-multi:${TAG}`, digest))
        .then((m) => m[0]!.type, (err: unknown) => `error ${String(grpcCode(err))}`);
      await waitFor('the fetch to start', () => stall.seen.some((u) => u.includes('/blobs/')));
      const started = Date.now();
      expect(await daemon!.stop(), 'exit code').to.equal(0);
      expect(Date.now() - started, 'ms to stop').to.be.below(10_000);
      daemon = undefined;
      // the fetch failed: an unpack directory (or the server went first: UNAVAILABLE, CANCELLED); never a hang
      expect(await answered).to.be.oneOf(['overlay', `error ${status.UNAVAILABLE}`, `error ${status.CANCELLED}`]);
    } finally {
      await stall.close();
    }
  });
});
