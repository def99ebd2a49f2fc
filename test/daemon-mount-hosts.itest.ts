/**
 * How the daemon serves container mounts: mount hosts (one process per
 * image, serving all its containers), the spare host kept ready for the
 * first mount of an image, and hosts leaving once their last mount is gone.
 * Then the kernel caches of writable container mounts: long by default
 * (everything a container changes goes through its mount, and all names of
 * a hard-linked file are one kernel inode, so a change through one name is
 * seen through the others at once); config `mountCacheSeconds` shortens
 * them. Real daemon, real mounts.
 */
import { expect } from 'chai';
import { readFile, writeFile } from 'node:fs/promises';
import { processAlive } from '../common/process.js';
import { join } from 'node:path';
import { type RunningDaemon, startDaemon } from './support/daemon.js';
import { DEBIAN_MULTI, REPO, execFileAsync, layerctl, scratch } from './support/env.js';
import { clearMountsUnder } from './support/store.js';
import { abortFuseConnection } from './support/fusectl.js';

/** Size and mode of `b` as the kernel reports them, right after changing the file through its other name `a`. */
async function seenThroughOtherName(mnt: string): Promise<string> {
  const sh = (script: string) => execFileAsync('sh', ['-c', script]);
  await sh(`cd ${mnt}/root && echo one > a && ln a b && stat -c %s b >/dev/null`);
  await sh(`echo two-more >> ${mnt}/root/a && chmod 0600 ${mnt}/root/a`);
  return (await sh(`stat -c '%s %a' ${mnt}/root/b`)).stdout.trim();
}

/**
 * Size of `f` seen through the mount after its upper copy grew behind the
 * kernel's back. The cache lifetime is the subject here, so time is what the
 * test is about: `untilMs` polls (bounded) for the growth to show; without
 * it, one look after 1.5 s, past a short lifetime but far within a long one.
 */
async function sizeAfterChangeBehindMount(mnt: string, upper: string, untilMs?: number): Promise<number> {
  const sh = (script: string) => execFileAsync('sh', ['-c', script]);
  const size = async (): Promise<number> => Number((await sh(`stat -c %s ${mnt}/root/f`)).stdout.trim());
  await sh(`echo one > ${mnt}/root/f && stat -c %s ${mnt}/root/f >/dev/null`);
  await sh(`echo two-more >> ${upper}/root/f`);
  if (untilMs === undefined) {
    await new Promise((r) => setTimeout(r, 1500));
    return size();
  }
  const deadline = Date.now() + untilMs;
  for (;;) {
    const now = await size();
    if (now !== 4 || Date.now() > deadline) return now;
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function cmdline(pid: number): Promise<string[]> {
  return (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
}

/** PIDs of processes whose command line names `socket` (the mount hosts of a store). */
async function hostsServing(socket: string): Promise<number[]> {
  const { stdout } = await execFileAsync('pgrep', ['-f', `mount-host --socket ${socket}`]).catch(() => ({ stdout: '' }));
  return stdout.split('\n').filter((l) => l !== '').map(Number);
}

async function until(what: string, check: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A daemon on `work` (mounts under work/mounts) with debian-multi imported. */
async function daemonWithDebianMulti(work: string, extraArgs: string[] = []): Promise<RunningDaemon> {
  const daemon = await startDaemon(work, ['--mount-root', join(work, 'mounts'), ...extraArgs]);
  expect((await layerctl(['--socket', daemon.socket, 'import', DEBIAN_MULTI])).code).to.equal(0);
  return daemon;
}

/** Remove the containers, stop the daemon, and leave no mount and no file behind, whatever failed. */
async function tearDown(daemon: RunningDaemon | undefined, ids: string[], work: { dir: string; remove(): Promise<void> }): Promise<void> {
  try {
    if (daemon) {
      for (const id of ids) await layerctl(['--socket', daemon.socket, 'rm', id]);
      await daemon.stop();
    }
  } finally {
    await clearMountsUnder(work.dir);
    await work.remove();
  }
}

describe('daemon: mount hosts', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;
  before(async () => {
    work = await scratch();
    daemon = await daemonWithDebianMulti(work.dir);
  });
  after(() => tearDown(daemon, ['h1', 'h2', 'h3', 'h4'], work));
  const ctl = (...args: string[]) => layerctl(['--socket', daemon!.socket, ...args]);
  const serverOf = async (id: string): Promise<number> =>
    (JSON.parse((await ctl('ps', '--json')).stdout) as Array<{ id: string; serverPid: number }>).find((c) => c.id === id)!.serverPid;

  it('keeps a spare host ready, binds it to the first image mounted, and starts the next spare', async () => {
    const spare = join(daemon!.root, 'hosts', 'spare.sock');
    await until('a spare host', async () => (await hostsServing(spare)).length === 1);
    const [sparePid] = await hostsServing(spare);
    expect((await ctl('create', 'debian-multi:latest', '--name', 'h1')).code).to.equal(0);
    expect(await serverOf('h1')).to.equal(sparePid);
    expect(await cmdline(sparePid!)).to.include('--spare'); // the very process that was the spare
    await until('the next spare host', async () => (await hostsServing(spare)).some((p) => p !== sparePid));
  });

  it('serves every container of one image from one host, and another image from another', async () => {
    expect((await ctl('create', 'debian-multi:latest', '--name', 'h2')).code).to.equal(0);
    expect((await ctl('create', 'debian-multi:l1-minbase', '--name', 'h3')).code).to.equal(0);
    expect(await serverOf('h2')).to.equal(await serverOf('h1'));
    expect(await serverOf('h3')).to.not.equal(await serverOf('h1'));
    await execFileAsync('sh', ['-c', `echo mine > ${join(work.dir, 'mounts', 'h1', 'only-h1')}`]);
    expect((await execFileAsync('ls', [join(work.dir, 'mounts', 'h2')])).stdout).to.not.include('only-h1');
  });

  it('keeps the image\'s containers apart although their host merged the layers once: deletions, renames and hard links', async () => {
    const [h1, h2] = ['h1', 'h2'].map((id) => join(work.dir, 'mounts', id));
    // Lower content changed in h1 only: a file deleted, a directory renamed, one name of a hard-link group removed.
    await execFileAsync('sh', ['-c', `rm ${h1}/etc/os-release && mv ${h1}/usr/share/zoneinfo ${h1}/usr/share/tz && ln ${h1}/usr/bin/perl ${h1}/perl-too`]);
    const links = async (dir: string): Promise<string> => (await execFileAsync('stat', ['-c', '%h', join(dir, 'usr', 'bin', 'perl')])).stdout.trim();
    expect(await links(h1)).to.equal('3');
    expect(await links(h2)).to.equal('2');
    expect((await execFileAsync('sh', ['-c', `ls -d ${h2}/etc/os-release ${h2}/usr/share/zoneinfo/UTC; ls ${h2}/usr/share | grep -c '^tz$' || true`])).stdout)
      .to.equal(`${h2}/etc/os-release\n${h2}/usr/share/zoneinfo/UTC\n0\n`);
    // A container created now starts from the untouched merge.
    expect((await ctl('create', 'debian-multi:latest', '--name', 'h4')).code).to.equal(0);
    expect(await serverOf('h4')).to.equal(await serverOf('h1'));
    const h4 = join(work.dir, 'mounts', 'h4');
    expect((await execFileAsync('sh', ['-c', `grep -c VERSION_CODENAME=bookworm ${h4}/etc/os-release; ls -d ${h4}/usr/share/zoneinfo; [ -e ${h4}/usr/share/tz ] || echo no-tz`])).stdout)
      .to.equal(`1\n${h4}/usr/share/zoneinfo\nno-tz\n`);
    expect(await links(h4)).to.equal('2');
    expect((await ctl('rm', 'h4')).code).to.equal(0);
  });

  it('lets a host leave once its last container is removed', async () => {
    const host = await serverOf('h3');
    expect((await ctl('rm', 'h3')).code).to.equal(0);
    await until('the host to leave', async () => !processAlive(host));
    const shared = await serverOf('h1');
    expect((await ctl('rm', 'h1')).code).to.equal(0);
    // rm returns once the host has unmounted h1: a host leaving now would already be on its way out.
    expect(processAlive(shared), 'still serving h2').to.equal(true);
    expect(await serverOf('h2')).to.equal(shared);
    expect((await execFileAsync('cat', [join(work.dir, 'mounts', 'h2', 'etc', 'os-release')])).stdout).to.match(/Debian/);
  });
});

describe('daemon: the spare host ends with the daemon', function () {
  this.timeout(60_000);
  let work: { dir: string; remove(): Promise<void> };
  let spare: number | undefined;
  before(async () => { work = await scratch(); });
  after(async () => {
    if (spare !== undefined && processAlive(spare)) process.kill(spare, 'SIGKILL');
    await clearMountsUnder(work.dir);
    await work.remove();
  });

  it('stops its spare mount host when it stops', async () => {
    const daemon = await startDaemon(work.dir, ['--mount-root', join(work.dir, 'mounts'), '--snapshotter-socket', 'none']);
    try {
      const socket = join(daemon.root, 'hosts', 'spare.sock');
      await until('a spare host', async () => (await hostsServing(socket)).length === 1);
      [spare] = await hostsServing(socket);
    } finally {
      expect(await daemon.stop()).to.equal(0);
    }
    // Gone with the daemon (or, had it still been starting then, by itself right after).
    await until('the spare host to be gone', async () => !processAlive(spare!), 10_000);
  });

  it('and leaves by itself when its daemon is killed', async () => {
    const daemon = await startDaemon(work.dir, ['--mount-root', join(work.dir, 'mounts'), '--snapshotter-socket', 'none']);
    try {
      const socket = join(daemon.root, 'hosts', 'spare.sock');
      await until('a spare host', async () => (await hostsServing(socket)).length === 1);
      [spare] = await hostsServing(socket);
      daemon.child.kill('SIGKILL');
    } finally {
      await daemon.stop();
    }
    await until('the spare host to leave', async () => !processAlive(spare!), 15_000);
  });
});

describe('daemon: supervision of mount hosts', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;
  before(async () => {
    work = await scratch();
    daemon = await daemonWithDebianMulti(work.dir);
    for (const id of ['s1', 's2']) expect((await layerctl(['--socket', daemon.socket, 'create', 'debian-multi:latest', '--name', id])).code).to.equal(0);
  });
  after(() => tearDown(daemon, ['s1', 's2'], work));
  const ps = async () => JSON.parse((await layerctl(['--socket', daemon!.socket, 'ps', '--json'])).stdout) as Array<{ id: string; serverPid: number | null; state: string }>;

  it('mounts the containers of a host that died again, while the daemon keeps running', async () => {
    await execFileAsync('sh', ['-c', `echo kept > ${join(work.dir, 'mounts', 's1', 'root', 'kept')}`]);
    const host = (await ps()).find((c) => c.id === 's1')!.serverPid!;
    process.kill(host, 'SIGKILL');
    await until('both containers mounted by a new host', async () => {
      const list = await ps();
      return list.every((c) => c.state === 'mounted' && c.serverPid !== host);
    });
    expect((await execFileAsync('cat', [join(work.dir, 'mounts', 's1', 'root', 'kept')])).stdout).to.equal('kept\n');
    expect((await execFileAsync('cat', [join(work.dir, 'mounts', 's2', 'etc', 'os-release')])).stdout).to.match(/Debian/);
    expect(daemon!.log()).to.contain('mounting it again');
  });

  it('mounts a container again whose FUSE connection was aborted while its host keeps serving', async () => {
    const mnt = (id: string): string => join(work.dir, 'mounts', id);
    const catOf = (path: string): Promise<string> => execFileAsync('cat', [path]).then((r) => r.stdout, () => '');
    await execFileAsync('sh', ['-c', `echo kept > ${join(mnt('s2'), 'root', 'aborted')}`]);
    const host = (await ps()).find((c) => c.id === 's2')!.serverPid!;
    // What an admin clearing a hung mount does; the host lives on and serves s1.
    await abortFuseConnection(mnt('s2'));
    await until('s2 mounted again', async () => (await catOf(join(mnt('s2'), 'root', 'aborted'))) === 'kept\n');
    expect(processAlive(host)).to.equal(true);
    expect((await ps()).find((c) => c.id === 's2')!.serverPid, 'the same host serves it again').to.equal(host);
    expect(await catOf(join(mnt('s1'), 'etc', 'os-release'))).to.match(/Debian/);
    expect(daemon!.log()).to.contain('lost its mount while its host runs');
  });
});

describe('daemon: kernel caches of container mounts', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;

  beforeEach(async () => { work = await scratch(); });
  afterEach(async () => {
    await tearDown(daemon, ['c'], work);
    daemon = undefined;
  });

  async function containerWith(config: object): Promise<string> {
    const configPath = join(work.dir, 'config.json');
    await writeFile(configPath, JSON.stringify(config));
    daemon = await daemonWithDebianMulti(work.dir, ['--config', configPath]);
    const r = await layerctl(['--socket', daemon.socket, 'create', 'debian-multi:l1-minbase', '--name', 'c', '--json']);
    expect(r.code, r.stderr).to.equal(0);
    return (JSON.parse(r.stdout) as { mountpoint: string }).mountpoint;
  }
  const upperOf = (id: string): string => join(daemon!.root, 'containers', id, 'upper');

  it('shows a change made through one name of a hard-linked file through the other at once', async () => {
    expect(await seenThroughOtherName(await containerWith({}))).to.equal('13 600');
  });

  it('caches attributes for long by default: a change behind the mount stays unseen', async () => {
    const mnt = await containerWith({});
    expect(await sizeAfterChangeBehindMount(mnt, upperOf('c'))).to.equal(4);
  });

  it('with mountCacheSeconds: 1, a change behind the mount is seen once the second is over', async () => {
    const mnt = await containerWith({ mountCacheSeconds: 1 });
    expect(await sizeAfterChangeBehindMount(mnt, upperOf('c'), 5_000)).to.equal(13);
  });

  it('refuses a mountCacheSeconds that is not a number of seconds', async () => {
    const configPath = join(work.dir, 'config.json');
    await writeFile(configPath, JSON.stringify({ mountCacheSeconds: 'long' }));
    const r = await execFileAsync(join(REPO, 'bin', 'layerd'), ['--root', join(work.dir, 'root'), '--socket', join(work.dir, 's.sock'), '--config', configPath])
      .then(() => ({ code: 0, stderr: '' }), (err: { code: number; stderr: string }) => err);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/mountCacheSeconds/);
  });
});
