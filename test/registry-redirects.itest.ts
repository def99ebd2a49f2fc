/**
 * Pull and push through a registry that redirects, as Docker Hub, ECR,
 * GCR, GHCR and S3-backed distribution do: a password-protected front
 * answers manifest and blob requests with 307/302/301/308 to a separate
 * storage host (another host:port) that serves the bytes, and hands out
 * upload Locations on that host. The registry's Authorization must reach
 * the front and never the storage host; a layer cut off mid-way resumes
 * with Range through the redirect. Redirect loops and endless chains are
 * clear errors.
 */
import { expect } from 'chai';
import { mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pullImage } from '../storage/registry/pull.js';
import { pushImage } from '../storage/registry/push.js';
import { checkRegistriesConfig } from '../storage/registry/config.js';
import { MAX_REDIRECTS } from '../storage/registry/client.js';
import { Store } from '../storage/store.js';
import { BUSYBOX, layerctl, layerctlJson, scratch } from './support/env.js';
import { startDaemon } from './support/daemon.js';
import { TestRegistry, layerctlR, layerctlRJson, pushCorpus } from './support/registry.js';
import { type RedirectingFront, type StorageHost, type TestServer, startLoopingServer, startRedirectingFront, startStorageHost } from './support/registryFronts.js';

const DM_LATEST = 'sha256:92865d204ee2bff5d5f8811ded92a9c70145095b9b829dc1137bb5b668a745fd';
const BIG_LAYER = 'sha256:c03315e586d033da36cda954a86e572ab9f2601a0000dc3377c6baef8fcf8639';
const BB_AMD64 = 'sha256:f294e8831b3c83087aee00afce2b4c7d5b8d71c07349384aa7a7160d3eb638c8';

describe('registry redirects (a front redirecting to a storage host)', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let storage: StorageHost;
  let front: RedirectingFront;
  let configFile: string;
  let n = 0;
  const freshRoot = (): string => join(work.dir, `store-${n++}`);

  before(async () => {
    work = await scratch('layerd-registry-redirects-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    await pushCorpus(registry.host, ['debian-multi:latest'], work.dir);
    storage = await startStorageHost(registry.host);
    front = await startRedirectingFront(registry.host, storage, 'alice', 's3cret');
    configFile = join(work.dir, 'registries.json');
    await writeFile(configFile, JSON.stringify({ registries: { [front.host]: { username: 'alice', password: 's3cret' } } }));
  });
  after(async () => {
    await front?.close();
    await storage?.close();
    await registry?.stop();
    await work?.remove();
  });

  it('pulls through 307/302/301/308 redirects; Authorization reaches the front only; a cut layer resumes with Range on the storage host', async () => {
    front.seen.length = 0;
    storage.seen.length = 0;
    storage.cutOnce(BIG_LAYER, 8 << 20);
    const root = freshRoot();
    const store = await Store.open(root, { durability: 'none' });
    try {
      const config = checkRegistriesConfig({ registries: { [front.host]: { username: 'alice', password: 's3cret' } } });
      const result = await pullImage(store, `${front.host}/corpus/debian-multi:latest`, { config });
      expect(result[0]!.id).to.equal(DM_LATEST);
    } finally {
      store.close();
    }
    expect(new Set(front.statuses)).to.deep.equal(new Set([307, 302, 301, 308]));
    // The front saw the password on everything it served (after its 401); the storage host never did.
    expect(front.seen.filter((r) => r.authorization !== undefined).length).to.be.greaterThan(0);
    expect(storage.seen.map((r) => r.authorization)).to.deep.equal(storage.seen.map(() => undefined));
    expect(storage.seen.some((r) => r.url.includes('/manifests/'))).to.equal(true);
    const bigGets = storage.seen.filter((r) => r.method === 'GET' && r.url.endsWith(`/blobs/${BIG_LAYER}`));
    expect(bigGets.length, JSON.stringify(bigGets)).to.be.greaterThanOrEqual(2);
    expect(bigGets[0]!.range).to.equal(undefined);
    const resumedFrom = Number(/^bytes=(\d+)-$/.exec(bigGets[bigGets.length - 1]!.range ?? '')?.[1]);
    expect(resumedFrom).to.be.greaterThan(0);
    expect(resumedFrom).to.be.at.most(8 << 20);
    expect(await readdir(join(root, 'tmp'))).to.deep.equal([]);
  });

  it('layerctl --root pulls through the redirects too', async () => {
    const pulled = await layerctlRJson<{ id: string }[]>(['--root', freshRoot(), 'pull', '--registries-config', configFile, `${front.host}/corpus/debian-multi:latest`]);
    expect(pulled[0]!.id).to.equal(DM_LATEST);
  });

  it('the daemon pulls through the redirects with its registries config', async () => {
    const dir = join(work.dir, `daemon-${n++}`);
    const daemonConfig = join(dir, 'layerd.json');
    await mkdir(dir);
    await writeFile(daemonConfig, JSON.stringify({ registriesConfig: configFile }));
    const daemon = await startDaemon(dir, ['--config', daemonConfig, '--mount-root', join(dir, 'mounts')]);
    try {
      storage.seen.length = 0;
      const r = await layerctl(['--socket', daemon.socket, 'pull', `${front.host}/corpus/debian-multi:latest`, '--json']);
      expect(r.code, r.stderr).to.equal(0);
      expect((JSON.parse(r.stdout) as { id: string }[])[0]!.id).to.equal(DM_LATEST);
      expect(storage.seen.length).to.be.greaterThan(0);
      expect(storage.seen.map((s) => s.authorization)).to.deep.equal(storage.seen.map(() => undefined));
    } finally {
      await daemon.stop();
    }
  });

  it('pushes with upload Locations on the storage host, without sending it the Authorization', async () => {
    front.seen.length = 0;
    storage.seen.length = 0;
    const root = freshRoot();
    await layerctlJson(['--root', root, 'import', BUSYBOX]);
    const store = await Store.open(root);
    try {
      const config = checkRegistriesConfig({ registries: { [front.host]: { username: 'alice', password: 's3cret' } } });
      const result = await pushImage(store, 'busybox:amd64', `${front.host}/redirected/bb:1`, { config });
      expect(result.blobs.map((b) => b.outcome)).to.deep.equal(['uploaded', 'uploaded']);
    } finally {
      store.close();
    }
    expect(front.seen.filter((r) => r.method === 'POST').every((r) => r.authorization !== undefined)).to.equal(true);
    const uploads = storage.seen.filter((r) => r.method === 'PUT' && r.url.includes('/blobs/uploads/'));
    // The image's layer and config, then its gzip-index artifact's empty config and index.
    expect(uploads).to.have.length(4);
    expect(storage.seen.map((r) => r.authorization)).to.deep.equal(storage.seen.map(() => undefined));
    const back = await layerctlRJson<{ id: string }[]>(['--root', freshRoot(), 'pull', `${registry.host}/redirected/bb:1`]);
    expect(back[0]!.id).to.equal(BB_AMD64);
  });

  describe('loops and endless chains', () => {
    let looping: TestServer;
    before(async () => { looping = await startLoopingServer(); });
    after(async () => { await looping?.close(); });

    it('a redirect loop and more than MAX_REDIRECTS redirects are EFORMAT errors saying so; nothing is left in tmp/', async () => {
      const root = freshRoot();
      const loop = await layerctlR(['--root', root, 'pull', `${looping.host}/loop/x:latest`]);
      expect(loop.code, loop.stderr).to.equal(6);
      expect(loop.stderr).to.match(/EFORMAT: registry 127\.0\.0\.1:\d+: GET \S+\/v2\/loop\/x\/manifests\/latest: redirect loop/);
      const chain = await layerctlR(['--root', root, 'pull', `${looping.host}/chain/x:latest`]);
      expect(chain.code, chain.stderr).to.equal(6);
      expect(chain.stderr).to.contain(`more than ${MAX_REDIRECTS} redirects`);
      const hops = looping.seen.filter((r) => r.url.startsWith('/v2/chain/'));
      expect(hops).to.have.length(MAX_REDIRECTS + 1);
      expect(await readdir(join(root, 'tmp'))).to.deep.equal([]);
    });
  });
});
