/**
 * What a container user creates never becomes a marker on the way to an
 * image (through the real daemon): lookalike xattrs survive a commit as
 * plain xattrs and hide nothing in the committed image; lookalike names,
 * which an OCI layer cannot express, make commit and export fail with a
 * clear error and leave no trace; `diff` lists them as what they are.
 */
import { expect } from 'chai';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { DEBIAN_MULTI, execFileAsync, layerctl, scratch, daemonCli } from './support/env.js';
import { type RunningDaemon, startDaemon } from './support/daemon.js';

describe('daemon: marker lookalikes from inside a container', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;
  let mountRoot: string;

  const { cli, json } = daemonCli(() => daemon!.socket);
  const xattr = async (path: string, name: string): Promise<string> =>
    (await execFileAsync('getfattr', ['--only-values', '-n', name, path])).stdout;

  before(async () => {
    work = await scratch();
    mountRoot = join(work.dir, 'mounts');
    daemon = await startDaemon(work.dir, ['--mount-root', mountRoot]);
    await cli('import', DEBIAN_MULTI);
  });
  after(async () => {
    try {
      if (daemon) {
        const list = await json<{ id: string }[]>('ps').catch(() => []);
        for (const c of list) await cli('rm', c.id).catch(() => undefined);
        await daemon.stop();
      }
    } finally {
      await work?.remove();
    }
  });

  it('commits opaque-marker xattrs a user set as plain xattrs: the committed image hides nothing', async () => {
    const c = await json<{ mountpoint: string }>('create', 'debian-multi:latest', '--name', 'xattrs');
    const etcBefore = (await readdir(join(c.mountpoint, 'etc'))).sort();
    await execFileAsync('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', join(c.mountpoint, 'etc')]);
    await execFileAsync('setfattr', ['-n', 'user.overlay.opaque', '-v', 'y', join(c.mountpoint, 'usr')]);
    await writeFile(join(c.mountpoint, 'etc', 'added'), 'x');
    const diff = await json<{ kind: string; path: string }[]>('diff', 'xattrs');
    expect(diff.filter((l) => l.kind === 'D'), 'nothing reads as deleted').to.deep.equal([]);
    expect(diff).to.deep.include({ kind: 'A', path: '/etc/added' });
    const commit = await json<{ image: string }>('commit', 'xattrs', 'marked:v1');
    expect(commit.image).to.match(/^sha256:/);
    const m = await json<{ mountpoint: string }>('create', 'marked:v1', '--name', 'from-marked');
    expect((await readdir(join(m.mountpoint, 'etc'))).sort()).to.deep.equal([...etcBefore, 'added'].sort());
    expect((await readdir(join(m.mountpoint, 'usr'))).length).to.be.greaterThan(2);
    expect(await xattr(join(m.mountpoint, 'etc'), 'trusted.overlay.opaque')).to.equal('y');
    expect(await xattr(join(m.mountpoint, 'usr'), 'user.overlay.opaque')).to.equal('y');
  });

  it('refuses to commit or export `.wh.` names a user made, says why, and keeps the container as it was', async () => {
    const c = await json<{ mountpoint: string }>('create', 'debian-multi:latest', '--name', 'names');
    await writeFile(join(c.mountpoint, '.wh..wh..opq'), 'mine');
    await mkdir(join(c.mountpoint, 'etc', '.wh.apt'));
    const diff = await json<{ kind: string; path: string }[]>('diff', 'names');
    expect(diff).to.deep.include({ kind: 'A', path: '/.wh..wh..opq' });
    expect(diff).to.deep.include({ kind: 'A', path: '/etc/.wh.apt' });
    expect(diff.filter((l) => l.kind === 'D')).to.deep.equal([]);
    const imagesBefore = await cli('images', '--json');
    const commit = await layerctl(['--socket', daemon!.socket, 'commit', 'names', 'bad:v1']);
    expect(commit.code, commit.stderr).to.equal(6);
    expect(commit.stderr).to.match(/EUNSUPPORTED.*\.wh\./);
    const exported = await layerctl(['--socket', daemon!.socket, 'export', 'names', '-o', join(work.dir, 'names.tar')]);
    expect(exported.code, exported.stderr).to.equal(6);
    expect(await cli('images', '--json'), 'a failed commit leaves no image').to.equal(imagesBefore);
    expect(await readFile(join(c.mountpoint, '.wh..wh..opq'), 'utf8')).to.equal('mine');
    expect((await readdir(join(c.mountpoint, 'etc'))).length).to.be.greaterThan(10, '/etc still shows the image');
  });
});
