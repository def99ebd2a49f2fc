/**
 * One copy of a layer, with the image's own diffID, whichever side pulls
 * first: a layer `ctr images pull` unpacked into layerd is stored from its
 * original compressed blob, read from containerd's content store (found by
 * the chain ID containerd committed the snapshot as), not from a tar layerd
 * rebuilds from the unpacked directory. So `layerctl pull` of the same image
 * afterwards stores nothing new, another containerd namespace shares the
 * layers, and `layerctl push` sends the very blobs the image was pulled as.
 * With containerd's socket unreachable, layers are stored from the
 * directories as before (layerd's own diffIDs), and layerd says why.
 *
 * Real containerd (Debian's 1.6, test/support/containerd.ts), real registry
 * (Debian's docker-registry on 127.0.0.1). Skipped only if containerd or runc
 * are not installed.
 */
import { expect } from 'chai';
import { createHash } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { ContainerdContent, ContainerdOriginalLayers, LABEL_UNCOMPRESSED } from '../daemon/snapshotter/containerdContent.js';
import { type Digest } from '../storage/digest.js';
import { DEBIAN_MULTI, execFileAsync, layerctl, scratch } from './support/env.js';
import { ContainerdEnv, type ImageDocs, imageDocs, missingTools, closeContainerdTest } from './support/containerd.js';
import { waitFor } from './support/daemon.js';
import { TestRegistry } from './support/registry.js';

const TAG = 'l3-whiteouts'; // containerd 1.6 cannot apply debian-multi's layer 4 (docs/containerd.md)

interface LayerRow { diffId: string; usedBy: number; blobs: string[] }

/** One containerd + layerd (its extra arguments given), a registry holding debian-multi, and helpers. */
function setUp(prefix: string, layerdArgs: string[] = []): {
  env: () => ContainerdEnv; registry: () => TestRegistry; work: () => string; docs: () => ImageDocs;
  layers(): Promise<LayerRow[]>; logged(from: number, what: RegExp): string[]; ref(): string;
} {
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let env: ContainerdEnv | undefined;
  let registry: TestRegistry | undefined;
  let docs: ImageDocs | undefined;
  const reason = missingTools();

  before(async function () {
    if (reason) {
      console.warn(`      skipped: ${reason}`);
      this.skip();
    }
    work = await scratch(prefix);
    env = new ContainerdEnv(work.dir, { layerdArgs });
    await env.start();
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests',
      `oci:${DEBIAN_MULTI}:${TAG}`, `docker://${registry.host}/corpus/debian-multi:${TAG}`]);
    docs = await imageDocs(DEBIAN_MULTI, TAG);
  });

  after(async function () {
    await closeContainerdTest(this, { env, work, servers: [registry] });
  });

  return {
    env: () => env!, registry: () => registry!, work: () => work!.dir, docs: () => docs!,
    ref: () => `${registry!.host}/corpus/debian-multi:${TAG}`,
    async layers(): Promise<LayerRow[]> {
      const r = await layerctl(['--socket', env!.layerdSocket, 'layers', '--json']);
      if (r.code !== 0) throw new Error(`layerctl layers: ${r.stderr}`);
      return JSON.parse(r.stdout) as LayerRow[];
    },
    logged: (from: number, what: RegExp): string[] => env!.layerd!.log().slice(from).split('\n').filter((l) => what.test(l)),
  };
}

describe('containerd: a layer `ctr images pull` unpacked keeps the image\'s diffID (stored from containerd\'s original blob)', function () {
  this.timeout(600_000);
  const t = setUp('layerd-diffid-');
  const ctr = (namespace: string, ...args: string[]): Promise<string> => t.env().ctrOk(args, { timeoutMs: 300_000, namespace });
  const blobFiles = async (): Promise<string[]> => (await readdir(join(t.env().layerdRoot, 'blobs', 'sha256')).catch(() => [] as string[])).sort();

  it('`ctr images pull`, then `layerctl pull` of the image: each layer stored once, with the config\'s diffIDs; `layerctl push` sends the original blobs', async () => {
    const { diffIds, layers: blobs, manifestDigest } = t.docs();
    const logStart = t.env().layerd!.log().length;
    await ctr('ns-a', 'images', 'pull', '--plain-http', '--snapshotter', 'layerd', t.ref());
    // Commit answers at once; the layers are stored in the background
    await waitFor('the three layers ingested', async () => t.logged(logStart, /unpack snapshot layer ingested/).length >= 3, 120_000, 200);
    const ingested = t.logged(logStart, /unpack snapshot layer ingested/);
    expect(ingested.filter((l) => l.includes('containerd content')), `every layer from containerd's blob:\n${ingested.join('\n')}`).to.have.length(3);
    const afterCtr = await t.layers();
    expect(afterCtr.map((l) => l.diffId).sort(), 'the store holds the image\'s own diffIDs').to.deep.equal([...diffIds].sort());
    const stored = await blobFiles();
    for (const b of blobs) expect(stored, `the original blob ${b} is kept`).to.include(b.slice('sha256:'.length));

    const pulled = await layerctl(['--socket', t.env().layerdSocket, 'pull', t.ref()]);
    expect(pulled.code, pulled.stderr).to.equal(0);
    const afterPull = await t.layers();
    expect(afterPull.map((l) => l.diffId).sort(), 'layerctl pull stored no layer again').to.deep.equal([...diffIds].sort());
    const added = (await blobFiles()).filter((f) => !stored.includes(f));
    expect(added.sort(), 'only the manifest and config are new').to.deep.equal([manifestDigest, t.docs().configDigest].map((d) => d.slice('sha256:'.length)).sort());
    const usedBy = new Map(afterPull.map((l) => [l.diffId, l]));
    expect(diffIds.map((d) => usedBy.get(d)?.usedBy), 'each layer: the image and ns-a\'s snapshot').to.deep.equal([1, 1, 1].map(() => 2));
    expect(diffIds.map((d) => usedBy.get(d)?.blobs), 'each layer\'s blob is the original').to.deep.equal(blobs.map((b) => [b]));

    const target = `${t.registry().host}/copy/debian-multi:${TAG}`;
    const pushed = await layerctl(['--socket', t.env().layerdSocket, 'push', t.ref(), target]);
    expect(pushed.code, pushed.stderr).to.equal(0);
    const { stdout } = await execFileAsync('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${target}`]);
    const manifest = JSON.parse(stdout) as { layers: { digest: string }[] };
    expect(manifest.layers.map((l) => l.digest), 'the pushed manifest names the original blobs').to.deep.equal(blobs);
    expect(`sha256:${createHash('sha256').update(stdout).digest('hex')}`, 'the manifest is the image\'s own, not rewritten').to.equal(manifestDigest);
  });

  it('finds a layer\'s blob in containerd\'s content store by chain ID through the image manifests when no blob is labelled with its diffID yet', async () => {
    const { chain, layers: blobs, diffIds } = t.docs();
    await ctr('ns-fetch', 'content', 'fetch', '--plain-http', t.ref()); // fetched, never unpacked: no containerd.io/uncompressed labels
    const content = new ContainerdContent(t.env().containerdSocket);
    try {
      expect(await content.list('ns-fetch', [`labels."${LABEL_UNCOMPRESSED}"`]), 'no blob labelled').to.deep.equal([]);
      const source = new ContainerdOriginalLayers(content);
      for (let i = 0; i < chain.length; i++) {
        const found = await source.find({ namespace: 'ns-fetch', parentChain: i === 0 ? null : chain[i - 1]! as Digest, target: chain[i]! as Digest });
        expect(found, `layer ${i}`).to.include({ digest: blobs[i], diffId: diffIds[i] });
        expect(found!.how).to.match(/^image manifest sha256:/);
        if (i === 1) {
          const hash = createHash('sha256');
          for await (const chunk of await found!.open()) hash.update(chunk as Buffer);
          expect(`sha256:${hash.digest('hex')}`, 'the blob read is the layer blob').to.equal(blobs[1]);
        }
      }
      expect(await source.find({ namespace: 'ns-fetch', parentChain: chain[0]! as Digest, target: chain[0]! as Digest }), 'a chain no image has').to.equal(undefined);
      expect(await source.find({ namespace: 'ns-empty', parentChain: null, target: chain[0]! as Digest }), 'another namespace sees nothing').to.equal(undefined);
    } finally {
      content.close();
    }
  });

  it('another containerd namespace pulling the image stores nothing and shares the layers', async () => {
    const { diffIds } = t.docs();
    const before = await t.layers();
    const logStart = t.env().layerd!.log().length;
    await ctr('ns-b', 'images', 'pull', '--plain-http', '--snapshotter', 'layerd', t.ref());
    expect(t.logged(logStart, /unpack snapshot layer ingested/), 'nothing ingested again').to.deep.equal([]);
    const after = await t.layers();
    expect(after.map((l) => l.diffId).sort()).to.deep.equal(before.map((l) => l.diffId).sort());
    const usedBy = new Map(after.map((l) => [l.diffId, l.usedBy]));
    expect(diffIds.map((d) => usedBy.get(d)), 'the image and a snapshot in each namespace').to.deep.equal([3, 3, 3]);
    const out = await t.env().runScript(t.ref(), 'py42', 'python3 -c "print(42)"', { namespace: 'ns-b', timeoutMs: 300_000 });
    expect(out.trim()).to.equal('42');
  });

  it('the original blobs stay while any snapshot uses their layer (store GC keeps them) and go with the last one', async () => {
    const blobs = t.docs().layers.map((b) => b.slice('sha256:'.length));
    const rmi = await layerctl(['--socket', t.env().layerdSocket, 'rmi', t.ref()]); // runs the store's GC
    expect(rmi.code, rmi.stderr).to.equal(0);
    expect((await blobFiles()).filter((f) => blobs.includes(f)), 'kept for the snapshots').to.deep.equal([...blobs].sort());
    // ns-a's snapshots stored the layers; ns-b's, which found them stored, hold the blobs as well
    await ctr('ns-a', 'images', 'rm', t.ref());
    await t.env().gc(); // containerd removes the snapshots nothing refers to now
    await waitFor('ns-a\'s snapshots removed', async () => (await t.layers()).filter((l) => t.docs().diffIds.includes(l.diffId)).every((l) => l.usedBy === 1), 60_000, 200);
    expect((await blobFiles()).filter((f) => blobs.includes(f)), 'kept for ns-b\'s snapshots').to.deep.equal([...blobs].sort());
    await ctr('ns-b', 'images', 'rm', t.ref());
    await t.env().gc();
    await waitFor('the layers removed', async () => (await t.layers()).every((l) => !t.docs().diffIds.includes(l.diffId)), 60_000, 200);
    expect((await blobFiles()).filter((f) => blobs.includes(f)), 'the blobs went with their layers').to.deep.equal([]);
  });
});

describe('containerd: with containerd\'s content store out of reach, unpacked layers are stored from their directories', function () {
  this.timeout(600_000);
  const t = setUp('layerd-diffid-fallback-', ['--containerd-socket', '/nonexistent/containerd.sock']);

  it('stores each layer once under layerd\'s own diffID and logs why', async () => {
    const { diffIds } = t.docs();
    const logStart = t.env().layerd!.log().length;
    await t.env().ctrOk(['images', 'pull', '--plain-http', '--snapshotter', 'layerd', t.ref()], { timeoutMs: 300_000 });
    await waitFor('the three layers ingested', async () => t.logged(logStart, /unpack snapshot layer ingested/).length >= 3, 120_000, 200);
    const why = t.logged(logStart, /not from containerd's original blob/);
    expect(why, 'a reason per layer').to.have.length(3);
    for (const line of why) expect(line).to.match(/content store could not be asked/).and.to.include('/nonexistent/containerd.sock');
    const stored = (await t.layers()).map((l) => l.diffId);
    expect(stored).to.have.length(3);
    // (the rebuilt tars are not byte for byte the image's: layerd's own diffIDs)
    expect(stored.filter((d) => diffIds.includes(d)), 'no layer has the image\'s diffID').to.deep.equal([]);
    const out = await t.env().runScript(t.ref(), 'py42', 'python3 -c "print(42)"', { timeoutMs: 300_000 });
    expect(out.trim()).to.equal('42');
  });
});
