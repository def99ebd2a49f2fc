/**
 * Pulls under faults: a registry killed in the middle of a 63 MB layer and
 * restarted (the download resumes with Range), a proxy that corrupts one
 * byte (EDIGEST, nothing partial in the store), 5xx answers (retried), a
 * schema1 answer (EUNSUPPORTED), and mirrors that are down or lack the image.
 */
import { expect } from 'chai';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { type ImportProgress } from '../storage/importer.js';
import { REQUEST_CHANNEL, type RequestEvent } from '../storage/registry/client.js';
import { pullImage } from '../storage/registry/pull.js';
import { pushImage } from '../storage/registry/push.js';
import { Store } from '../storage/store.js';
import { BUSYBOX, layerctl, layerctlJson, scratch } from './support/env.js';
import { TestRegistry, freePort, layerctlR, layerctlRJson, pushCorpus, startProxy } from './support/registry.js';

const DM_LATEST = 'sha256:92865d204ee2bff5d5f8811ded92a9c70145095b9b829dc1137bb5b668a745fd';
const BIG_LAYER = 'sha256:c03315e586d033da36cda954a86e572ab9f2601a0000dc3377c6baef8fcf8639';
const SMALL_LAYER = 'sha256:dd17963f6facdd5aa380bd5096c1233d3a57a73c168343b4875f369618766a96';

describe('registry pull under faults', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let n = 0;
  const freshRoot = (): string => join(work.dir, `store-${n++}`);

  before(async () => {
    work = await scratch('layerd-registry-faults-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    await pushCorpus(registry.host, ['debian-multi:latest', 'debian-multi:v2s2', 'busybox:latest'], work.dir);
  });
  after(async () => {
    await registry?.stop();
    await work?.remove();
  });

  async function expectCleanStore(root: string): Promise<void> {
    const fsck = await layerctl(['--root', root, 'fsck']);
    expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    expect(await readdir(join(root, 'tmp'))).to.deep.equal([]);
    expect(await layerctlJson<unknown[]>(['--root', root, 'images'])).to.deep.equal([]);
    expect(await readdir(join(root, 'blobs', 'sha256'))).to.deep.equal([]);
  }

  it('resumes a layer with Range after the registry is killed mid-download and restarted', async () => {
    const root = freshRoot();
    const requests: RequestEvent[] = [];
    const listener = (m: unknown): void => { requests.push(m as RequestEvent); };
    let restarted: Promise<void> | undefined;
    const onProgress = (e: ImportProgress): void => {
      if (restarted || e.type !== 'layer-progress' || e.digest !== BIG_LAYER || e.bytes < 8 << 20) return;
      // Synchronously SIGKILLed here, 8 MB into the 63 MB layer; back on the same port and storage soon after.
      restarted = registry.kill().then(() => sleep(300)).then(() => registry.restart());
    };
    subscribe(REQUEST_CHANNEL, listener);
    const store = await Store.open(root, { durability: 'none' });
    try {
      const result = await pullImage(store, `${registry.host}/corpus/debian-multi:latest`, { onProgress });
      expect(result[0]!.id).to.equal(DM_LATEST);
    } finally {
      store.close();
      unsubscribe(REQUEST_CHANNEL, listener);
      await restarted;
    }
    expect(restarted, 'the registry was killed').to.not.equal(undefined);
    const bigGets = requests.filter((r) => r.method === 'GET' && r.url.endsWith(`/blobs/${BIG_LAYER}`));
    const resumed = bigGets.filter((r) => r.headers['range'] !== undefined && r.status === 206);
    expect(resumed.length, JSON.stringify(bigGets)).to.be.greaterThan(0);
    const from = Number(/^bytes=(\d+)-$/.exec(resumed[0]!.headers['range']!)![1]);
    expect(from).to.be.greaterThanOrEqual(8 << 20);
    const fsck = await layerctl(['--root', root, 'fsck']);
    expect(fsck.code, fsck.stdout).to.equal(0);
  });

  it('a corrupted byte in a layer is EDIGEST and leaves nothing in the store', async () => {
    const proxy = await startProxy(registry.host, {
      mapChunk: (req, chunk, offset) => {
        if (!req.url?.endsWith(`/blobs/${SMALL_LAYER}`) || offset > 1000 || offset + chunk.length <= 1000) return chunk;
        const copy = Buffer.from(chunk);
        copy[1000 - offset] = copy[1000 - offset]! ^ 0x01;
        return copy;
      },
    });
    try {
      const root = freshRoot();
      const r = await layerctlR(['--root', root, 'pull', `${proxy.host}/corpus/debian-multi:latest`]);
      expect(r.code, r.stderr).to.equal(6);
      expect(r.stderr).to.contain('EDIGEST');
      expect(r.stderr).to.contain(SMALL_LAYER);
      await expectCleanStore(root);
    } finally {
      await proxy.close();
    }
  });

  it('a manifest that does not match Docker-Content-Digest (by tag) or its digest (by digest) is EDIGEST', async () => {
    const flip = (chunk: Buffer): Buffer => {
      const copy = Buffer.from(chunk);
      const at = copy.indexOf('"size":') + 7; // a digit of the first size: still JSON, different bytes
      copy[at] = copy[at] === 0x39 ? 0x38 : copy[at]! + 1;
      return copy;
    };
    const byTag = await startProxy(registry.host, {
      mapChunk: (req, chunk, offset) => (req.method === 'GET' && req.url?.endsWith('/manifests/latest') && offset === 0 ? flip(chunk) : chunk),
    });
    // The index comes by tag untouched; the chosen manifest, fetched by digest, is altered and unlabelled.
    const byDigest = await startProxy(registry.host, {
      responseHeaders: (req, headers) => {
        if (!/\/manifests\/sha256:/.test(req.url ?? '')) return headers;
        const { 'docker-content-digest': _dropped, ...rest } = headers;
        return rest;
      },
      mapChunk: (req, chunk, offset) => (/\/manifests\/sha256:/.test(req.url ?? '') && offset === 0 ? flip(chunk) : chunk),
    });
    try {
      for (const ref of [`${byTag.host}/corpus/debian-multi:latest`, `${byDigest.host}/corpus/busybox:latest`]) {
        const root = freshRoot();
        const r = await layerctlR(['--root', root, 'pull', ref]);
        expect(r.code, r.stderr).to.equal(6);
        expect(r.stderr).to.match(/EDIGEST: .*manifest.*digest mismatch/);
        await expectCleanStore(root);
      }
    } finally {
      await byTag.close();
      await byDigest.close();
    }
  });

  it('retries 5xx answers with backoff', async () => {
    const failed = new Map<string, number>();
    const proxy = await startProxy(registry.host, {
      intercept: (req, res) => {
        if (req.method !== 'GET' || !req.url?.includes('/blobs/')) return false;
        const count = failed.get(req.url) ?? 0;
        if (count >= 2) return false;
        failed.set(req.url, count + 1);
        res.writeHead(503, { 'content-type': 'text/plain' }).end('try later');
        return true;
      },
    });
    try {
      const root = freshRoot();
      const pulled = await layerctlRJson<{ id: string }[]>(['--root', root, 'pull', `${proxy.host}/corpus/debian-multi:latest`]);
      expect(pulled[0]!.id).to.equal(DM_LATEST);
      expect([...failed.values()]).to.deep.equal([2, 2, 2, 2, 2]); // config + 4 layers, each refused twice
    } finally {
      await proxy.close();
    }
  });

  it('a schema1 manifest is EUNSUPPORTED with a clear message', async () => {
    // Without schema2 in Accept, distribution 2.8 converts a schema2 manifest to signed schema1.
    const proxy = await startProxy(registry.host, {
      requestHeaders: (req) => ({ ...req.headers, accept: 'application/vnd.oci.image.manifest.v1+json' }),
    });
    try {
      const root = freshRoot();
      const r = await layerctlR(['--root', root, 'pull', `${proxy.host}/corpus/debian-multi:v2s2`]);
      expect(r.code, r.stderr).to.equal(6);
      expect(r.stderr).to.contain('EUNSUPPORTED');
      expect(r.stderr).to.contain('schema1');
      await expectCleanStore(root);
    } finally {
      await proxy.close();
    }
  });

  it('tries mirrors first and falls back to the registry', async () => {
    const dead = `127.0.0.1:${await freePort()}`;
    const mirror = await startProxy(registry.host);
    const empty = await startProxy(registry.host, {
      intercept: (req, res) => {
        if (req.url === '/v2/') return false;
        res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"not here"}]}');
        return true;
      },
    });
    try {
      const config = join(work.dir, 'mirrors.json');
      await writeFile(config, JSON.stringify({ registries: { [registry.host]: { mirrors: [dead, mirror.host] } } }));
      const root = freshRoot();
      const pulled = await layerctlRJson<{ id: string; refs: string[] }[]>(['--root', root, 'pull', '--registries-config', config, `${registry.host}/corpus/debian-multi:latest`]);
      expect(pulled[0]!.id).to.equal(DM_LATEST);
      expect(pulled[0]!.refs).to.deep.equal([`${registry.host}/corpus/debian-multi:latest`]);
      expect(mirror.seen.filter((s) => s.includes('/blobs/'))).to.have.length(5);

      await writeFile(config, JSON.stringify({ registries: { [registry.host]: { mirrors: [empty.host] } } }));
      const root2 = freshRoot();
      const again = await layerctlRJson<{ id: string }[]>(['--root', root2, 'pull', '--registries-config', config, `${registry.host}/corpus/debian-multi:latest`]);
      expect(again[0]!.id).to.equal(DM_LATEST);
      expect(empty.seen.some((s) => s.includes('/manifests/latest'))).to.equal(true);
    } finally {
      await mirror.close();
      await empty.close();
    }
  });

  it('a chunked upload that loses a PATCH asks the session where it stands and goes on', async () => {
    let patches = 0;
    const proxy = await startProxy(registry.host, {
      intercept: (req) => {
        if (req.method !== 'PATCH' || ++patches !== 2) return false;
        req.socket.destroy(); // the second chunk never arrives
        return true;
      },
    });
    try {
      const root = freshRoot();
      await layerctlJson(['--root', root, 'import', BUSYBOX]);
      const requests: RequestEvent[] = [];
      const listener = (m: unknown): void => { requests.push(m as RequestEvent); };
      subscribe(REQUEST_CHANNEL, listener);
      const store = await Store.open(root);
      try {
        // the 1.09 MB layer in 256 KiB chunks
        const result = await pushImage(store, 'busybox:amd64', `${proxy.host}/chunked/bb:1`, { chunkThreshold: 256 << 10, chunkSize: 256 << 10 });
        expect(result.blobs.map((b) => b.outcome)).to.deep.equal(['uploaded', 'uploaded']);
      } finally {
        store.close();
        unsubscribe(REQUEST_CHANNEL, listener);
      }
      const statusQueries = requests.filter((r) => r.method === 'GET' && r.url.includes('/blobs/uploads/'));
      expect(statusQueries.length).to.equal(1);
      const pulled = await layerctlRJson<{ id: string }[]>(['--root', freshRoot(), 'pull', `${registry.host}/chunked/bb:1`]);
      expect(pulled[0]!.id).to.equal('sha256:f294e8831b3c83087aee00afce2b4c7d5b8d71c07349384aa7a7160d3eb638c8');
    } finally {
      await proxy.close();
    }
  });
});
