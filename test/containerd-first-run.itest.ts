/**
 * The first `ctr run` right after `ctr images pull --snapshotter layerd`:
 * the pull's layers are committed at once and ingested into the store in
 * the background; a container started before that ends must not wait for
 * it. Its FUSE union reads the unpack directories containerd wrote (whiteouts
 * as 0/0 devices, opaque directories by xattr) as lower layers, and the
 * ingest ending while it runs neither breaks it nor deletes the directories
 * under it; they go when the last mount reading them does.
 *
 * The ingest is held deterministically: layerd runs with
 * LAYERD_TEST_INGEST_GATE, and background ingests wait while that file
 * exists. containerd, ctr and layerd run in a private mount namespace
 * (test/support/containerd.ts); the registry is Debian's docker-registry on
 * 127.0.0.1. Skipped only if containerd or runc are not installed.
 */
import { expect } from 'chai';
import { rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { DEBIAN_MULTI, execFileAsync, layerctl, scratch } from './support/env.js';
import { ContainerdEnv, missingTools, closeContainerdTest } from './support/containerd.js';
import { waitFor } from './support/daemon.js';
import { TestRegistry } from './support/registry.js';

const TAG = 'l3-whiteouts'; // containerd 1.6 cannot apply debian-multi's layer 4 (docs/containerd.md)

/** What the container checks: python3 runs, layer 3's whiteouts and opaque directory hold (as in containerd-run.itest.ts). */
const SCRIPT = [
  '/usr/bin/python3 -c "import sys; print(6 * 7, sys.version_info[0])"',
  'grep VERSION_CODENAME /etc/os-release',
  'for p in /etc/motd /etc/issue.net /usr/bin/c_rehash /usr/share/info /usr/share/locale /usr/share/ca-certificates/mozilla/Hongkong_Post_Root_CA_3.crt; do [ -e $p ] && echo "STILL THERE $p"; done',
  'echo "doc: $(ls /usr/share/doc | tr "\\n" " ")"', 'echo "doc/apt: $(ls /usr/share/doc/apt)"',
].join('; ');

function expectImageSeen(out: string): void {
  expect(out).to.contain('42 3\n');
  expect(out).to.contain('VERSION_CODENAME=bookworm');
  expect(out).not.to.contain('STILL THERE');
  expect(out).to.contain('doc: README.corpus apt corpus \n');
  expect(out).to.contain('doc/apt: NEW\n');
}

describe('containerd: the first run after a pull does not wait for the background ingest', function () {
  this.timeout(600_000);
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let env: ContainerdEnv | undefined;
  let registry: TestRegistry | undefined;
  let gate = '';
  const reason = missingTools();

  const ctr = (...args: string[]): Promise<string> => env!.ctrOk(args, { timeoutMs: 300_000 });
  const layerCount = async (): Promise<number> => {
    const r = await layerctl(['--socket', env!.layerdSocket, 'layers', '--json']);
    if (r.code !== 0) throw new Error(`layerctl layers: ${r.stderr}`);
    return (JSON.parse(r.stdout) as unknown[]).length;
  };
  /** The layerd log lines since `from` (a length of the log) that say `what`, parsed. */
  const logged = (from: number, what: string): Record<string, unknown>[] => env!.layerd!.log().slice(from).split('\n')
    .filter((l) => l.includes(`"${what}"`)).map((l) => JSON.parse(l) as Record<string, unknown>);
  const exists = (path: string): Promise<boolean> => stat(path).then(() => true, () => false);

  before(async function () {
    if (reason) {
      console.warn(`      skipped: ${reason}`);
      this.skip();
    }
    work = await scratch('layerd-firstrun-');
    gate = join(work.dir, 'ingest-gate');
    env = new ContainerdEnv(work.dir, { layerdEnv: { LAYERD_TEST_INGEST_GATE: gate } });
    await env.start();
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests',
      `oci:${DEBIAN_MULTI}:${TAG}`, `docker://${registry.host}/corpus/debian-multi:${TAG}`]);
  });

  after(async function () {
    if (gate !== '') await rm(gate, { force: true });
    await closeContainerdTest(this, { env, work, servers: [registry] });
  });

  it('runs the image from the unpack directories while its layers are held pending; the ingest ending under a running container keeps them until it is gone', async () => {
    const ref = `${registry!.host}/corpus/debian-multi:${TAG}`;
    const before = await layerCount();
    const logStart = env!.layerd!.log().length;
    await writeFile(gate, 'held by containerd-first-run.itest.ts\n');
    await ctr('images', 'pull', '--plain-http', '--snapshotter', 'layerd', ref);
    const uppers = logged(logStart, 'unpack snapshot prepared').map((l) => String(l['upper']));
    expect(uppers, 'three layers unpacked into directories').to.have.length(3);
    await waitFor('the first ingest held at the gate', () => logged(logStart, 'background ingest held by the test gate').length > 0, 30_000);
    expect(await layerCount(), 'no layer stored yet').to.equal(before);

    // the first run: served from the three pending directories, whiteouts applied
    // (bounded: without this path the run would wait for the held ingest until the gate opens)
    expectImageSeen(await env!.runScript(ref, 'first', SCRIPT, { timeoutMs: 120_000 }));
    const prepared = logged(logStart, 'snapshot prepared');
    expect(prepared.map((l) => l['pendingDirs']), 'the container\'s mount read the pending directories').to.deep.equal([3]);
    // ... from the daemon's walks of them at their Commit: the mount host walked none on the run's critical path
    expect(prepared.map((l) => l['walkedDirs']), 'directories the mount host walked itself').to.deep.equal([0]);
    expect(await layerCount(), 'still no layer stored').to.equal(before);

    // a container running while the ingests end
    await ctr('run', '-d', '--null-io', '--snapshotter', 'layerd', ref, 'long', 'sleep', '600');
    await rm(gate);
    await waitFor('the three layers ingested', async () => (await layerCount()) === before + 3, 180_000, 200);
    expect(logged(logStart, 'unpack snapshot layer ingested'), 'three ingests').to.have.length(3);
    expect(logged(logStart, 'unpack directory kept while a mount reads it'), 'each directory kept for the running container').to.have.length(3);
    for (const upper of uppers) expect(await exists(upper), `${upper} kept while a mount reads it`).to.equal(true);
    expectImageSeen(await ctr('tasks', 'exec', '--exec-id', 'check', 'long', 'sh', '-c', SCRIPT));
    // nor a daemon restart: the mount is adopted, and the start's Cleanup (done before the
    // snapshotter socket answers) leaves the directories it reads
    expect(await env!.stopLayerd()).to.equal(0);
    await env!.startLayerd();
    expect(logged(0, 'snapshots restored').map((l) => l['adopted']), 'the running container\'s mount adopted').to.deep.equal([1]);
    for (const upper of uppers) expect(await exists(upper), `${upper} kept through a daemon restart`).to.equal(true);
    expectImageSeen(await ctr('tasks', 'exec', '--exec-id', 'check-2', 'long', 'sh', '-c', SCRIPT));

    // containerd's GC cleans a snapshotter once per removal and does not retry: a GC run while its
    // connection to the restarted snapshotter is still down (gRPC reconnects with backoff) never
    // removes the snapshot. Wait until containerd reaches the snapshotter again.
    await waitFor('containerd reaches the restarted snapshotter', async () => (await env!.ctr(['snapshots', '--snapshotter', 'layerd', 'ls'])).code === 0, 60_000, 250);
    await env!.removeContainer('long');
    await env!.gc(); // containerd removes the container's snapshot (layerd unmounts it)
    for (const upper of uppers) await waitFor(`${upper} deleted once no mount reads it`, async () => !(await exists(upper)), 30_000, 100);

    // later runs read the stored layers
    const laterStart = env!.layerd!.log().length;
    expectImageSeen(await env!.runScript(ref, 'later', SCRIPT, { timeoutMs: 300_000 }));
    expect(logged(laterStart, 'snapshot prepared').map((l) => l['pendingDirs'])).to.deep.equal([0]);
  });
});
