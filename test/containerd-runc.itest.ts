/**
 * runc on its own: an OCI bundle (from `runc spec`) whose rootfs is a layerd
 * container mount runs, prints, writes into the container's writable layer,
 * and exits 0; a non-root process reads the image's files (allow_other).
 * Skipped only if runc is not installed.
 */
import { expect } from 'chai';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BUSYBOX, scratch, daemonCli } from './support/env.js';
import { type RunningDaemon, startDaemon } from './support/daemon.js';
import { clearMountsUnder } from './support/store.js';
import { ok, run } from './support/containerd.js';

interface RuntimeSpec {
  process: { terminal: boolean; args: string[]; user: { uid: number; gid: number } };
  root: { path: string; readonly: boolean };
  hostname?: string;
}

describe('runc: a bundle whose rootfs is a layerd mount', function () {
  this.timeout(180_000);
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let daemon: RunningDaemon | undefined;
  const ids: string[] = [];
  let runcMissing: string | undefined;

  const { cli } = daemonCli(() => daemon!.socket);
  const runcRoot = (): string => join(work!.dir, 'runc-state');

  /** A bundle from `runc spec`, its rootfs the mount of a new layerd container. */
  const bundle = async (name: string, args: string[], user = { uid: 0, gid: 0 }): Promise<{ dir: string; upper: string }> => {
    const created = JSON.parse(await cli('create', 'busybox:latest', '--name', name, '--json')) as { mountpoint: string };
    const dir = join(work!.dir, `bundle-${name}`);
    await mkdir(dir);
    ok('runc spec', await run('runc', ['spec', '--bundle', dir]));
    const spec = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as RuntimeSpec;
    spec.process.terminal = false;
    spec.process.args = args;
    spec.process.user = { ...spec.process.user, ...user };
    spec.root = { path: created.mountpoint, readonly: false };
    spec.hostname = name;
    await writeFile(join(dir, 'config.json'), JSON.stringify(spec, null, 2));
    return { dir, upper: join(daemon!.root, 'containers', name, 'upper') };
  };

  before(async function () {
    runcMissing = await run('sh', ['-c', 'command -v runc']).then((r) => (r.code === 0 ? undefined : 'runc is not installed (apt-get install runc)'));
    if (runcMissing) {
      console.warn(`      skipped: ${runcMissing}`);
      this.skip();
    }
    work = await scratch('layerd-runc-');
    daemon = await startDaemon(work.dir, ['--mount-root', join(work.dir, 'mounts'), '--snapshotter-socket', 'none']);
    await cli('import', BUSYBOX);
  });

  after(async () => {
    if (!work) return;
    for (const id of ids) await run('runc', ['--root', runcRoot(), 'delete', '--force', id]).catch(() => undefined);
    if (daemon) {
      const list = JSON.parse(await cli('ps', '--json').catch(() => '[]')) as { id: string }[];
      for (const c of list) await cli('rm', c.id).catch(() => undefined);
      await daemon.stop();
    }
    await clearMountsUnder(work.dir);
    const left = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => l.includes(work!.dir));
    await work.remove();
    expect(left, 'no mount left behind').to.deep.equal([]);
  });

  it('runs, prints and exits 0; its writes land in the container\'s writable layer', async () => {
    const b = await bundle('runc-1', ['sh', '-c', 'echo hello from runc on layerd; hostname; echo made-by-runc > /root/runc.txt; ls /bin/busybox']);
    const id = `layerd-runc-${process.pid}-1`;
    ids.push(id);
    const r = await run('runc', ['--root', runcRoot(), 'run', '--bundle', b.dir, id], { timeoutMs: 60_000 });
    expect(r.stderr).to.equal('');
    expect(r.code).to.equal(0);
    expect(r.stdout).to.equal('hello from runc on layerd\nrunc-1\n/bin/busybox\n');
    expect(await readFile(join(b.upper, 'root', 'runc.txt'), 'utf8')).to.equal('made-by-runc\n');
    expect(await readdir(b.upper), 'nothing but the write (and its directory) in the writable layer').to.deep.equal(['root']);
  });

  it('a non-root process in the container reads the image\'s files', async () => {
    const b = await bundle('runc-2', ['sh', '-c', 'id -u; head -1 /etc/passwd; cat /bin/busybox > /dev/null && echo read-busybox'], { uid: 65534, gid: 65534 });
    const id = `layerd-runc-${process.pid}-2`;
    ids.push(id);
    const r = await run('runc', ['--root', runcRoot(), 'run', '--bundle', b.dir, id], { timeoutMs: 60_000 });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal('65534\nroot:x:0:0:root:/root:/bin/sh\nread-busybox\n');
  });
});
