/**
 * The remote-snapshot path with a real containerd: layers already in
 * layerd's store are used by containerd without unpacking them. ctr sends no
 * labels, so a small test client plays containerd's unpacker (as CRI or
 * nerdctl would): through containerd's own Snapshots API it prepares each
 * layer with `containerd.io/snapshot.ref` = the chain ID and the layer's
 * digest as `containerd.io/snapshot/cri.layer-digest`; layerd answers
 * ALREADY_EXISTS, containerd records the committed snapshot layerd
 * registered, and `ctr run` uses the image. No tar is applied: layerd's store
 * gains no layer and no snapshot is ever committed from a writable layer.
 */
import { expect } from 'chai';
import { status } from '@grpc/grpc-js';
import { join } from 'node:path';
import { DEBIAN_MULTI, scratch, daemonCli } from './support/env.js';
import { ContainerdEnv, grpcCode, imageDocs, missingTools, ociArchive, snapshotsClient, closeContainerdTest } from './support/containerd.js';

describe('containerd: remote snapshots (layers already in layerd\'s store are not unpacked)', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let env: ContainerdEnv | undefined;
  const reason = missingTools();
  const IMAGE = 'corpus/debian-multi:l3-whiteouts';

  const { cli } = daemonCli(() => env!.layerdSocket);
  const storeLayers = async (): Promise<string[]> => (JSON.parse(await cli('layers', '--json')) as { diffId: string }[]).map((l) => l.diffId).sort();

  before(async function () {
    if (reason) {
      console.warn(`      skipped: ${reason}`);
      this.skip();
    }
    work = await scratch('layerd-remote-');
    env = new ContainerdEnv(work.dir);
    await env.start();
  });

  after(async function () {
    await closeContainerdTest(this, { env, work });
  });

  /**
   * The first test's whole course (its checks included), run once: the second test starts
   * from its end state (image in containerd, layers registered) and runs it if nothing did.
   */
  let registered: Promise<void> | undefined;
  const registerAndRun = (): Promise<void> => (registered ??= registerAndRunOnce());

  it('registers the store\'s layers as containerd snapshots, and containerd runs the image without unpacking it', () => registerAndRun());

  it('containerd\'s GC removes the registered snapshots once the image is gone; the store keeps its layers', async () => {
    await registerAndRun();
    const layersBefore = await storeLayers();
    await env!.ctrOk(['images', 'rm', '--sync', IMAGE]);
    await env!.gc();
    const direct = snapshotsClient(env!.snapshotterSocket);
    try {
      expect(await direct.list()).to.deep.equal([]);
    } finally {
      direct.close();
    }
    expect(await storeLayers(), 'the layers still belong to layerd\'s image').to.deep.equal(layersBefore);
  });

  async function registerAndRunOnce(): Promise<void> {
    const docs = await imageDocs(DEBIAN_MULTI, 'l3-whiteouts');
    // layerd has the image (its own import); containerd gets the content only
    await cli('import', DEBIAN_MULTI);
    const layersBefore = await storeLayers();
    for (const d of docs.diffIds) expect(layersBefore).to.include(d);
    await ociArchive(DEBIAN_MULTI, ['l3-whiteouts'], join(work!.dir, 'debian.tar'));
    await env!.ctrOk(['images', 'import', '--no-unpack', '--base-name', 'corpus/debian-multi', join(work!.dir, 'debian.tar')]);
    expect((await env!.ctrOk(['snapshots', '--snapshotter', 'layerd', 'ls'])).trim().split('\n')).to.have.length(1); // the header only

    // the test client: containerd's unpacker's Prepare calls, with the labels CRI sets, under a lease
    const lease = `unpack-${process.pid}`;
    await env!.ctrOk(['leases', 'create', '--id', lease]);
    const client = snapshotsClient(env!.containerdSocket, { namespace: env!.namespace, lease });
    try {
      for (let i = 0; i < docs.chain.length; i++) {
        const request = {
          snapshotter: 'layerd', key: `extract-${i}-${process.pid} ${docs.chain[i]}`, parent: i === 0 ? '' : docs.chain[i - 1],
          labels: {
            'containerd.io/snapshot.ref': docs.chain[i],
            'containerd.io/snapshot/cri.layer-digest': docs.layers[i],
            'containerd.io/snapshot/cri.image-ref': IMAGE,
          },
        };
        const code = await client.call('Prepare', request).then(() => 'prepared (would unpack)', (err: unknown) => grpcCode(err));
        expect(code, `layer ${i}`).to.equal(status.ALREADY_EXISTS);
        const info = await client.call<{ info: { name: string; kind: string; parent: string } }>('Stat', { snapshotter: 'layerd', key: docs.chain[i] });
        expect(info.info).to.include({ name: docs.chain[i], kind: 'COMMITTED', parent: i === 0 ? '' : docs.chain[i - 1] });
      }
    } finally {
      client.close();
    }
    // as containerd's unpacker does: the image config references its top snapshot, so GC keeps the chain
    await env!.ctrOk(['content', 'label', docs.configDigest, `containerd.io/gc.ref.snapshot.layerd=${docs.chain.at(-1)!}`]);
    await env!.ctrOk(['leases', 'rm', lease]);
    await env!.gc();
    const tree = await env!.ctrOk(['snapshots', '--snapshotter', 'layerd', 'tree']);
    expect(tree).to.contain(`    \\_ ${docs.chain[2]}`);

    // layerd's records: committed snapshots whose layers are exactly the image's, registered, not committed from an upper
    const direct = snapshotsClient(env!.snapshotterSocket);
    try {
      const registered = await direct.list(['labels."containerd.io/snapshot/layerd.remote"']);
      expect(registered.map((s) => s.labels['containerd.io/snapshot/layerd.remote']).sort()).to.deep.equal([...docs.diffIds].sort());
      expect(registered.every((s) => s.kind === 'COMMITTED')).to.equal(true);
      expect((await direct.list()).filter((s) => s.kind !== 'COMMITTED')).to.deep.equal([]);
    } finally {
      direct.close();
    }

    // containerd sees the image as unpacked and runs it
    const out = await env!.runScript(IMAGE, 'remote-1',
      '/usr/bin/python3 -c "print(6 * 7)"; grep VERSION_CODENAME /etc/os-release; ls /usr/share/doc; [ -e /etc/motd ] || echo motd-deleted', { timeoutMs: 120_000 });
    expect(out).to.equal('42\nVERSION_CODENAME=bookworm\nREADME.corpus\napt\ncorpus\nmotd-deleted\n');

    // the proof that no tar was applied: an unpack commits a writable layer, which ingests a new layer
    expect(await storeLayers(), 'layerd\'s store gained no layer').to.deep.equal(layersBefore);
    const log = env!.layerd!.log();
    expect(log).not.to.contain('"message":"snapshot committed"');
    expect(log.match(/remote snapshot registered/g)).to.have.length(3);
  }
});
