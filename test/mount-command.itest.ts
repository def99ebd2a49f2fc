/**
 * The `layerd mount` server process and the programmatic `mountUnion`:
 * lifecycle (ready line, SIGTERM, external umount, bad arguments) and the
 * read-only mode. Real FUSE mounts; needs root and /dev/fuse.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFile, readdir, writeFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import winston from 'winston';
import { clearDeadMount, findMount, isDeadMount } from '../mount/deadMount.js';
import { lowerDirSource } from '../mount/lowerDir.js';
import { mountUnion, type MountedUnion } from '../mount/mountCommand.js';
import { waitFor } from './support/daemon.js';
import { MOUNT_COMMAND, makeWorkspace, removeWorkspace, run, startLayerdServer, stopLayerdServer, type Workspace } from './fixtures/mount/harness.js';

function exitOf(child: ReturnType<typeof spawn>, timeoutMs = 10_000): Promise<number | null> {
  if (child.exitCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((done, fail) => {
    const timer = setTimeout(() => fail(new Error('server did not exit')), timeoutMs);
    child.once('exit', (code) => { clearTimeout(timer); done(code); });
  });
}

describe('mount command (layerd mount server)', function () {
  this.timeout(60_000);
  let ws: Workspace;

  beforeEach(async () => { ws = await makeWorkspace(); });
  afterEach(async () => { await removeWorkspace(ws); });

  it('prints ready, serves, and exits 0 on SIGTERM leaving no mount', async () => {
    const child = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt);
    try {
      assert.equal(await readFile(join(ws.mnt, 'etc/passwd'), 'utf8'), 'root:x:0:0\n');
      assert.equal((await findMount(ws.mnt))?.fstype, 'fuse.layerd');
      child.kill('SIGTERM');
      assert.equal(await exitOf(child), 0);
      assert.equal(await findMount(ws.mnt), undefined);
    } finally {
      await stopLayerdServer(child, ws.mnt);
    }
  });

  it('raises the mount\'s read-ahead to one READ request (1 MiB)', async function () {
    if (process.getuid?.() !== 0) this.skip(); // the sysfs knob is root's
    const child = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt);
    try {
      const mount = await findMount(ws.mnt);
      assert.equal((await readFile(`/sys/class/bdi/${mount!.major}:${mount!.minor}/read_ahead_kb`, 'utf8')).trim(), '1024');
    } finally {
      await stopLayerdServer(child, ws.mnt);
    }
  });

  it('mounts and unmounts as root with system calls: no mount(8)/umount(8) process (none on its PATH)', async function () {
    if (process.getuid?.() !== 0) this.skip(); // as a user it mounts through fusermount3
    // A process per mount and per unmount was on the path of every container start and removal (issue 15).
    const child = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt, { ...process.env, PATH: join(ws.root, 'no-such-bin') });
    try {
      assert.equal(await readFile(join(ws.mnt, 'etc/passwd'), 'utf8'), 'root:x:0:0\n');
      assert.equal((await findMount(ws.mnt))?.fstype, 'fuse.layerd');
      child.kill('SIGTERM');
      assert.equal(await exitOf(child), 0);
      assert.equal(await findMount(ws.mnt), undefined);
    } finally {
      await stopLayerdServer(child, ws.mnt);
    }
  });

  it('exits 0 when someone else unmounts it', async () => {
    const child = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt);
    try {
      const res = await run('umount', [ws.mnt]);
      assert.equal(res.code, 0, res.stderr);
      assert.equal(await exitOf(child), 0);
    } finally {
      await stopLayerdServer(child, ws.mnt);
    }
  });

  it('detects a hung server and clears its mount (fusectl abort + umount -l)', async () => {
    const child = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt);
    try {
      child.kill('SIGSTOP');
      assert.equal(await isDeadMount(ws.mnt, 1000), true);
      assert.equal(await clearDeadMount(ws.mnt), true);
      assert.equal(await findMount(ws.mnt), undefined);
      assert.deepEqual(await readdir(ws.mnt), []);
    } finally {
      child.kill('SIGKILL');
      await stopLayerdServer(child, ws.mnt);
    }
  });

  it('exits 2 on bad arguments without mounting', async () => {
    const child = spawn(process.execPath, [MOUNT_COMMAND, '--upper', ws.upper, ws.mnt], { stdio: 'ignore' });
    assert.equal(await exitOf(child), 2);
    assert.equal(await findMount(ws.mnt), undefined);
  });

  it('refuses a missing lower directory with a typed error', async () => {
    const child = spawn(process.execPath, [MOUNT_COMMAND, '--lower', join(ws.root, 'nope'), '--upper', ws.upper, ws.mnt], { stdio: 'ignore' });
    assert.notEqual(await exitOf(child), 0);
    assert.equal(await findMount(ws.mnt), undefined);
  });

  it('refuses an upper dir inside the mountpoint (the server would wait on itself)', async () => {
    await assert.rejects(mountUnion({ layers: [], upper: join(ws.mnt, 'up'), mountpoint: ws.mnt }), { code: 'EINVAL' });
    assert.equal(await findMount(ws.mnt), undefined);
  });

  it('logs why its FUSE connection ended when that was not its own unmount (an abort from outside)', async () => {
    const records: Array<{ message: string; why?: string }> = [];
    const sink = new Writable({ write(chunk: Buffer, _encoding, done) { records.push(JSON.parse(chunk.toString()) as { message: string }); done(); } });
    const logger = winston.createLogger({ level: 'info', format: winston.format.json(), transports: [new winston.transports.Stream({ stream: sink })] });
    const layers = await Promise.all([...ws.lowers].reverse().map((dir) => lowerDirSource(dir)));
    const ended = () => records.filter((r) => r.message === 'FUSE connection ended');
    let mounted: MountedUnion | undefined;
    try {
      mounted = await mountUnion({ layers, upper: ws.upper, mountpoint: ws.mnt, logger });
      await mounted.unmount();
      assert.deepEqual(ended(), [], 'its own unmount is no loss');
      mounted = await mountUnion({ layers, upper: ws.upper, mountpoint: ws.mnt, logger });
      assert.equal(await clearDeadMount(ws.mnt), true); // fusectl abort, as another process may do
      await waitFor('the warning', () => ended().length > 0, 10_000);
      assert.match(ended()[0]!.why ?? '', /ENODEV/);
    } finally {
      await mounted?.unmount();
      if (await findMount(ws.mnt)) await clearDeadMount(ws.mnt);
    }
  });

  it('mounts programmatically read-only (async access only in the serving process)', async () => {
    const layers = await Promise.all([...ws.lowers].reverse().map((dir) => lowerDirSource(dir)));
    let mounted: MountedUnion | undefined;
    try {
      mounted = await mountUnion({ layers, upper: ws.upper, mountpoint: ws.mnt, readOnly: true });
      assert.deepEqual((await readdir(join(ws.mnt, 'opq'))).sort(), ['new']);
      assert.equal((await stat(join(ws.mnt, 'special'))).mode & 0o7777, 0o4750);
      await assert.rejects(writeFile(join(ws.mnt, 'etc/x'), 'x'), { code: 'EROFS' });
    } finally {
      await mounted?.unmount();
    }
    assert.equal(await findMount(ws.mnt), undefined);
  });
});
