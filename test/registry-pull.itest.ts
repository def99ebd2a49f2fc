/**
 * `layerctl pull` from a real registry (Debian's docker-registry 2.8.2):
 * every manifest kind the corpus can be pushed as, platform choice from
 * OCI indexes and Docker manifest lists, and the result compared with a
 * local import of the same image — same image id where the bytes are the
 * same, same layers (diffIDs, blobs, sizes, entries) always.
 */
import { expect } from 'chai';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { join } from 'node:path';
import { REQUEST_CHANNEL, type RequestEvent } from '../storage/registry/client.js';
import { pullImage } from '../storage/registry/pull.js';
import { Store } from '../storage/store.js';
import { BUSYBOX, DEBIAN_MULTI, execFileAsync, layerctl, layerctlJson, scratch } from './support/env.js';
import { TestRegistry, layerctlR, layerctlRJson, pushCorpus } from './support/registry.js';

interface InspectLayer { position: number; diffId: string; digest: string | null; mediaType: string; size: number; uncompressedSize: number; entries: number }
interface Inspect { Id: string; Platform: string; IndexDigest: string | null; RootFS: { Layers: string[] }; Layers: InspectLayer[]; RepoTags: string[] }

const DM_LATEST = 'sha256:92865d204ee2bff5d5f8811ded92a9c70145095b9b829dc1137bb5b668a745fd';
const BB_AMD64 = 'sha256:f294e8831b3c83087aee00afce2b4c7d5b8d71c07349384aa7a7160d3eb638c8';
const BB_ARM64 = 'sha256:985f29e218faaa4a98ef2c567079ea14d80683566295098960de17cc630b0cb1';

/** The layer facts that do not depend on the manifest format. */
function layerFacts(info: Inspect): Omit<InspectLayer, 'mediaType'>[] {
  return info.Layers.map(({ mediaType: _m, ...rest }) => rest);
}

describe('registry pull (docker-registry 2.8.2)', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let localDm: Inspect;
  let n = 0;
  const freshRoot = (): string => join(work.dir, `store-${n++}`);

  before(async () => {
    work = await scratch('layerd-registry-pull-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    await pushCorpus(registry.host, ['debian-multi:latest', 'debian-multi:zstd', 'debian-multi:v2s2', 'debian-multiarch:latest', 'debian-multiarch:docker-list', 'busybox:latest'], work.dir);
    const root = freshRoot();
    await layerctlJson(['--root', root, 'import', DEBIAN_MULTI]);
    localDm = await layerctlJson<Inspect>(['--root', root, 'inspect', 'debian-multi:latest']);
  });
  after(async () => {
    await registry?.stop();
    await work?.remove();
  });

  /** Pull REF into a fresh store and inspect it by the name it is stored under. */
  async function pull(ref: string, ...extra: string[]): Promise<{ root: string; info: Inspect }> {
    const root = freshRoot();
    const pulled = await layerctlRJson<{ id: string; refs: string[] }[]>(['--root', root, 'pull', ref, ...extra]);
    expect(pulled).to.have.length(1);
    const info = await layerctlJson<Inspect>(['--root', root, 'inspect', pulled[0]!.refs[0] ?? pulled[0]!.id]);
    const fsck = await layerctl(['--root', root, 'fsck']);
    expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    return { root, info };
  }

  /** Copy what the registry serves for REF into an OCI layout with skopeo and import that locally. */
  async function localTwin(ref: string, tag: string, all: boolean, platform?: string): Promise<Inspect> {
    const layout = join(work.dir, `twin-${n++}`);
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--src-tls-verify=false', ...(all ? ['--all'] : []), `docker://${ref}`, `oci:${layout}:${tag}`]);
    const root = freshRoot();
    await layerctlJson(['--root', root, 'import', layout, '--name', 'twin', ...(platform ? ['--platform', platform] : [])]);
    return layerctlJson<Inspect>(['--root', root, 'inspect', `twin:${tag}`]);
  }

  it('OCI manifest, gzip layers: the same image as a local import, stored under the reference', async () => {
    const ref = `${registry.host}/corpus/debian-multi:latest`;
    const { info } = await pull(ref);
    expect(info.Id).to.equal(DM_LATEST);
    expect(info.RepoTags).to.deep.equal([ref]);
    expect(info.RootFS.Layers).to.deep.equal(localDm.RootFS.Layers);
    expect(info.Layers).to.deep.equal(localDm.Layers);
  });

  it('OCI manifest, zstd layers (skopeo --dest-compress-format zstd)', async () => {
    const ref = `${registry.host}/corpus/debian-multi:zstd`;
    const { info } = await pull(ref);
    const twin = await localTwin(ref, 'zstd', false);
    expect(info.Id).to.equal(twin.Id);
    expect(info.Layers).to.deep.equal(twin.Layers);
    expect(info.Layers.every((l) => l.mediaType.endsWith('+zstd'))).to.equal(true);
    expect(info.RootFS.Layers).to.deep.equal(localDm.RootFS.Layers);
  });

  it('Docker schema2 manifest (skopeo -f v2s2)', async () => {
    const { info } = await pull(`${registry.host}/corpus/debian-multi:v2s2`);
    expect(info.Id).to.equal('sha256:7a33870bd94d3b0661b951e985b1f288fda065aace211b5602299de761b34aae');
    expect(layerFacts(info)).to.deep.equal(layerFacts(localDm));
    expect(info.Layers.every((l) => l.mediaType === 'application/vnd.docker.image.rootfs.diff.tar.gzip')).to.equal(true);
  });

  it('multi-platform OCI index (skopeo --all): the host platform by default, another with --platform', async () => {
    const ref = `${registry.host}/corpus/debian-multiarch:latest`;
    const amd = await pull(ref);
    expect(amd.info.Id).to.equal(DM_LATEST);
    expect(amd.info.IndexDigest).to.match(/^sha256:/);
    expect(amd.info.Layers).to.deep.equal(localDm.Layers);
    const arm = await pull(ref, '--platform', 'linux/arm64/v8');
    const armTwin = await localTwin(ref, 'latest', true, 'linux/arm64/v8');
    expect(arm.info.Platform).to.equal('linux/arm64/v8');
    expect(arm.info.Id).to.equal(armTwin.Id);
    expect(arm.info.Layers).to.deep.equal(armTwin.Layers);
  });

  it('Docker manifest list (skopeo --all -f v2s2)', async () => {
    const ref = `${registry.host}/corpus/debian-multiarch:docker-list`;
    const { info } = await pull(ref);
    expect(info.Platform).to.equal('linux/amd64');
    expect(info.IndexDigest).to.match(/^sha256:/);
    expect(layerFacts(info)).to.deep.equal(layerFacts(localDm));
    const arm = await pull(ref, '--platform', 'linux/arm64');
    expect(arm.info.Platform).to.equal('linux/arm64/v8');
    expect(arm.info.RootFS.Layers).to.deep.equal(localDm.RootFS.Layers);
  });

  it('busybox index: amd64 by default, arm64 with --platform linux/arm64/v8, as a local import picks', async () => {
    const ref = `${registry.host}/corpus/busybox:latest`;
    for (const [platform, id] of [[undefined, BB_AMD64], ['linux/arm64/v8', BB_ARM64]] as const) {
      const { info } = await pull(ref, ...(platform ? ['--platform', platform] : []));
      const root = freshRoot();
      await layerctlJson(['--root', root, 'import', BUSYBOX, ...(platform ? ['--platform', platform] : [])]);
      const local = await layerctlJson<Inspect>(['--root', root, 'inspect', 'busybox:latest']);
      expect(info.Id).to.equal(id);
      expect(info.Id).to.equal(local.Id);
      expect(info.Layers).to.deep.equal(local.Layers);
      // The layout's `latest` names the index; pulled through the index, the image records it.
      expect(info.IndexDigest).to.match(/^sha256:df3d2da019a363fc2d5/);
    }
  });

  it('pulls by digest (verified against the digest), stored untagged', async () => {
    const root = freshRoot();
    const pulled = await layerctlRJson<{ id: string; refs: string[] }[]>(['--root', root, 'pull', `${registry.host}/corpus/busybox@${BB_ARM64}`]);
    expect(pulled[0]!.id).to.equal(BB_ARM64);
    expect(pulled[0]!.refs).to.deep.equal([]);
    const info = await layerctlJson<Inspect>(['--root', root, 'inspect', BB_ARM64]);
    expect(info.Platform).to.equal('linux/arm64/v8');
  });

  it('makes no request for blobs the store already has', async () => {
    const root = freshRoot();
    await layerctlJson(['--root', root, 'import', DEBIAN_MULTI]);
    const requests: RequestEvent[] = [];
    const listener = (message: unknown): void => { requests.push(message as RequestEvent); };
    subscribe(REQUEST_CHANNEL, listener);
    const store = await Store.open(root, { durability: 'none' });
    try {
      const result = await pullImage(store, `${registry.host}/corpus/debian-multi:latest`);
      expect(result[0]!.id).to.equal(DM_LATEST);
    } finally {
      store.close();
      unsubscribe(REQUEST_CHANNEL, listener);
    }
    expect(requests.map((r) => `${r.method} ${new URL(r.url).pathname}`)).to.deep.equal(['GET /v2/corpus/debian-multi/manifests/latest']);
    const info = await layerctlJson<Inspect>(['--root', root, 'inspect', `${registry.host}/corpus/debian-multi:latest`]);
    expect(info.Layers).to.deep.equal(localDm.Layers);
  });

  it('unknown tags and repositories are ENOTFOUND; bad references EINVAL', async () => {
    const root = freshRoot();
    const missing = await layerctlR(['--root', root, 'pull', `${registry.host}/corpus/debian-multi:nope`]);
    expect(missing.code, missing.stderr).to.equal(3);
    expect(missing.stderr).to.contain('ENOTFOUND');
    expect(missing.stderr).to.contain('corpus/debian-multi');
    const bad = await layerctlR(['--root', root, 'pull', `${registry.host}/Corpus/UPPER:latest`]);
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.contain('EINVAL');
  });
});
