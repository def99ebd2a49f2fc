/**
 * The registry code that needs no registry: references, the registries
 * config and its endpoints, authentication challenges, and the timeout
 * settings of the daemon config and layerctl. (These lived in
 * registry-pull.itest.ts, where `make unit` never ran them.)
 */
import { expect } from 'chai';
import { validateConfig } from '../daemon/config.js';
import { parseChallenge } from '../storage/registry/auth.js';
import { checkRegistriesConfig, endpointsFor } from '../storage/registry/config.js';
import { parseRegistryRef } from '../storage/registry/reference.js';
import { DEFAULT_TIMEOUTS, checkTimeoutSettings, timeoutsFrom } from '../storage/registry/timeouts.js';

const DM_LATEST = 'sha256:92865d204ee2bff5d5f8811ded92a9c70145095b9b829dc1137bb5b668a745fd';

describe('registry references, config and challenges', () => {
  it('parses references as docker does', () => {
    expect(parseRegistryRef('127.0.0.1:5000/corpus/debian-multi')).to.deep.equal({ registry: '127.0.0.1:5000', repository: 'corpus/debian-multi', tag: 'latest' });
    expect(parseRegistryRef('localhost/x:v1')).to.deep.equal({ registry: 'localhost', repository: 'x', tag: 'v1' });
    expect(parseRegistryRef(`localhost:5000/x@${DM_LATEST}`)).to.deep.equal({ registry: 'localhost:5000', repository: 'x', digest: DM_LATEST });
    expect(parseRegistryRef('debian')).to.deep.equal({ registry: 'docker.io', repository: 'library/debian', tag: 'latest' });
    expect(parseRegistryRef('corpus/busybox:amd64')).to.deep.equal({ registry: 'docker.io', repository: 'corpus/busybox', tag: 'amd64' });
    for (const bad of ['127.0.0.1:5000/UPPER', 'host.example/x@sha256:abc', 'host.example/x:bad tag']) {
      expect(() => parseRegistryRef(bad), bad).to.throw().with.property('code', 'EINVAL');
    }
  });

  it('picks plain HTTP for loopback hosts only, unless told otherwise; mirrors first', async () => {
    const config = checkRegistriesConfig({ registries: {
      'localhost:5000': { mirrors: ['127.0.0.2:6000', 'https://mirror.example'] },
      '127.0.0.1:7000': { insecure: false },
      '10.1.2.3:5000': { insecure: true },
    } });
    const urls = async (host: string, pull: boolean): Promise<string[]> => (await endpointsFor(config, host, pull)).map((e) => e.baseUrl);
    expect(await urls('localhost:5000', true)).to.deep.equal(['http://127.0.0.2:6000', 'https://mirror.example', 'http://localhost:5000']);
    expect(await urls('localhost:5000', false)).to.deep.equal(['http://localhost:5000']);
    expect(await urls('127.0.0.1:7000', true)).to.deep.equal(['https://127.0.0.1:7000']);
    expect(await urls('10.1.2.3:5000', true)).to.deep.equal(['http://10.1.2.3:5000']);
    expect(await urls('registry.example', true)).to.deep.equal(['https://registry.example']);
    expect(await urls('docker.io', true)).to.deep.equal(['https://registry-1.docker.io']);
    expect(() => checkRegistriesConfig({ registries: { x: { username: 'only' } } })).to.throw().with.property('code', 'EBADJSON');
  });

  it('parses Bearer and Basic challenges', () => {
    expect(parseChallenge('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"')).to.deep.equal({
      scheme: 'bearer', params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:a/b:pull,push' },
    });
    expect(parseChallenge('Basic realm="layerd-test"')).to.deep.equal({ scheme: 'basic', params: { realm: 'layerd-test' } });
    expect(parseChallenge('Negotiate abc')).to.equal(undefined);
  });

  it('reads timeout settings in seconds; defaults 30 s connect, 60 s idle, no overall limit', () => {
    expect(timeoutsFrom(undefined)).to.deep.equal({ connectMs: 30_000, idleMs: 60_000, totalMs: 0 });
    expect(DEFAULT_TIMEOUTS).to.deep.equal(timeoutsFrom({}));
    expect(timeoutsFrom(checkTimeoutSettings({ idleSeconds: 0.5, totalSeconds: 600 }, 't'))).to.deep.equal({ connectMs: 30_000, idleMs: 500, totalMs: 600_000 });
    for (const bad of [{ idleSeconds: 0 }, { connectSeconds: -1 }, { totalSeconds: '5' }, { totalSeconds: -1 }, { overallSeconds: 5 }, [], null]) {
      expect(() => checkTimeoutSettings(bad, 't'), JSON.stringify(bad)).to.throw().with.property('code', 'EINVAL');
    }
  });

  it('the daemon config takes registryTimeouts, checked', () => {
    expect(validateConfig({ registryTimeouts: { connectSeconds: 5, idleSeconds: 10, totalSeconds: 0 } }, '/c.json').registryTimeouts)
      .to.deep.equal({ connectSeconds: 5, idleSeconds: 10, totalSeconds: 0 });
    expect(() => validateConfig({ registryTimeouts: { idleSeconds: 'long' } }, '/c.json')).to.throw(/registryTimeouts.*idleSeconds/).with.property('code', 'EINVAL');
    expect(() => validateConfig({ registryTimeouts: 30 }, '/c.json')).to.throw(/registryTimeouts/).with.property('code', 'EINVAL');
  });

  it('the daemon config takes containerdSocket: an absolute path or "none"', () => {
    expect(validateConfig({ containerdSocket: '/run/k3s/containerd/containerd.sock' }, '/c.json').containerdSocket).to.equal('/run/k3s/containerd/containerd.sock');
    expect(validateConfig({ containerdSocket: 'none' }, '/c.json').containerdSocket).to.equal('none');
    expect(() => validateConfig({ containerdSocket: 'containerd.sock' }, '/c.json')).to.throw(/containerdSocket/).with.property('code', 'EINVAL');
    expect(() => validateConfig({ containerdSocket: 5 }, '/c.json')).to.throw(/containerdSocket/).with.property('code', 'EINVAL');
  });
});
