/**
 * The kernel cache lifetime of writable container mounts (config
 * `mountCacheSeconds`): the default (1 s) bounds how long `stat` of one name
 * of a hard-linked file can lag a change made through another name (a
 * libfuse 2 limit: each name is its own kernel inode); a long setting trades
 * that for speed. Real daemon, real mounts.
 */
import { expect } from 'chai';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { type RunningDaemon, startDaemon } from './support/daemon.js';
import { DEBIAN_MULTI, REPO, execFileAsync, layerctl, scratch } from './support/env.js';
import { clearMountsUnder } from './support/store.js';

/** Size of `b` as the kernel reports it, after growing the file through its other name `a`. */
async function sizeSeenThroughOtherName(mnt: string): Promise<number> {
  const sh = (script: string) => execFileAsync('sh', ['-c', script]);
  await sh(`cd ${mnt}/root && echo one > a && ln a b && stat -c %s b >/dev/null`);
  await sh(`echo two-more >> ${mnt}/root/a`);
  await new Promise((r) => setTimeout(r, 1500));
  return Number((await sh(`stat -c %s ${mnt}/root/b`)).stdout.trim());
}

describe('daemon: kernel cache lifetime of container mounts', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;

  beforeEach(async () => { work = await scratch(); });
  afterEach(async () => {
    try {
      if (daemon) {
        await layerctl(['--socket', daemon.socket, 'rm', 'c']);
        await daemon.stop();
        daemon = undefined;
      }
    } finally {
      await clearMountsUnder(work.dir);
      await work.remove();
    }
  });

  async function containerWith(config: object): Promise<string> {
    const configPath = join(work.dir, 'config.json');
    await writeFile(configPath, JSON.stringify(config));
    await mkdir(join(work.dir, 'mounts'));
    daemon = await startDaemon(work.dir, ['--config', configPath, '--mount-root', join(work.dir, 'mounts')]);
    const ctl = (...args: string[]) => layerctl(['--socket', daemon!.socket, ...args]);
    expect((await ctl('import', DEBIAN_MULTI)).code).to.equal(0);
    const r = await ctl('create', 'debian-multi:l1-minbase', '--name', 'c', '--json');
    expect(r.code, r.stderr).to.equal(0);
    return (JSON.parse(r.stdout) as { mountpoint: string }).mountpoint;
  }

  it('by default, another name of a changed hard-linked file is right within 1.5 s', async () => {
    expect(await sizeSeenThroughOtherName(await containerWith({}))).to.equal(13);
  });

  it('with mountCacheSeconds: 30, the kernel keeps the cached attributes longer', async () => {
    expect(await sizeSeenThroughOtherName(await containerWith({ mountCacheSeconds: 30 }))).to.equal(4);
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
