/**
 * eStargz images made by `ctr-remote` (Debian's stargz-snapshotter: `images
 * convert --estargz`, pushed with `ctr images push` to Debian's
 * docker-registry on 127.0.0.1), pulled lazily:
 *
 * - by containerd through layerd's remote-snapshot path (`ctr-remote images
 *   rpull --snapshotter layerd`): the snapshots exist once the TOCs are
 *   read, a container runs on them while the background fill is held (a
 *   front holds every whole-blob download: deterministically unfinished), and
 *   the fill completes once the front lets it through;
 * - by `layerctl pull --lazy`: the mounted image serves the bytes of a full
 *   pull of the same image, everywhere sampled.
 *
 * Skipped only if containerd, runc or ctr-remote are not installed.
 */
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import { type ServerResponse } from 'node:http';
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { DEBIAN_MULTI, scratch } from './support/env.js';
import { readRange, walk } from './support/treeSample.js';
import { ContainerdEnv, missingTools, ociArchive, closeContainerdTest } from './support/containerd.js';
import { http, waitFor } from './support/daemon.js';
import { TestRegistry, layerctlR, layerctlRJson, startProxy, type TestProxy } from './support/registry.js';
import { startLayerdServer, stopLayerdServer } from './fixtures/mount/harness.js';
import { type ChildProcess } from 'node:child_process';

const TAG = 'l2-packages'; // two real Debian layers, python3 in the second

function missing(): string | undefined {
  const tools = missingTools();
  if (tools) return tools;
  try {
    execFileSync('sh', ['-c', 'command -v ctr-remote'], { stdio: 'ignore' });
    return undefined;
  } catch {
    return 'ctr-remote not installed (apt-get install stargz-snapshotter)';
  }
}

describe('eStargz images made by ctr-remote, pulled lazily (containerd rpull, layerctl pull --lazy)', function () {
  this.timeout(900_000);
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let env: ContainerdEnv | undefined;
  let registry: TestRegistry | undefined;
  let front: TestProxy | undefined;
  /** Whole-blob downloads (the fills) are held while this is set. */
  let hold = false;
  const held: ServerResponse[] = [];
  /** Closed-range blob requests the front passed (lazy chunk reads, footers, TOCs). */
  let rangeRequests = 0;
  const servers: { child: ChildProcess; mnt: string }[] = [];
  let esgzRef = '';
  const reason = missing();

  before(async function () {
    if (reason) {
      console.warn(`      skipped: ${reason}`);
      this.skip();
    }
    work = await scratch('layerd-ctr-estargz-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    env = new ContainerdEnv(work.dir);
    await env.start();
    // The eStargz image, made by ctr-remote from the corpus image and pushed by ctr.
    const archive = join(work.dir, 'debian.tar');
    await ociArchive(DEBIAN_MULTI, [TAG], archive);
    const namespace = 'convert';
    await env.ctrOk(['images', 'import', '--no-unpack', '--base-name', 'corpus/debian-multi', archive], { namespace, timeoutMs: 300_000 });
    esgzRef = `${registry.host}/esgz/debian-multi:${TAG}`;
    await env.ctrRemoteOk(['images', 'convert', '--oci', '--estargz', '--estargz-compression-level', '1', `corpus/debian-multi:${TAG}`, esgzRef], { namespace, timeoutMs: 600_000 });
    await env.ctrOk(['images', 'push', '--plain-http', esgzRef], { namespace, timeoutMs: 300_000 });
    for (const ref of [`corpus/debian-multi:${TAG}`, esgzRef]) await env.ctrOk(['images', 'rm', ref], { namespace });
    const manifest = await fetch(`http://${registry.host}/v2/esgz/debian-multi/manifests/${TAG}`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } })
      .then((r) => r.json() as Promise<{ layers: { digest: string; annotations?: Record<string, string> }[] }>);
    expect(manifest.layers.every((l) => l.annotations?.['containerd.io/snapshot/stargz/toc.digest'] !== undefined), 'eStargz layers').to.equal(true);
    const layerDigests = new Set(manifest.layers.map((l) => l.digest));
    front = await startProxy(registry.host, {
      intercept: (req, res) => {
        // A chunk read asks for a closed range; the fill for the whole blob, or for its rest
        // (`bytes=N-`) when it resumes after yielding to reads (readDemand.ts).
        const range = req.headers.range;
        const fill = range === undefined || /^bytes=\d+-$/.test(range);
        if (req.url?.includes('/blobs/') && !fill) rangeRequests++;
        const digest = /\/blobs\/(sha256:[0-9a-f]{64})$/.exec(req.url ?? '')?.[1];
        // A fill's request for a layer blob: held, unanswered, while `hold` is set.
        if (!hold || !fill || req.method !== 'GET' || digest === undefined || !layerDigests.has(digest)) return false;
        held.push(res);
        return true;
      },
    });
  });

  after(async function () {
    hold = false;
    for (const res of held) res.destroy();
    for (const s of servers.reverse()) await stopLayerdServer(s.child, s.mnt).catch(() => undefined);
    await closeContainerdTest(this, { env, work, servers: [front, registry] });
  });

  it('`ctr-remote images rpull`: the snapshots are there at once, a container runs while the fill is held, the fill then completes', async () => {
    const ref = esgzRef.replace(registry!.host, front!.host);
    const namespace = 'rpull';
    const logStart = env!.layerd!.log().length;
    const logged = (what: RegExp): string[] => env!.layerd!.log().slice(logStart).split('\n').filter((l) => what.test(l));
    const lazyStates = async (): Promise<Record<string, number>> => {
      const text = (await http(env!.layerdSocket, 'GET', '/metrics')).body;
      return Object.fromEntries([...text.matchAll(/^layerd_lazy_layers\{state="(\w+)"\} (\d+)$/gm)].map((m) => [m[1]!, Number(m[2])]));
    };
    hold = true;
    await env!.ctrRemoteOk(['images', 'rpull', '--plain-http', '--snapshotter', 'layerd', ref], { namespace, timeoutMs: 300_000 });
    expect(logged(/snapshotter pulled a layer lazily/), 'both layers lazily').to.have.length(2);
    expect(logged(/snapshotter fetched a layer/), 'no layer fetched in full').to.deep.equal([]);
    expect(logged(/unpack snapshot prepared/), 'no unpack directory').to.deep.equal([]);
    await waitFor('both fills under way (and held)', () => held.length >= 2, 60_000, 100);
    const rangesBefore = rangeRequests;

    // A container on the lazy snapshots: its reads fetch chunks; the fills cannot have completed.
    const out = await env!.runScript(ref, 'lazy-run', '/usr/bin/python3 -c "print([6 * 7])" 2>&1; grep VERSION_CODENAME /etc/os-release',
      { namespace, timeoutMs: 300_000 });
    expect(out).to.equal('[42]\nVERSION_CODENAME=bookworm\n');
    expect(rangeRequests - rangesBefore, 'chunks fetched on demand').to.be.greaterThan(0);
    const during = await lazyStates();
    expect((during['lazy'] ?? 0) + (during['filling'] ?? 0), `layers still lazy: ${JSON.stringify(during)}`).to.equal(2);

    // Let the fills through: they resume and complete; a new container runs on the complete layers.
    hold = false;
    for (const res of held.splice(0)) res.destroy();
    await waitFor('both layers complete', async () => {
      const s = await lazyStates();
      return (s['lazy'] ?? 0) + (s['filling'] ?? 0) + (s['broken'] ?? 0) === 0;
    }, 300_000, 250);
    // The state leaves the database before the fill's log line is written and piped to us.
    await waitFor('both fills logged complete', () => logged(/lazy layer complete/).length === 2, 30_000, 100);
    expect(logged(/lazy layer complete/)).to.have.length(2);
    const again = await env!.runScript(ref, 'lazy-run-2', 'grep VERSION_CODENAME /etc/os-release', { namespace, timeoutMs: 300_000 });
    expect(again).to.equal('VERSION_CODENAME=bookworm\n');
    const fsck = await layerctlR(['--socket', env!.layerdSocket, 'fsck']);
    expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
  });

  it('`layerctl pull --lazy` mounts it lazily with the bytes of a full pull', async () => {
    const mount = async (root: string, name: string): Promise<string> => {
      const mnt = join(work!.dir, `mnt-${name}`);
      const upper = join(work!.dir, `upper-${name}`);
      await mkdir(mnt, { recursive: true });
      await mkdir(upper, { recursive: true });
      servers.push({ child: await startLayerdServer(['--root', root, '--image', esgzRef, '--upper', upper], mnt), mnt });
      return mnt;
    };
    const fullRoot = join(work!.dir, 'full');
    const full = await layerctlR(['--root', fullRoot, 'pull', esgzRef]);
    expect(full.code, full.stderr).to.equal(0);
    const lazyRoot = join(work!.dir, 'lazy');
    const pulled = await layerctlRJson<{ lazyLayers: string[]; fallback?: string }>(['--root', lazyRoot, 'pull', '--lazy', esgzRef]);
    expect(pulled.fallback).to.equal(undefined);
    expect(pulled.lazyLayers).to.have.length(2);
    const states = await layerctlRJson<{ Layers: { state: string; diffId: string }[] }>(['--root', lazyRoot, 'inspect', esgzRef]);
    expect(states.Layers.map((l) => l.state)).to.deep.equal(['lazy', 'lazy']);

    const fullMnt = await mount(fullRoot, 'full');
    const lazyMnt = await mount(lazyRoot, 'lazy');
    const fullTree = await walk(fullMnt);
    const lazyTree = await walk(lazyMnt);
    expect(lazyTree.listing).to.deep.equal(fullTree.listing);
    // A deterministic sample: whole files and ranges.
    let seed = 16;
    const random = (): number => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
    for (let i = 0; i < 60; i++) {
      const f = fullTree.files[Math.floor(random() * fullTree.files.length)]!;
      if (i % 2 === 0) {
        expect((await readFile(join(lazyMnt, f.path))).equals(await readFile(join(fullMnt, f.path))), `/${f.path}`).to.equal(true);
      } else {
        const at = Math.floor(random() * f.size);
        const length = 1 + Math.floor(random() * Math.min(1024 * 1024, f.size - at));
        expect((await readRange(join(lazyMnt, f.path), at, length)).equals(await readRange(join(fullMnt, f.path), at, length)), `/${f.path} [${at}, +${length})`).to.equal(true);
      }
    }
    const after = await layerctlRJson<{ Layers: { state: string }[] }>(['--root', lazyRoot, 'inspect', esgzRef]);
    expect(after.Layers.map((l) => l.state), 'no fill without a daemon').to.deep.equal(['lazy', 'lazy']);
  });
});
