/**
 * The host's FUSE wake-up setting (mount/fuseWakeups.ts): what
 * preferWakeupsHere does with each value it can find, that a real `layerd
 * mount` turns the parameter on (or leaves it with LAYERD_FUSE_WAKE_HERE=0),
 * and that the daemon turns it on once when it starts while its mount hosts
 * leave it to the admin afterwards.
 *
 * The processes under test are pointed at a file of the test's own
 * (LAYERD_FUSE_WAKE_HERE_FILE): the kernel's parameter is one for the whole
 * host, and test runs side by side would otherwise see each other's writes.
 * The kernel's own parameter is only read here. Needs root (mounts).
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WAKE_HERE_PARAMETER, preferWakeupsHere } from '../mount/fuseWakeups.js';
import { makeWorkspace, removeWorkspace, startLayerdServer, stopLayerdServer, type Workspace } from './fixtures/mount/harness.js';
import { type RunningDaemon, startDaemon } from './support/daemon.js';
import { DEBIAN_MULTI, daemonCli, scratch } from './support/env.js';

describe('FUSE wake-ups on the waking CPU (fuse wake_here)', function () {
  this.timeout(60_000);
  let dir: string;
  let param: string;
  const value = async (): Promise<string> => (await readFile(param, 'utf8')).trim();
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'layerd-wake-here-'));
    param = join(dir, 'wake_here');
  });
  afterEach(async () => { await rm(dir, { recursive: true, force: true }); });

  describe('preferWakeupsHere', () => {
    it('turns an N on', async () => {
      await writeFile(param, 'N\n');
      expect(await preferWakeupsHere({ path: param, enable: true })).to.equal('turned-on');
      expect(await value()).to.equal('Y');
    });

    it('leaves a Y as it is', async () => {
      await writeFile(param, 'Y\n');
      expect(await preferWakeupsHere({ path: param, enable: true })).to.equal('on');
      expect(await readFile(param, 'utf8')).to.equal('Y\n');
    });

    it('leaves an N off when not wanted', async () => {
      await writeFile(param, 'N\n');
      expect(await preferWakeupsHere({ path: param, enable: false })).to.equal('left-off');
      expect(await value()).to.equal('N');
    });

    it('says absent where the kernel has no such parameter, and does not create it', async () => {
      expect(await preferWakeupsHere({ path: param, enable: true })).to.equal('absent');
      await readFile(param).then(() => expect.fail('created'), (err: NodeJS.ErrnoException) => expect(err.code).to.equal('ENOENT'));
    });

    it('says refused, without throwing, where it cannot be written', async () => {
      // A kernel file nobody can write, root included, read as "not Y".
      expect(await preferWakeupsHere({ path: '/proc/version', enable: true })).to.equal('refused');
    });

    it('reads the kernel\'s own parameter, where it has one, as on or off', async function () {
      const kernel = await readFile(WAKE_HERE_PARAMETER, 'utf8').then((v) => v.trim(), () => undefined);
      if (kernel === undefined) this.skip();
      // (another run's first mount may turn it on meanwhile: either answer, never a write)
      expect(await preferWakeupsHere({ path: WAKE_HERE_PARAMETER, enable: false })).to.be.oneOf(['on', 'left-off']);
    });
  });

  describe('a real layerd mount', () => {
    let ws: Workspace;
    let server: ChildProcess | undefined;
    before(async () => { ws = await makeWorkspace(); });
    afterEach(async () => {
      if (server) await stopLayerdServer(server, ws.mnt);
      server = undefined;
    });
    after(async () => { await removeWorkspace(ws); });

    it('turns it on when it mounts', async () => {
      await writeFile(param, 'N\n');
      server = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt, { ...process.env, LAYERD_FUSE_WAKE_HERE_FILE: param });
      expect(await value()).to.equal('Y');
    });

    it('leaves it off with LAYERD_FUSE_WAKE_HERE=0', async () => {
      await writeFile(param, 'N\n');
      server = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt,
        { ...process.env, LAYERD_FUSE_WAKE_HERE_FILE: param, LAYERD_FUSE_WAKE_HERE: '0' });
      expect(await value()).to.equal('N');
    });
  });

  describe('the daemon', () => {
    let work: { dir: string; remove(): Promise<void> } | undefined;
    let daemon: RunningDaemon | undefined;
    const { cli, json } = daemonCli(() => daemon!.socket);
    before(async () => { work = await scratch('layerd-wake-here-daemon-'); });
    after(async () => {
      if (daemon) {
        await cli('rm', 'wake').catch(() => undefined);
        await daemon.stop();
      }
      await work?.remove();
    });

    it('turns it on when it starts; its mount hosts then leave it as the admin sets it', async () => {
      await writeFile(param, 'N\n');
      daemon = await startDaemon(work!.dir, [], { LAYERD_FUSE_WAKE_HERE_FILE: param });
      expect(await value(), 'after the daemon started').to.equal('Y');
      expect(daemon.log()).to.contain('wake_here=Y');
      await cli('import', DEBIAN_MULTI);
      // An admin turns it off: a container's mount (a new mount host) must not turn it on again.
      await writeFile(param, 'N\n');
      const made = await json<{ mountpoint: string }>('create', 'debian-multi:latest', '--name', 'wake');
      expect((await readFile(join(made.mountpoint, 'etc', 'os-release'), 'utf8'))).to.contain('bookworm');
      expect(await value(), 'after a mount host served').to.equal('N');
    });
  });
});
