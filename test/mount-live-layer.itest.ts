/**
 * Live directory layers on debian-multi: `layerctl run --layer-dir DIR`
 * serves a host directory as the top read-only layer of a container and
 * follows its edits (adds, changes, deletes, renames, hand-made `.wh.`
 * whiteouts and opaque markers); the watcher goes away with the mount;
 * `layerctl commit --layer-dir` makes the directory a content-addressed
 * layer. Real daemon, real FUSE mounts.
 *
 * How fast a change shows is not asserted (the machine is shared): each
 * change is polled for with a generous bound, and only ENOENT counts as
 * "not there" (any other error, such as a dead mount's ENOTCONN, fails).
 */
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { mkdir, readdir, readFile, readlink, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { mountUnion } from '../mount/mountUnion.js';
import { tarLayerSource } from '../storage/layerIndex.js';
import { Store } from '../storage/store.js';
import { processAlive } from '../common/process.js';
import { type RunningDaemon, startDaemon } from './support/daemon.js';
import { DEBIAN_MULTI, layerctl, layerctlJson, scratch } from './support/env.js';
import { clearMountsUnder } from './support/store.js';

const run = promisify(execFile);
/** A bound for a change to show, not a promise of speed: only a change that never shows fails. */
const VISIBLE_BOUND_MS = 30_000;

/**
 * `command args` in another process (the test process may serve the mount);
 * its stdout, or undefined if it failed with ENOENT. Any other failure throws.
 */
async function unlessMissing(command: string, args: string[]): Promise<string | undefined> {
  try {
    return (await run(command, args, { env: { ...process.env, LC_ALL: 'C' } })).stdout;
  } catch (err) {
    const stderr = (err as { stderr?: string }).stderr ?? '';
    if (/No such file or directory/.test(stderr)) return undefined;
    throw new Error(`${command} ${args.join(' ')}: ${stderr.trim() || String(err)}`);
  }
}

/** Read a file through the mount (`cat`), or undefined if it does not exist. */
const catFile = (path: string): Promise<string | undefined> => unlessMissing('cat', [path]);
/** `ls -A` of a directory through the mount, or undefined if it does not exist. */
const listDir = (path: string): Promise<string | undefined> => unlessMissing('ls', ['-A', path]);

/** Poll `probe` until it returns `want`; fail after VISIBLE_BOUND_MS, or at once if the probe throws. */
async function becomes<T>(what: string, probe: () => Promise<T>, want: T): Promise<void> {
  const deadline = Date.now() + VISIBLE_BOUND_MS;
  let last: T | undefined;
  for (;;) {
    last = await probe();
    if (last === want) return;
    if (Date.now() > deadline) throw new Error(`${what}: not visible after ${VISIBLE_BOUND_MS} ms (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** inotify watches a process holds (libuv keeps its inotify fd open; the watches are what a leak leaves). */
async function inotifyWatches(pid: number | 'self' = 'self'): Promise<number> {
  let n = 0;
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    if (target !== 'anon_inode:inotify') continue;
    const info = await readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8').catch(() => '');
    n += info.split('\n').filter((l) => l.startsWith('inotify wd:')).length;
  }
  return n;
}

describe('live directory layers (run --layer-dir, commit --layer-dir)', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;
  let live: string;
  let mnt: string;
  const ctl = (...args: string[]) => layerctl(['--socket', daemon!.socket, ...args]);
  /** A daemon-less store with debian-multi, made by the first test that needs it. */
  let offlineStore: Promise<string> | undefined;
  const offlineRoot = (): Promise<string> => (offlineStore ??= (async () => {
    const root = join(work.dir, 'offline-store');
    await layerctlJson(['--root', root, 'import', DEBIAN_MULTI]);
    return root;
  })());

  before(async () => {
    work = await scratch();
    live = join(work.dir, 'mytree');
    await mkdir(join(live, 'etc'), { recursive: true });
    await writeFile(join(live, 'etc', 'hostname'), 'live-host\n');
    daemon = await startDaemon(work.dir, ['--mount-root', join(work.dir, 'mounts')]);
    const imported = await ctl('import', DEBIAN_MULTI);
    expect(imported.code, imported.stderr).to.equal(0);
    const r = await ctl('run', '--name', 'dev', '--layer-dir', live, 'debian-multi:latest', '--json');
    expect(r.code, r.stderr).to.equal(0);
    mnt = (JSON.parse(r.stdout) as { mountpoint: string }).mountpoint;
  });

  after(async () => {
    try {
      if (daemon) {
        for (const id of ['dev', 'short-lived']) await ctl('rm', id).catch(() => undefined);
        await daemon.stop();
      }
    } finally {
      await clearMountsUnder(work.dir);
      await work.remove();
    }
  });

  it('shows the directory on top of the image, below the writable layer', async () => {
    expect(await catFile(join(mnt, 'etc/hostname'))).to.equal('live-host\n');
    expect(await catFile(join(mnt, 'etc/os-release'))).to.match(/Debian/);
    const info = JSON.parse((await ctl('ps', '--json')).stdout) as Array<{ id: string; layerDir: string | null }>;
    expect(info.find((c) => c.id === 'dev')?.layerDir).to.equal(live);
    // A write through the mount goes to the writable layer, never into the host directory.
    await run('sh', ['-c', `echo from-container > ${join(mnt, 'etc/hostname')}`]);
    expect(await catFile(join(mnt, 'etc/hostname'))).to.equal('from-container\n');
    expect(await readFile(join(live, 'etc/hostname'), 'utf8')).to.equal('live-host\n');
    await run('rm', [join(mnt, 'etc/hostname')]);
  });

  it('follows adds, in-place changes, renames and deletes', async () => {
    await mkdir(join(live, 'opt/tool/bin'), { recursive: true });
    await writeFile(join(live, 'opt/tool/bin/run.sh'), 'echo v1\n', { mode: 0o755 });
    await becomes('a new file in a new directory', () => catFile(join(mnt, 'opt/tool/bin/run.sh')), 'echo v1\n');
    expect((await stat(join(mnt, 'opt/tool/bin/run.sh'))).mode & 0o777).to.equal(0o755);

    // Same size, same second: the kernel must not serve the old pages.
    await writeFile(join(live, 'opt/tool/bin/run.sh'), 'echo v2\n');
    await becomes('an in-place edit', () => catFile(join(mnt, 'opt/tool/bin/run.sh')), 'echo v2\n');

    await rename(join(live, 'opt/tool/bin/run.sh'), join(live, 'opt/tool/bin/start.sh'));
    await becomes('the new name of a rename', () => catFile(join(mnt, 'opt/tool/bin/start.sh')), 'echo v2\n');
    await becomes('the old name of a rename', () => catFile(join(mnt, 'opt/tool/bin/run.sh')), undefined);

    await rm(join(live, 'opt'), { recursive: true });
    await becomes('a deleted directory', () => listDir(join(mnt, 'opt')).then((t) => (t ?? '').includes('tool')), false);
  });

  it('treats hand-made .wh. files and opaque markers as whiteouts of the image', async () => {
    expect(await catFile(join(mnt, 'etc/os-release'))).to.match(/Debian/);
    await writeFile(join(live, 'etc/.wh.os-release'), '');
    await becomes('a whiteout made by hand', () => catFile(join(mnt, 'etc/os-release')), undefined);
    const listing = (await run('ls', ['-a', join(mnt, 'etc')])).stdout.split('\n');
    expect(listing).to.not.include('.wh.os-release');
    await rm(join(live, 'etc/.wh.os-release'));
    await becomes('the whiteout removed again', () => catFile(join(mnt, 'etc/os-release')).then((t) => t !== undefined), true);

    await mkdir(join(live, 'usr/share/doc'), { recursive: true });
    await writeFile(join(live, 'usr/share/doc/ONLY'), 'only\n');
    await writeFile(join(live, 'usr/share/doc/.wh..wh..opq'), '');
    await becomes('an opaque directory', () => listDir(join(mnt, 'usr/share/doc')), 'ONLY\n');
    await rm(join(live, 'usr'), { recursive: true });
    await becomes('the opaque marker removed', () => listDir(join(mnt, 'usr/share/doc')).then((t) => (t ?? '').split('\n').length > 3), true);
  });

  it('commits a container with a live layer as two new layers that show what it showed', async () => {
    await writeFile(join(live, 'etc/motd'), 'committed motd\n');
    await becomes('a file to commit', () => catFile(join(mnt, 'etc/motd')), 'committed motd\n');
    await run('sh', ['-c', `echo upper > ${join(mnt, 'upper.txt')}`]);
    const c = await ctl('commit', 'dev', 'dev-commit:1', '--json');
    expect(c.code, c.stderr).to.equal(0);
    const history = JSON.parse((await ctl('history', 'dev-commit:1', '--json')).stdout) as unknown[];
    expect(history).to.have.length(6);
    const which = JSON.parse((await ctl('which', 'dev-commit:1', '/etc/motd', '--json')).stdout) as { layer: { position: number } };
    expect(which.layer.position).to.equal(5);
    const upper = JSON.parse((await ctl('which', 'dev-commit:1', '/upper.txt', '--json')).stdout) as { layer: { position: number } };
    expect(upper.layer.position).to.equal(6);
    await rm(join(live, 'etc/motd'));
  });

  it('releases the watcher and the mount when the container is removed', async () => {
    // A container of its own, of another image (so another mount host than 'dev''s, whose watches stay).
    const dir = join(work.dir, 'short-lived');
    await mkdir(join(dir, 'etc'), { recursive: true });
    const created = await ctl('run', '--name', 'short-lived', '--layer-dir', dir, 'debian-multi:l1-minbase', '--json');
    expect(created.code, created.stderr).to.equal(0);
    const itsMount = (JSON.parse(created.stdout) as { mountpoint: string }).mountpoint;
    const pid = (JSON.parse((await ctl('ps', '--json')).stdout) as Array<{ id: string; serverPid: number }>).find((c) => c.id === 'short-lived')!.serverPid;
    expect(await inotifyWatches(pid)).to.be.greaterThan(0);
    const r = await ctl('rm', 'short-lived');
    expect(r.code, r.stderr).to.equal(0);
    expect(await readFile('/proc/self/mountinfo', 'utf8')).to.not.include(itsMount);
    // The image's mount host may linger a few seconds for the next mount, but watches nothing.
    expect(processAlive(pid) ? await inotifyWatches(pid) : 0).to.equal(0);
  });

  it('closes its inotify watches on unmount (in-process mountUnion)', async () => {
    const store = await Store.open(await offlineRoot());
    const layers = (await store.imageLayers('debian-multi:latest')).map((l) => tarLayerSource(l.index, l.tarPath));
    store.close();
    const upper = join(work.dir, 'inproc-upper');
    const mountpoint = join(work.dir, 'inproc-mnt');
    await mkdir(upper);
    await mkdir(mountpoint);
    const before = await inotifyWatches();
    const mounted = await mountUnion({ layers, upper, mountpoint, liveLayer: live });
    try {
      expect(await inotifyWatches()).to.be.greaterThan(before);
      await writeFile(join(live, 'etc/inproc'), 'x\n');
      await becomes('a change seen by an in-process mount', () => catFile(join(mountpoint, 'etc/inproc')), 'x\n');
    } finally {
      await mounted.unmount();
    }
    expect(await inotifyWatches()).to.equal(before);
  });

  it('commit --layer-dir makes the directory a content-addressed layer (offline and through the daemon)', async () => {
    const tree = join(work.dir, 'commit-tree');
    await mkdir(join(tree, 'srv/app'), { recursive: true });
    await writeFile(join(tree, 'srv/app/main.py'), 'print("hi")\n');
    await mkdir(join(tree, 'etc'));
    await writeFile(join(tree, 'etc/.wh.os-release'), '');
    const root = await offlineRoot();
    type Commit = { image: string; diffId: string; ref: string | null };
    const a = await layerctlJson<Commit>(['--root', root, 'commit', '--layer-dir', tree, 'debian-multi:latest', 'app:1']);
    const b = await layerctlJson<Commit>(['--root', root, 'commit', '--layer-dir', tree, 'debian-multi:latest', 'app:2']);
    expect(a.diffId).to.match(/^sha256:[0-9a-f]{64}$/);
    expect(b.diffId).to.equal(a.diffId); // same directory, same bytes, same layer
    const diff = await layerctlJson<Array<{ kind: string; path: string }>>(['--root', root, 'diff', 'app:1', '--layer', '5']);
    expect(diff.some((d) => d.kind === 'A' && d.path === '/srv/app/main.py')).to.equal(true);
    expect(diff.some((d) => d.kind === 'D' && d.path === '/etc/os-release')).to.equal(true);
    const fsck = await layerctl(['--root', root, 'fsck']);
    expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);

    const viaDaemon = await ctl('commit', '--layer-dir', tree, 'debian-multi:latest', 'app:1', '--json');
    expect(viaDaemon.code, viaDaemon.stderr).to.equal(0);
    expect((JSON.parse(viaDaemon.stdout) as Commit).diffId).to.equal(a.diffId);
    const missing = await ctl('commit', '--layer-dir', join(work.dir, 'nope'), 'debian-multi:latest');
    expect(missing.code).to.not.equal(0);
    expect(missing.stderr).to.match(/nope/);
  });
});
