/**
 * Killing the importer with SIGKILL at any moment leaves a store that the
 * next start recovers to a consistent state, and a re-import then succeeds.
 */
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { http, startDaemon, waitFor } from './support/daemon.js';
import { DEBIAN_MULTI, LAYERCTL, REPO, layerctl, layerctlJson, scratch } from './support/env.js';

const LAYERD = join(REPO, 'bin', 'layerd');

function importThenKill(root: string, afterMs: number): Promise<{ killed: boolean }> {
  return new Promise((resolve, reject) => {
    const child = spawn(LAYERCTL, ['--root', root, 'import', DEBIAN_MULTI], { stdio: 'ignore' });
    const timer = setTimeout(() => { child.kill('SIGKILL'); }, afterMs);
    child.on('error', reject);
    child.on('exit', (_code, signal) => {
      clearTimeout(timer);
      resolve({ killed: signal === 'SIGKILL' });
    });
  });
}

describe('import: crash safety (SIGKILL mid-import)', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  before(async () => { work = await scratch(); });
  after(async () => { await work?.remove(); });

  // Kill points spread over one import's measured duration: reading the
  // documents, inside layer 1, later layers, and around the commit.
  let duration = 0;
  let killedMidway = 0;
  before(async () => {
    const t0 = Date.now();
    const r = await layerctl(['--root', join(work.dir, 'timing'), 'import', DEBIAN_MULTI]);
    expect(r.code, r.stderr).to.equal(0);
    duration = Date.now() - t0;
  });

  for (const fraction of [0.1, 0.35, 0.6, 0.85, 0.97]) {
    it(`killed at ${Math.round(fraction * 100)}% of an import: recovery leaves a clean store, and a re-import succeeds`, async () => {
      const delay = Math.round(duration * fraction);
      const root = join(work.dir, `store-${delay}`);
      const { killed } = await importThenKill(root, delay);
      if (killed) killedMidway++;
      // Opening the store (here through fsck) recovers it.
      const fsck = await layerctl(['--root', root, 'fsck', '--json']);
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
      expect(await readdir(join(root, 'tmp'))).to.deep.equal([]);
      const images = await layerctlJson<{ refs: string[] }[]>(['--root', root, 'images']);
      if (killed) {
        // All or nothing: either the import committed or no image is visible.
        expect(images.length === 0 || images.length === 4, JSON.stringify(images)).to.equal(true);
      }
      const again = await layerctl(['--root', root, 'import', DEBIAN_MULTI]);
      expect(again.code, again.stderr).to.equal(0);
      const after = await layerctlJson<{ refs: string[] }[]>(['--root', root, 'images']);
      expect(after.flatMap((i) => i.refs)).to.include('debian-multi:latest');
      const fsck2 = await layerctl(['--root', root, 'fsck']);
      expect(fsck2.code, fsck2.stdout).to.equal(0);
    });
  }

  it('interrupted at least three of those imports before they finished', () => {
    expect(killedMidway).to.be.at.least(3);
  });
});

describe('daemon start-up: the database lock decides, not a stale daemon.json', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  before(async () => { work = await scratch(); });
  after(async () => { await work?.remove(); });

  it('starts when daemon.json names a pid that now belongs to an unrelated process', async () => {
    const dir = join(work.dir, 'reused');
    await mkdir(dir);
    const root = join(dir, 'root');
    expect((await layerctl(['--root', root, 'images'])).code).to.equal(0);
    // An unrelated live process in the dead daemon's place (pid reuse).
    const unrelated = spawn('sleep', ['600'], { stdio: 'ignore' });
    try {
      await writeFile(join(root, 'daemon.json'), JSON.stringify({ pid: unrelated.pid, socket: join(dir, 'gone.sock') }));
      const offline = await layerctl(['--root', root, 'images']);
      expect(offline.code, offline.stderr).to.equal(0);
      const daemon = await startDaemon(dir, ['--snapshotter-socket', 'none']);
      try {
        // And while it runs, the lock still keeps an offline user out, at once.
        const busy = await layerctl(['--root', root, 'images']);
        expect(busy.code, busy.stderr).to.equal(5);
        expect(busy.stderr).to.contain(daemon.socket);
      } finally {
        expect(await daemon.stop()).to.equal(0);
      }
    } finally {
      unrelated.kill('SIGKILL');
    }
  });

  it('restarts right after SIGKILL, while the killed daemon is not yet reaped', async () => {
    const dir = join(work.dir, 'killed');
    await mkdir(dir);
    const root = join(dir, 'root');
    const socket = join(dir, 'first.sock');
    // The first daemon's parent is a shell that execs `sleep`, which never
    // reaps it: once killed it stays a zombie, its pid still "alive".
    const parent = spawn('sh', ['-c', '"$0" --root "$1" --socket "$2" --snapshotter-socket none >/dev/null 2>&1 & echo $!; exec sleep 600', LAYERD, root, socket], { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      const pid = Number(await new Promise<string>((resolve) => parent.stdout!.once('data', (d: Buffer) => resolve(d.toString().trim()))));
      await waitFor('the first daemon', () => http(socket, 'GET', '/v1/health').then((r) => r.status === 200, () => false));
      process.kill(pid, 'SIGKILL');
      await waitFor('the zombie', async () => (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.startsWith('Z'));
      const second = await startDaemon(dir, ['--snapshotter-socket', 'none']);
      expect(await second.stop()).to.equal(0);
    } finally {
      parent.kill('SIGKILL');
    }
  });
});
