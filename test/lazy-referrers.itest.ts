/**
 * The referrers API path of gzip-index artifacts (OCI distribution spec 1.1),
 * against a real registry (Debian's docker-registry 2.8.2 on 127.0.0.1, which
 * has no such API) behind a front that adds it (test/support/registryFronts.ts:
 * remembers pushed manifests with a `subject`, answers their PUT with
 * `OCI-Subject`, lists them at `GET /v2/<name>/referrers/<digest>` filtered
 * by `artifactType`, and can be made to list something else).
 *
 * Observable: `layerctl index` and `layerctl push` through a registry with
 * the API leave the listing to it (no `sha256-<hex>` tag is written);
 * `pull --lazy` finds the index through the API with no tag there and serves
 * the files; a listing that names an artifact of another image, or an
 * artifact whose index describes another layer, is refused: the image is
 * pulled in full, and the answer says why.
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { gzipSync } from 'node:zlib';
import { type Digest } from '../storage/digest.js';
import { publishGzipIndexes } from '../storage/lazy/gzipArtifact.js';
import { buildGzipIndex, parseGzipIndex } from '../storage/lazy/gzipIndex.js';
import { RegistryClient } from '../storage/registry/client.js';
import { EMPTY_CONFIG, endpointsFor } from '../storage/registry/config.js';
import { execFileAsync, scratch } from './support/env.js';
import { writeLayout } from './support/layoutBuilder.js';
import { TestRegistry, layerctlR } from './support/registry.js';
import { type ReferrersFront, startReferrersFront } from './support/registryFronts.js';
import { startLayerdServer, stopLayerdServer } from './fixtures/mount/harness.js';
import { dataDirTar } from './support/smallTar.js';

const ARTIFACT_TYPE = 'application/vnd.layerd.gzip-index.v1';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';

interface LazyPulled { images: { id: string; refs: string[] }[]; lazyLayers: string[]; fallback?: string; gzipIndex?: string }
interface Indexed { manifest: string; artifact?: string; listedBy?: string }

const gzipLayer = async (files: { path: string; bytes: Buffer }[]): Promise<Buffer> => gzipSync(await dataDirTar(files));

describe('lazy pull: gzip-index artifacts through the referrers API (a front on docker-registry 2.8.2)', function () {
  this.timeout(180_000);
  const APP = [{ path: 'data/hello.txt', bytes: Buffer.from('hello from the app layer\n') }, { path: 'data/blob.bin', bytes: randomBytes(1 << 20) }];
  const OTHER = [{ path: 'data/other.bin', bytes: randomBytes(256 * 1024) }];
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let front: ReferrersFront;
  let client: RegistryClient;
  const servers: { child: ChildProcess; mnt: string }[] = [];
  /** The app image's manifest digest and its index (once `layerctl index` published it). */
  let appManifest: string;
  let indexed: Indexed;

  async function pushLayout(files: { path: string; bytes: Buffer }[], repo: string): Promise<{ manifest: string; size: number }> {
    const layout = join(work.dir, `layout-${repo.replace(/\//g, '-')}`);
    const { manifestDigest } = await writeLayout(layout, { layers: [await gzipLayer(files)] });
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', `oci:${layout}:latest`, `docker://${registry.host}/${repo}:v1`]);
    const size = (await readFile(join(layout, 'blobs', 'sha256', manifestDigest.slice(7)))).length;
    return { manifest: manifestDigest, size };
  }

  async function registryStatus(path: string, accept = OCI_MANIFEST): Promise<number> {
    const res = await fetch(`http://${registry.host}/v2/${path}`, { headers: { accept } });
    await res.arrayBuffer();
    return res.status;
  }

  async function registryGet(path: string, accept = OCI_MANIFEST): Promise<Buffer> {
    const res = await fetch(`http://${registry.host}/v2/${path}`, { headers: { accept } });
    expect(res.status, path).to.equal(200);
    return Buffer.from(await res.arrayBuffer());
  }

  async function lazyPull(name: string, ref: string): Promise<LazyPulled> {
    const r = await layerctlR(['--root', join(work.dir, name), 'pull', '--lazy', ref, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    return JSON.parse(r.stdout) as LazyPulled;
  }

  before(async () => {
    work = await scratch('layerd-lazy-referrers-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    front = await startReferrersFront(registry.host);
    const [endpoint] = await endpointsFor(EMPTY_CONFIG, registry.host, false);
    client = new RegistryClient(endpoint!);
    appManifest = (await pushLayout(APP, 'ref/app')).manifest;
  });

  after(async () => {
    for (const s of servers.reverse()) await stopLayerdServer(s.child, s.mnt).catch(() => undefined);
    client?.close();
    await front?.close();
    await registry?.stop();
    await work?.remove();
  });

  it('layerctl index through a registry with the referrers API leaves the listing to it: no sha256-<hex> tag', async () => {
    const r = await layerctlR(['index', `${front.host}/ref/app:v1`, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    indexed = JSON.parse(r.stdout) as Indexed;
    expect(indexed.manifest).to.equal(appManifest);
    expect(indexed.listedBy).to.equal('referrers API');
    expect(front.subjectsProcessed).to.deep.equal([appManifest]);
    expect(await registryStatus(`ref/app/manifests/${indexed.artifact!}`), 'the artifact').to.equal(200);
    expect(await registryStatus(`ref/app/manifests/sha256-${appManifest.slice(7)}`), 'the referrers tag').to.equal(404);
    const listed = await fetch(`http://${front.host}/v2/ref/app/referrers/${appManifest}?artifactType=${encodeURIComponent(ARTIFACT_TYPE)}`);
    expect(listed.headers.get('oci-filters-applied')).to.equal('artifactType');
    expect(((await listed.json()) as { manifests: { digest: string }[] }).manifests.map((m) => m.digest)).to.deep.equal([indexed.artifact]);
  });

  it('pull --lazy finds the index through the referrers API, with no tag there, and serves the files', async () => {
    expect(indexed, 'the index test ran').to.not.equal(undefined);
    const ref = `${front.host}/ref/app:v1`;
    const before = front.seen.length;
    const pulled = await lazyPull('lazy-api', ref);
    expect(pulled.fallback).to.equal(undefined);
    expect(pulled.gzipIndex).to.equal('referrers API');
    expect(pulled.lazyLayers).to.have.length(1);
    const asked = front.seen.slice(before).map((s) => s.url);
    expect(asked).to.include(`/v2/ref/app/referrers/${appManifest}?artifactType=${encodeURIComponent(ARTIFACT_TYPE)}`);
    expect(asked.filter((u) => u.includes('/manifests/sha256-')), 'referrers tag lookups').to.deep.equal([]);

    const mnt = join(work.dir, 'mnt-api');
    const upper = join(work.dir, 'upper-api');
    await mkdir(mnt, { recursive: true });
    await mkdir(upper, { recursive: true });
    const child = await startLayerdServer(['--root', join(work.dir, 'lazy-api'), '--image', ref, '--upper', upper], mnt, process.env);
    servers.push({ child, mnt });
    for (const f of APP) expect((await readFile(join(mnt, f.path))).equals(f.bytes), f.path).to.equal(true);
  });

  it('layerctl push to a registry with the referrers API publishes the index through it: no sha256-<hex> tag', async () => {
    const root = join(work.dir, 'full');
    const pulled = await layerctlR(['--root', root, 'pull', `${registry.host}/ref/app:v1`]);
    expect(pulled.code, pulled.stderr).to.equal(0);
    const push = await layerctlR(['--root', root, 'push', `${registry.host}/ref/app:v1`, `${front.host}/ref/pushed:v1`, '--json']);
    expect(push.code, push.stderr).to.equal(0);
    const result = JSON.parse(push.stdout) as { digest: string; gzipIndexes?: { manifest: string; artifact: string; listedBy: string }[] };
    expect(result.gzipIndexes?.map((g) => ({ manifest: g.manifest, listedBy: g.listedBy }))).to.deep.equal([{ manifest: result.digest, listedBy: 'referrers API' }]);
    expect(front.subjectsProcessed).to.include(result.digest);
    expect(await registryStatus(`ref/pushed/manifests/sha256-${result.digest.slice(7)}`), 'the referrers tag').to.equal(404);
    const again = await lazyPull('lazy-pushed', `${front.host}/ref/pushed:v1`);
    expect(again.gzipIndex).to.equal('referrers API');
    expect(again.lazyLayers).to.have.length(1);
  });

  it('refuses a referrers answer naming an artifact of another image: pulled in full, and says why', async () => {
    const other = await pushLayout(OTHER, 'ref/forged-subject');
    // A genuine index of this image's layer, but in an artifact whose subject is the app image, listed as this image's.
    const manifest = JSON.parse((await registryGet(`ref/forged-subject/manifests/${other.manifest}`)).toString()) as { layers: { digest: string }[] };
    const index = await buildGzipIndex(Readable.from([await registryGet(`ref/forged-subject/blobs/${manifest.layers[0]!.digest}`)]), 'other layer');
    const app = await registryGet(`ref/app/manifests/${appManifest}`);
    const dir = join(work.dir, 'forge-subject');
    await mkdir(dir);
    const misplaced = await publishGzipIndexes(client, 'ref/forged-subject', { mediaType: OCI_MANIFEST, digest: appManifest as Digest, size: app.length }, [index], dir);
    front.forge('ref/forged-subject', other.manifest, [{ mediaType: OCI_MANIFEST, digest: misplaced.digest, size: misplaced.size, artifactType: ARTIFACT_TYPE }]);

    const pulled = await lazyPull('forged-subject', `${front.host}/ref/forged-subject:v1`);
    expect(pulled.lazyLayers).to.deep.equal([]);
    expect(pulled.fallback).to.match(/no gzip index .*pulled in full/);
    expect(front.seen.map((s) => s.url)).to.include(`/v2/ref/forged-subject/manifests/${misplaced.digest}`);
  });

  it('refuses a referrers answer naming an artifact whose index describes another layer: pulled in full, and says why', async () => {
    expect(indexed, 'the index test ran').to.not.equal(undefined);
    const other = await pushLayout(OTHER, 'ref/forged-layer');
    const manifest = JSON.parse((await registryGet(`ref/forged-layer/manifests/${other.manifest}`)).toString()) as { layers: { digest: string }[] };
    // The app layer's genuine index, claimed for this image's layer (the annotation names it), subject: this image.
    const artifact = JSON.parse((await registryGet(`ref/app/manifests/${indexed.artifact!}`)).toString()) as { layers: { digest: string }[] };
    const index = parseGzipIndex(await registryGet(`ref/app/blobs/${artifact.layers[0]!.digest}`), 'app index');
    index.layer.digest = manifest.layers[0]!.digest as Digest;
    const dir = join(work.dir, 'forge-layer');
    await mkdir(dir);
    const forged = await publishGzipIndexes(client, 'ref/forged-layer', { mediaType: OCI_MANIFEST, digest: other.manifest as Digest, size: other.size }, [index], dir);
    front.forge('ref/forged-layer', other.manifest, [{ mediaType: OCI_MANIFEST, digest: forged.digest, size: forged.size, artifactType: ARTIFACT_TYPE }]);

    const pulled = await lazyPull('forged-layer', `${front.host}/ref/forged-layer:v1`);
    expect(pulled.lazyLayers).to.deep.equal([]);
    expect(pulled.fallback).to.match(/gzip index .*cannot be used .*describes layer .*pulled in full/);
  });
});
