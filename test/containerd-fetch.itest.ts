/**
 * The snapshotter fetches layers itself: when containerd's Prepare labels
 * name the layer (the CRI plugin with snapshot annotations on, or
 * `ctr-remote images rpull`), layerd pulls it from the registry with its own
 * client and answers ALREADY_EXISTS with the committed snapshot, so
 * containerd downloads no layer and unpacks nothing.
 *
 * A real containerd (Debian's 1.6) with its CRI plugin on and `snapshotter =
 * "layerd"`, driven as the kubelet drives it: PullImage over containerd's
 * gRPC socket. The registry is Debian's docker-registry on 127.0.0.1.
 * Skipped only if containerd or runc are not installed; the rpull test
 * also if ctr-remote (Debian's stargz-snapshotter) is not.
 */
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BUSYBOX, DEBIAN_MULTI, execFileAsync, layerctl, scratch } from './support/env.js';
import { CRI_NAMESPACE, ContainerdEnv, imageDocs, missingTools, closeContainerdTest } from './support/containerd.js';
import { criImageClient } from './support/cri.js';
import { TestRegistry } from './support/registry.js';

const TAG = 'l3-whiteouts'; // containerd 1.6 cannot apply debian-multi's layer 4 (docs/containerd.md)

function hasCtrRemote(): boolean {
  try {
    execFileSync('sh', ['-c', 'command -v ctr-remote'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

describe('containerd: the snapshotter fetches layers itself (CRI labels, ctr-remote rpull)', function () {
  this.timeout(600_000);
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let env: ContainerdEnv | undefined;
  let registry: TestRegistry | undefined;
  const reason = missingTools();

  const storeLayers = async (): Promise<string[]> => {
    const r = await layerctl(['--socket', env!.layerdSocket, 'layers', '--json']);
    if (r.code !== 0) throw new Error(`layerctl layers: ${r.stderr}`);
    return (JSON.parse(r.stdout) as { diffId: string }[]).map((l) => l.diffId).sort();
  };
  /** The layerd log lines since `from` (a length of the log) that say `what`. */
  const logged = (from: number, what: RegExp): string[] => env!.layerd!.log().slice(from).split('\n').filter((l) => what.test(l));
  /** The digests in containerd's content store in `namespace` (what it downloaded), and what it is still ingesting. */
  const contentOf = async (namespace: string): Promise<{ stored: string[]; ingesting: string[] }> => ({
    stored: (await env!.ctrOk(['content', 'ls', '-q'], { namespace })).split('\n').filter(Boolean),
    ingesting: (await env!.ctrOk(['content', 'active'], { namespace })).split('\n').slice(1).filter(Boolean), // (a header line first)
  });

  before(async function () {
    if (reason) {
      console.warn(`      skipped: ${reason}`);
      this.skip();
    }
    work = await scratch('layerd-fetch-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    const push = (from: string, to: string): Promise<unknown> => execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', from, `docker://${registry!.host}/${to}`]);
    await push(`oci:${DEBIAN_MULTI}:${TAG}`, `corpus/debian-multi:${TAG}`);
    await push(`oci:${BUSYBOX}:amd64`, 'corpus/busybox:amd64');
    // the CRI plugin's registry hosts (config_path): this registry speaks plain HTTP
    const hosts = join(work.dir, 'certs.d');
    await mkdir(join(hosts, registry.host), { recursive: true });
    await writeFile(join(hosts, registry.host, 'hosts.toml'), `server = "http://${registry.host}"\n\n[host."http://${registry.host}"]\n  capabilities = ["pull", "resolve"]\n`);
    env = new ContainerdEnv(work.dir, { cri: { registryHosts: hosts } });
    await env.start();
  });

  after(async function () {
    await closeContainerdTest(this, { env, work, servers: [registry], containerdLog: true });
  });

  it('CRI PullImage: layerd fetches every layer, containerd downloads none and unpacks nothing; the image runs', async () => {
    const docs = await imageDocs(DEBIAN_MULTI, TAG);
    const ref = `${registry!.host}/corpus/debian-multi:${TAG}`;
    const logStart = env!.layerd!.log().length;
    const cri = criImageClient(env!.containerdSocket);
    try {
      const imageRef = await cri.pullImage(ref);
      expect(imageRef).to.equal(docs.configDigest); // CRI's image ID is its config's digest
      expect((await cri.imageStatus(ref))?.repo_tags).to.deep.equal([ref]);
    } finally {
      cri.close();
    }

    // containerd fetched the manifest and the config, no layer
    const content = await contentOf(CRI_NAMESPACE);
    expect(content.stored).to.include(docs.manifestDigest).and.to.include(docs.configDigest);
    for (const layer of docs.layers) expect(content.stored, `layer ${layer} downloaded by containerd`).not.to.include(layer);
    expect(content.ingesting, 'nothing being downloaded').to.deep.equal([]);

    // layerd fetched them, with the image's own diffIDs, and registered the committed snapshots
    expect(logged(logStart, /snapshotter fetched a layer/)).to.have.length(3);
    expect(logged(logStart, /unpack snapshot prepared/), 'no unpack directory').to.deep.equal([]);
    expect(logged(logStart, /remote snapshot registered/)).to.have.length(3);
    const layers = await storeLayers();
    for (const d of docs.diffIds) expect(layers).to.include(d);
    const tree = await env!.ctrOk(['snapshots', '--snapshotter', 'layerd', 'tree'], { namespace: CRI_NAMESPACE });
    expect(tree).to.contain(`    \\_ ${docs.chain[2]}`);

    // containerd takes the image as unpacked: a container runs on the fetched layers
    const out = await env!.runScript(ref, 'cri-run',
      '/usr/bin/python3 -c "print(6 * 7)"; grep VERSION_CODENAME /etc/os-release; [ -e /etc/motd ] || echo motd-deleted',
      { namespace: CRI_NAMESPACE, timeoutMs: 120_000 });
    expect(out).to.equal('42\nVERSION_CODENAME=bookworm\nmotd-deleted\n');
  });

  it('`ctr-remote images rpull --snapshotter layerd`: layerd fetches the layer, containerd downloads none', async function () {
    if (!hasCtrRemote()) {
      console.warn('      skipped: ctr-remote not installed (apt-get install stargz-snapshotter)');
      this.skip();
    }
    const docs = await imageDocs(BUSYBOX, 'amd64');
    const ref = `${registry!.host}/corpus/busybox:amd64`;
    const namespace = 'rpull';
    const logStart = env!.layerd!.log().length;
    await env!.ctrRemoteOk(['images', 'rpull', '--plain-http', '--snapshotter', 'layerd', ref], { namespace, timeoutMs: 300_000 });

    const content = await contentOf(namespace);
    expect(content.stored).to.include(docs.configDigest);
    expect(content.stored, 'the layer downloaded by containerd').not.to.include(docs.layers[0]);
    expect(logged(logStart, /snapshotter fetched a layer/)).to.have.length(1);
    expect(logged(logStart, /unpack snapshot prepared/), 'no unpack directory').to.deep.equal([]);
    expect(await storeLayers()).to.include(docs.diffIds[0]);

    const out = await env!.runScript(ref, 'rpull-run', 'echo fetched-by-layerd; ls /bin/busybox', { namespace, timeoutMs: 120_000 });
    expect(out).to.equal('fetched-by-layerd\n/bin/busybox\n');
  });
});
