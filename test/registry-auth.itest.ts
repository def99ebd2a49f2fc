/**
 * Authentication and TLS against real servers: a docker-registry with
 * HTTPS (a CA made by the test with openssl) and htpasswd (Basic auth), and
 * the Bearer token flow. For the token flow the test runs a small token
 * service and an authenticating front (node:http) that challenges with
 * `WWW-Authenticate: Bearer realm=..,service=..,scope=..`, checks the token
 * it issued and then passes the request on to a real registry — lighter
 * than a registry with `auth: token` and its certificate bundle.
 */
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import http from 'node:http';
import { join } from 'node:path';
import { BUSYBOX, layerctlJson, scratch } from './support/env.js';
import { TestRegistry, layerctlR, layerctlRJson, makeTlsAndHtpasswd, pushCorpus, startProxy } from './support/registry.js';

const BB_AMD64 = 'sha256:f294e8831b3c83087aee00afce2b4c7d5b8d71c07349384aa7a7160d3eb638c8';

describe('registry authentication and TLS', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let n = 0;
  const freshRoot = (): string => join(work.dir, `store-${n++}`);
  const writeConfig = async (value: unknown): Promise<string> => {
    const path = join(work.dir, `registries-${n++}.json`);
    await writeFile(path, JSON.stringify(value));
    return path;
  };

  before(async () => { work = await scratch('layerd-registry-auth-'); });
  after(async () => { await work?.remove(); });

  describe('HTTPS with a private CA + htpasswd (Basic)', () => {
    let registry: TestRegistry;
    let caFile: string;
    before(async () => {
      const made = await makeTlsAndHtpasswd(join(work.dir, 'tls'), 'alice', 's3cret');
      caFile = made.tls.caCert;
      registry = await TestRegistry.start(join(work.dir, 'tls-registry'), { tls: made.tls, htpasswd: made.htpasswd });
    });
    after(async () => { await registry?.stop(); });

    it('pushes and pulls with the CA and the credentials from the registries config', async () => {
      const config = await writeConfig({ registries: { [registry.host]: { caFile, username: 'alice', password: 's3cret' } } });
      const root = freshRoot();
      await layerctlJson(['--root', root, 'import', BUSYBOX]);
      const pushed = await layerctlRJson<{ digest: string }>(['--root', root, 'push', '--registries-config', config, 'busybox:amd64', `${registry.host}/auth/bb:1`]);
      expect(pushed.digest).to.equal(BB_AMD64);
      const pulled = await layerctlRJson<{ id: string }[]>(['--root', freshRoot(), 'pull', '--registries-config', config, `${registry.host}/auth/bb:1`]);
      expect(pulled[0]!.id).to.equal(BB_AMD64);
    });

    it('a wrong password, or none, is refused with EAUTH (reason unauthorized)', async () => {
      const wrong = await writeConfig({ registries: { [registry.host]: { caFile, username: 'alice', password: 'nope' } } });
      const r = await layerctlR(['--root', freshRoot(), 'pull', '--registries-config', wrong, `${registry.host}/auth/bb:1`]);
      expect(r.code, r.stderr).to.equal(8);
      expect(r.stderr).to.match(/EAUTH: registry 127\.0\.0\.1:\d+: username or password rejected/);
      const none = await writeConfig({ registries: { [registry.host]: { caFile } } });
      const r2 = await layerctlR(['--root', freshRoot(), 'pull', '--registries-config', none, `${registry.host}/auth/bb:1`]);
      expect(r2.code, r2.stderr).to.equal(8);
      expect(r2.stderr).to.contain('requires a username and password');
    });

    it('without the CA the certificate is not trusted (EIO), and HTTPS is used when insecure is false', async () => {
      const noCa = await writeConfig({ registries: { [registry.host]: { insecure: false, username: 'alice', password: 's3cret' } } });
      const r = await layerctlR(['--root', freshRoot(), 'pull', '--registries-config', noCa, `${registry.host}/auth/bb:1`]);
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stderr).to.contain('EIO');
      expect(r.stderr).to.match(/certificate/i);
    });
  });

  describe('Bearer token flow', () => {
    let registry: TestRegistry;
    let tokenServer: http.Server;
    let front: Awaited<ReturnType<typeof startProxy>>;
    const issued = new Map<string, string[]>();
    const tokenRequests: string[] = [];

    before(async () => {
      registry = await TestRegistry.start(join(work.dir, 'plain-registry'));
      await pushCorpus(registry.host, ['busybox:latest'], work.dir);
      tokenServer = http.createServer((req, res) => {
        const url = new URL(req.url ?? '/', 'http://token');
        tokenRequests.push(url.search);
        const expected = `Basic ${Buffer.from('bob:hunter2').toString('base64')}`;
        if (url.pathname !== '/token' || url.searchParams.get('service') !== 'layerd-test' || req.headers.authorization !== expected) {
          res.writeHead(401, { 'content-type': 'application/json' }).end('{"details":"bad credentials"}');
          return;
        }
        const token = randomBytes(16).toString('hex');
        issued.set(token, url.searchParams.getAll('scope'));
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token, expires_in: 300 }));
      });
      await new Promise<void>((resolve) => tokenServer.listen(0, '127.0.0.1', resolve));
      const address = tokenServer.address();
      const realm = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}/token`;
      front = await startProxy(registry.host, {
        intercept: (req, res) => {
          const repo = /^\/v2\/(.+?)\/(?:manifests|blobs|tags)\//.exec(req.url ?? '')?.[1];
          const scope = repo ? `repository:${repo}:pull` : '';
          const token = /^Bearer (\w+)$/.exec(req.headers.authorization ?? '')?.[1];
          const scopes = token ? issued.get(token) : undefined;
          if (scopes && (!repo || scopes.some((s) => s.startsWith(`repository:${repo}:`)))) return false;
          res.writeHead(401, {
            'content-type': 'application/json',
            'www-authenticate': `Bearer realm="${realm}",service="layerd-test"${scope ? `,scope="${scope}"` : ''}`,
          }).end('{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}');
          return true;
        },
      });
    });
    after(async () => {
      await front?.close();
      await new Promise<void>((resolve) => (tokenServer ? tokenServer.close(() => resolve()) : resolve()));
      await registry?.stop();
    });

    it('gets a token for the repository scope and pulls with it', async () => {
      const config = await writeConfig({ registries: { [front.host]: { username: 'bob', password: 'hunter2' } } });
      const pulled = await layerctlRJson<{ id: string }[]>(['--root', freshRoot(), 'pull', '--registries-config', config, `${front.host}/corpus/busybox:latest`]);
      expect(pulled[0]!.id).to.equal(BB_AMD64);
      expect(tokenRequests.at(-1)).to.contain('scope=repository%3Acorpus%2Fbusybox%3Apull');
      // one token for the whole pull: manifests, config and layer all reuse it
      expect(front.seen.filter((s) => s.includes('/corpus/busybox/')).length).to.be.greaterThan(3);
      expect(tokenRequests).to.have.length(1);
    });

    it('pushes with a pull,push token', async () => {
      const config = await writeConfig({ registries: { [front.host]: { username: 'bob', password: 'hunter2' } } });
      const root = freshRoot();
      await layerctlJson(['--root', root, 'import', BUSYBOX]);
      const pushed = await layerctlRJson<{ digest: string }>(['--root', root, 'push', '--registries-config', config, 'busybox:amd64', `${front.host}/bearer/bb:1`]);
      expect(pushed.digest).to.equal(BB_AMD64);
      expect(tokenRequests.some((q) => q.includes('scope=repository%3Abearer%2Fbb%3Apull%2Cpush'))).to.equal(true);
      const pulled = await layerctlRJson<{ id: string }[]>(['--root', freshRoot(), 'pull', `${registry.host}/bearer/bb:1`]);
      expect(pulled[0]!.id).to.equal(BB_AMD64);
    });

    it('credentials the token service refuses are EAUTH (reason unauthorized)', async () => {
      const config = await writeConfig({ registries: { [front.host]: { username: 'bob', password: 'wrong' } } });
      const r = await layerctlR(['--root', freshRoot(), 'pull', '--registries-config', config, `${front.host}/corpus/busybox:latest`]);
      expect(r.code, r.stderr).to.equal(8);
      expect(r.stderr).to.contain('EAUTH');
      expect(r.stderr).to.contain('token service');
    });
  });
});
