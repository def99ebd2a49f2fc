/**
 * A stock containerd (Debian's 1.6) unpacking images into layerd: the
 * snapshots it prepares only to apply a layer are plain directories (no
 * FUSE mount), each layer is stored once however many containerd
 * namespaces unpack it, and an image layerd pulled itself shares its layers
 * with `ctr images pull` of the same image from the same registry.
 *
 * containerd, ctr and layerd run in a private mount namespace
 * (test/support/containerd.ts); the registry is Debian's docker-registry on
 * 127.0.0.1. Skipped only if containerd or runc are not installed.
 */
import { expect } from 'chai';
import { join } from 'node:path';
import { DEBIAN_MULTI, execFileAsync, layerctl, scratch } from './support/env.js';
import { ContainerdEnv, missingTools, ociArchive, closeContainerdTest } from './support/containerd.js';
import { waitFor } from './support/daemon.js';
import { TestRegistry } from './support/registry.js';

const TAG = 'l3-whiteouts'; // containerd 1.6 cannot apply debian-multi's layer 4 (docs/containerd.md)

interface LayerRow { diffId: string; usedBy: number }

describe('containerd: unpacking into layerd at disk speed, each layer stored once', function () {
  this.timeout(600_000);
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let env: ContainerdEnv | undefined;
  let registry: TestRegistry | undefined;
  const reason = missingTools();

  const ctr = (namespace: string, ...args: string[]): Promise<string> => env!.ctrOk(args, { timeoutMs: 300_000, namespace });
  const layers = async (): Promise<LayerRow[]> => {
    const r = await layerctl(['--socket', env!.layerdSocket, 'layers', '--json']);
    if (r.code !== 0) throw new Error(`layerctl layers: ${r.stderr}`);
    return JSON.parse(r.stdout) as LayerRow[];
  };
  /** The layerd log lines since `from` (a length of the log) that say `what`. */
  const logged = (from: number, what: RegExp): string[] => env!.layerd!.log().slice(from).split('\n').filter((l) => what.test(l));

  before(async function () {
    if (reason) {
      console.warn(`      skipped: ${reason}`);
      this.skip();
    }
    work = await scratch('layerd-unpack-');
    env = new ContainerdEnv(work.dir);
    await env.start();
    await ociArchive(DEBIAN_MULTI, [TAG], join(work.dir, 'debian.tar'));
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests',
      `oci:${DEBIAN_MULTI}:${TAG}`, `docker://${registry.host}/corpus/debian-multi:${TAG}`]);
  });

  after(async function () {
    await closeContainerdTest(this, { env, work, servers: [registry] });
  });

  it('`ctr images import` in two namespaces unpacks without FUSE and stores each layer once; the image runs', async () => {
    const before = await layers();
    const logStart = env!.layerd!.log().length;
    await ctr('ns-a', 'images', 'import', '--snapshotter', 'layerd', '--base-name', 'corpus/debian-multi', join(work!.dir, 'debian.tar'));
    expect(logged(logStart, /unpack snapshot prepared/), 'every layer unpacked into a directory').to.have.length(3);
    expect(logged(logStart, /"snapshot prepared"/), 'no FUSE mount for an unpack').to.deep.equal([]);
    // Commit answered at once; the layers are ingested from the directories in the background
    await waitFor('ns-a\'s layers ingested', async () => (await layers()).length >= before.length + 3, 120_000, 200);
    const afterA = await layers();
    expect(afterA).to.have.length(before.length + 3);
    await ctr('ns-b', 'images', 'import', '--snapshotter', 'layerd', '--base-name', 'corpus/debian-multi', join(work!.dir, 'debian.tar'));
    const afterB = await layers();
    expect(afterB.map((l) => l.diffId).sort(), 'the second namespace stored nothing new').to.deep.equal(afterA.map((l) => l.diffId).sort());
    for (const l of afterB.filter((x) => !before.some((b) => b.diffId === x.diffId))) {
      expect(l.usedBy, `${l.diffId}: a snapshot in each namespace`).to.equal(2);
    }
    const out = await env!.runScript(`corpus/debian-multi:${TAG}`, 'py42', 'python3 -c "print(42)"', { namespace: 'ns-b', timeoutMs: 300_000 });
    expect(out.trim()).to.equal('42');
  });

  it('an image `layerctl pull` stored shares its layers with `ctr images pull --snapshotter layerd` of it', async () => {
    const ref = `${registry!.host}/corpus/debian-multi:${TAG}`;
    const pulled = await layerctl(['--socket', env!.layerdSocket, 'pull', ref]);
    expect(pulled.code, pulled.stderr).to.equal(0);
    const config = JSON.parse((await layerctl(['--socket', env!.layerdSocket, 'inspect', ref])).stdout) as { RootFS: { Layers: string[] } };
    const diffIds = config.RootFS.Layers;
    expect(diffIds).to.have.length(3);
    const before = await layers();
    await ctr('ns-c', 'images', 'pull', '--plain-http', '--snapshotter', 'layerd', ref);
    const after = await layers();
    expect(after.map((l) => l.diffId).sort(), 'no layer stored again').to.deep.equal(before.map((l) => l.diffId).sort());
    const usedBy = new Map(after.map((l) => [l.diffId, l.usedBy]));
    // (the imports above stored these very layers, from containerd's original blobs: docs/containerd.md)
    expect(diffIds.map((d) => usedBy.get(d)), 'each layer: the image, ns-a\'s and ns-b\'s import snapshots and ns-c\'s').to.deep.equal([4, 4, 4]);
  });
});
