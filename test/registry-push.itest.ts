/**
 * `layerctl push` to a real registry, checked with an independent client
 * (skopeo copy back to an OCI layout, skopeo inspect) and by pulling the
 * result again into a fresh store.
 */
import { expect } from 'chai';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { REQUEST_CHANNEL, type RequestEvent } from '../storage/registry/client.js';
import { pushImage } from '../storage/registry/push.js';
import { Store } from '../storage/store.js';
import { DEBIAN_MULTI, execFileAsync, layerctl, layerctlJson, scratch } from './support/env.js';
import { TestRegistry, layerctlRJson, pushCorpus } from './support/registry.js';

interface InspectLayer { diffId: string; digest: string | null; mediaType: string; size: number; uncompressedSize: number; entries: number }
interface Inspect { Id: string; Platform: string; RootFS: { Layers: string[] }; Layers: InspectLayer[] }
interface PushResult { ref: string; digest: string; mediaType: string; manifests: { digest: string; rewritten: boolean }[]; blobs: { digest: string; outcome: string }[] }
interface SkopeoInspect { Digest: string; Layers: string[]; LayersData?: { MIMEType: string; Digest: string }[] }

const DM_LATEST = 'sha256:92865d204ee2bff5d5f8811ded92a9c70145095b9b829dc1137bb5b668a745fd';
const BB_INDEX = /^sha256:df3d2da019a363fc2d5/;

describe('registry push (docker-registry 2.8.2)', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let n = 0;
  const freshRoot = (): string => join(work.dir, `store-${n++}`);

  before(async () => {
    work = await scratch('layerd-registry-push-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
  });
  after(async () => {
    await registry?.stop();
    await work?.remove();
  });

  async function skopeoBack(ref: string): Promise<{ layout: string; inspect: SkopeoInspect; diffIds: string[] }> {
    const layout = join(work.dir, `back-${n++}`);
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--src-tls-verify=false', `docker://${ref}`, `oci:${layout}:back`]);
    const inspect = JSON.parse((await execFileAsync('skopeo', ['inspect', `oci:${layout}:back`])).stdout) as SkopeoInspect;
    const config = JSON.parse((await execFileAsync('skopeo', ['inspect', '--config', `oci:${layout}:back`])).stdout) as { rootfs: { diff_ids: string[] } };
    return { layout, inspect, diffIds: config.rootfs.diff_ids };
  }

  async function pullFresh(ref: string, ...extra: string[]): Promise<Inspect> {
    const root = freshRoot();
    const pulled = await layerctlRJson<{ id: string }[]>(['--root', root, 'pull', ref, ...extra]);
    const info = await layerctlJson<Inspect>(['--root', root, 'inspect', pulled[0]!.id]);
    expect((await layerctl(['--root', root, 'fsck'])).code).to.equal(0);
    return info;
  }

  it('pushes an imported OCI image unchanged (the 63 MB layer in chunks); skopeo and a fresh pull agree', async () => {
    const root = freshRoot();
    await layerctlJson(['--root', root, 'import', DEBIAN_MULTI]);
    const local = await layerctlJson<Inspect>(['--root', root, 'inspect', 'debian-multi:latest']);
    const requests: RequestEvent[] = [];
    const listener = (m: unknown): void => { requests.push(m as RequestEvent); };
    subscribe(REQUEST_CHANNEL, listener);
    const store = await Store.open(root);
    let result;
    try {
      // Only the image's own uploads counted: no gzip-index artifact (test/lazy-gzip.itest.ts has those).
      result = await pushImage(store, 'debian-multi:latest', `${registry.host}/pushed/dm:v1`, { chunkThreshold: 8 << 20, chunkSize: 5 << 20, gzipIndex: false });
    } finally {
      store.close();
      unsubscribe(REQUEST_CHANNEL, listener);
    }
    expect(result.digest).to.equal(DM_LATEST);
    expect(result.manifests[0]!.rewritten).to.equal(false);
    expect(result.blobs.map((b) => b.outcome)).to.deep.equal(['uploaded', 'uploaded', 'uploaded', 'uploaded', 'uploaded']);
    // 63 MB and 13.9 MB in 5 MiB chunks, each PATCH to the Location the previous answer named
    const patches = requests.filter((r) => r.method === 'PATCH');
    expect(patches.length).to.equal(Math.ceil(62_929_380 / (5 << 20)) + Math.ceil(13_866_667 / (5 << 20)));
    expect(new Set(patches.map((p) => p.url)).size).to.equal(patches.length);
    expect(requests.filter((r) => r.method === 'PUT' && r.url.includes('/blobs/uploads/'))).to.have.length(5);

    const back = await skopeoBack(`${registry.host}/pushed/dm:v1`);
    expect(back.inspect.Digest).to.equal(DM_LATEST);
    expect(back.inspect.Layers).to.deep.equal(local.Layers.map((l) => l.digest));
    expect(back.diffIds).to.deep.equal(local.RootFS.Layers);
    const pulled = await pullFresh(`${registry.host}/pushed/dm:v1`);
    expect(pulled.Id).to.equal(local.Id);
    expect(pulled.Layers).to.deep.equal(local.Layers);

    // a second push finds everything there
    const again = await layerctlRJson<PushResult>(['--root', root, 'push', 'debian-multi:latest', `${registry.host}/pushed/dm:v2`]);
    expect(again.blobs.every((b) => b.outcome === 'exists')).to.equal(true);
  });

  it('a docker-save import (uncompressed blobs) is pushed gzip-compressed, with its diff_ids unchanged', async () => {
    const archive = join(work.dir, 'dm.docker.tar');
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', `oci:${DEBIAN_MULTI}:latest`, `docker-archive:${archive}:corpus/debian-multi:latest`]);
    const root = freshRoot();
    await layerctlJson(['--root', root, 'import', archive, '--name', 'dm']);
    const local = await layerctlJson<Inspect>(['--root', root, 'inspect', 'dm:latest']);
    expect(local.Layers.map((l) => l.digest)).to.deep.equal(local.RootFS.Layers); // stored blobs are the tars

    const gz = await layerctlRJson<PushResult>(['--root', root, 'push', 'dm:latest', `${registry.host}/pushed/from-archive:gzip`]);
    expect(gz.manifests[0]!.rewritten).to.equal(true);
    expect(gz.mediaType).to.equal('application/vnd.docker.distribution.manifest.v2+json');
    const back = await skopeoBack(`${registry.host}/pushed/from-archive:gzip`);
    expect(back.diffIds).to.deep.equal(local.RootFS.Layers);
    for (const d of back.inspect.Layers) expect(local.RootFS.Layers).to.not.include(d);
    const pulled = await pullFresh(`${registry.host}/pushed/from-archive:gzip`);
    expect(pulled.RootFS.Layers).to.deep.equal(local.RootFS.Layers);
    expect(pulled.Layers.map((l) => l.mediaType)).to.deep.equal(Array(4).fill('application/vnd.docker.image.rootfs.diff.tar.gzip'));
    expect(pulled.Layers.map((l) => [l.diffId, l.entries, l.uncompressedSize])).to.deep.equal(local.Layers.map((l) => [l.diffId, l.entries, l.uncompressedSize]));

    const zstd = await layerctlRJson<PushResult>(['--root', root, 'push', '--compress', 'zstd', 'dm:latest', `${registry.host}/pushed/from-archive:zstd`]);
    expect(zstd.mediaType).to.equal('application/vnd.oci.image.manifest.v1+json');
    const zback = await skopeoBack(`${registry.host}/pushed/from-archive:zstd`);
    expect(zback.diffIds).to.deep.equal(local.RootFS.Layers);
    const manifest = JSON.parse(await readFile(join(zback.layout, 'blobs', 'sha256', zback.inspect.Digest.slice(7)), 'utf8')) as { layers: { mediaType: string }[] };
    expect(manifest.layers.map((l) => l.mediaType)).to.deep.equal(Array(4).fill('application/vnd.oci.image.layer.v1.tar+zstd'));
    const zpulled = await pullFresh(`${registry.host}/pushed/from-archive:zstd`);
    expect(zpulled.RootFS.Layers).to.deep.equal(local.RootFS.Layers);
  });

  it('a store keeping layers as skeleton + objects pushes the imported blobs as they are, and a commit\'s layer rebuilt from its skeleton', async () => {
    const root = freshRoot();
    const env = { LAYERD_LAYER_FORMAT: 'skeleton' };
    await layerctlRJson(['--root', root, 'import', DEBIAN_MULTI], env);
    const change = join(work.dir, `change-${n++}`);
    await mkdir(join(change, 'etc'), { recursive: true });
    await writeFile(join(change, 'etc', 'motd'), 'changed by a commit\n');
    await layerctlRJson(['--root', root, 'commit', '--layer-dir', change, 'debian-multi:latest', 'mine:v1'], env);
    const local = await layerctlJson<Inspect>(['--root', root, 'inspect', 'mine:v1']);
    const tar = join(root, 'layers', 'sha256', local.RootFS.Layers[4]!.slice(7), 'layer.tar');
    expect(await readFile(tar).then(() => 'present', (err: NodeJS.ErrnoException) => err.code)).to.equal('ENOENT'); // skeleton + objects: no tar to send
    const imported = await layerctlJson<Inspect>(['--root', root, 'inspect', 'debian-multi:latest']);

    const pushed = await layerctlRJson<PushResult>(['--root', root, 'push', 'mine:v1', `${registry.host}/pushed/skeleton:v1`], env);
    const back = await skopeoBack(`${registry.host}/pushed/skeleton:v1`);
    expect(back.diffIds).to.deep.equal(local.RootFS.Layers);
    // The corpus's own blobs, byte for byte; the commit's layer compressed from the tar its skeleton rebuilds.
    expect(back.inspect.Layers.slice(0, 4)).to.deep.equal(imported.Layers.map((l) => l.digest));
    expect(pushed.manifests[0]!.rewritten).to.equal(true);
    const pulled = await pullFresh(`${registry.host}/pushed/skeleton:v1`);
    expect(pulled.RootFS.Layers).to.deep.equal(local.RootFS.Layers);
  });

  it('mounts blobs from the repository an image was pulled from', async () => {
    await pushCorpus(registry.host, ['debian-multi:latest'], work.dir);
    const root = freshRoot();
    await layerctlRJson(['--root', root, 'pull', `${registry.host}/corpus/debian-multi:latest`]);
    const result = await layerctlRJson<PushResult>(['--root', root, 'push', `${registry.host}/corpus/debian-multi:latest`, `${registry.host}/mounted/dm:latest`]);
    expect(result.digest).to.equal(DM_LATEST);
    expect(result.blobs.map((b) => b.outcome)).to.deep.equal(Array(5).fill('mounted'));
    expect((await pullFresh(`${registry.host}/mounted/dm:latest`)).Id).to.equal(DM_LATEST);
  });

  it('pushes the multi-platform index when the store holds all its manifests, else just the image', async () => {
    // A local import of the busybox layout records its per-platform tags without the index,
    // so the store gets the index by pulling the image for both platforms.
    await pushCorpus(registry.host, ['busybox:latest'], work.dir);
    const root = freshRoot();
    const source = `${registry.host}/corpus/busybox:latest`;
    await layerctlRJson(['--root', root, 'pull', source]);
    const single = await layerctlRJson<PushResult>(['--root', root, 'push', source, `${registry.host}/pushed/bb:single`]);
    expect(single.manifests).to.have.length(1);
    expect(single.mediaType).to.equal('application/vnd.oci.image.manifest.v1+json');

    await layerctlRJson(['--root', root, 'pull', source, '--platform', 'linux/arm64/v8']);
    const both = await layerctlRJson<PushResult>(['--root', root, 'push', source, `${registry.host}/pushed/bb:multi`]);
    expect(both.digest).to.match(BB_INDEX);
    expect(both.mediaType).to.equal('application/vnd.oci.image.index.v1+json');
    expect(both.manifests).to.have.length(2);
    expect((await pullFresh(`${registry.host}/pushed/bb:multi`, '--platform', 'linux/arm64/v8')).Platform).to.equal('linux/arm64/v8');
    expect((await pullFresh(`${registry.host}/pushed/bb:multi`)).Platform).to.equal('linux/amd64');
  });
});
