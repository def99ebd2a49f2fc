/**
 * The host's FUSE wake-up setting (mount/fuseWakeups.ts): what
 * preferWakeupsHere does with each value it can find (on a file of the
 * test's own), and that a real `layerd mount` turns the kernel's parameter
 * on, or leaves it off with LAYERD_FUSE_WAKE_HERE=0. The parameter's value
 * found before the test is put back after it. Needs root.
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WAKE_HERE_PARAMETER, preferWakeupsHere } from '../mount/fuseWakeups.js';
import { makeWorkspace, removeWorkspace, startLayerdServer, stopLayerdServer, type Workspace } from './fixtures/mount/harness.js';

describe('FUSE wake-ups on the waking CPU (fuse wake_here)', function () {
  this.timeout(60_000);

  describe('preferWakeupsHere, on a file of its own', () => {
    let dir: string;
    let param: string;
    beforeEach(async () => {
      dir = await mkdtemp(join(tmpdir(), 'layerd-wake-here-'));
      param = join(dir, 'wake_here');
    });
    afterEach(async () => { await rm(dir, { recursive: true, force: true }); });

    it('turns an N on', async () => {
      await writeFile(param, 'N\n');
      expect(await preferWakeupsHere({ path: param, enable: true })).to.equal('turned-on');
      expect((await readFile(param, 'utf8')).trim()).to.equal('Y');
    });

    it('leaves a Y as it is', async () => {
      await writeFile(param, 'Y\n');
      expect(await preferWakeupsHere({ path: param, enable: true })).to.equal('on');
      expect(await readFile(param, 'utf8')).to.equal('Y\n');
    });

    it('leaves an N off when not wanted', async () => {
      await writeFile(param, 'N\n');
      expect(await preferWakeupsHere({ path: param, enable: false })).to.equal('left-off');
      expect((await readFile(param, 'utf8')).trim()).to.equal('N');
    });

    it('says absent where the kernel has no such parameter, and does not create it', async () => {
      expect(await preferWakeupsHere({ path: param, enable: true })).to.equal('absent');
      await readFile(param).then(() => expect.fail('created'), (err: NodeJS.ErrnoException) => expect(err.code).to.equal('ENOENT'));
    });

    it('says refused, without throwing, where it cannot be written', async () => {
      // A kernel file nobody can write, root included, read as "not Y".
      expect(await preferWakeupsHere({ path: '/proc/version', enable: true })).to.equal('refused');
    });
  });

  describe('a real layerd mount, with the kernel parameter', () => {
    let ws: Workspace;
    let server: ChildProcess | undefined;
    let found: string | undefined;

    before(async function () {
      found = await readFile(WAKE_HERE_PARAMETER, 'utf8').then((v) => v.trim(), () => undefined);
      if (found === undefined) this.skip(); // a kernel without the parameter: nothing to turn on
      ws = await makeWorkspace();
    });
    afterEach(async () => {
      if (server) await stopLayerdServer(server, ws.mnt);
      server = undefined;
    });
    after(async () => {
      if (found !== undefined) {
        await writeFile(WAKE_HERE_PARAMETER, `${found}\n`);
        await removeWorkspace(ws);
      }
    });

    it('turns it on when it mounts', async () => {
      await writeFile(WAKE_HERE_PARAMETER, 'N\n');
      server = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt);
      expect((await readFile(WAKE_HERE_PARAMETER, 'utf8')).trim()).to.equal('Y');
    });

    it('leaves it off with LAYERD_FUSE_WAKE_HERE=0', async () => {
      await writeFile(WAKE_HERE_PARAMETER, 'N\n');
      server = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt, { ...process.env, LAYERD_FUSE_WAKE_HERE: '0' });
      expect((await readFile(WAKE_HERE_PARAMETER, 'utf8')).trim()).to.equal('N');
    });
  });
});
