/**
 * Store images mounted for real: 100 mounts of one image, each with its own
 * writable layer, served by one process (nothing copied, writes isolated);
 * and a mount server killed mid-work leaves a clearable mountpoint and the
 * data it had fsynced.
 */
import { expect } from 'chai';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { clearDeadMount, findMount } from '../mount/deadMount.js';
import { REPO, execFileAsync, scratch } from './support/env.js';
import { type ChildExit, stopChild } from './support/processes.js';
import { clearMountsUnder, storeWithDebianMulti } from './support/store.js';

const MOUNTS = 100;

/** Wait for a line on a child's stdout that matches. */
function waitForLine(child: ChildProcess, re: RegExp, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${re}: ${out}`)), timeoutMs);
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = re.exec(out);
      if (m) { clearTimeout(timer); resolve(m[0]); }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`exited ${code}: ${out}`)); });
  });
}

describe('mounts of store images', function () {
  this.timeout(600_000);
  let work: { dir: string; remove(): Promise<void> };
  let root: string;

  before(async () => {
    work = await scratch();
    root = join(work.dir, 'store');
    await storeWithDebianMulti(root);
  });
  after(async () => {
    if (work) await clearMountsUnder(work.dir);
    await work?.remove();
  });

  it(`serves ${MOUNTS} mounts of debian-multi from one process, each with its own writable layer`, async () => {
    const script = `
      import { mountUnion } from ${JSON.stringify(join(REPO, 'dist', 'mount', 'mountUnion.js'))};
      import { Store } from ${JSON.stringify(join(REPO, 'dist', 'storage', 'store.js'))};
      import { tarLayerSource } from ${JSON.stringify(join(REPO, 'dist', 'storage', 'layerIndex.js'))};
      import { mkdir } from 'node:fs/promises';
      const store = await Store.open(${JSON.stringify(root)});
      const layers = (await store.imageLayers('debian-multi:latest')).map((l) => tarLayerSource(l.index, l.tarPath));
      store.close();
      const mounted = [];
      for (let i = 0; i < ${MOUNTS}; i++) {
        const base = ${JSON.stringify(work.dir)} + '/c' + i;
        await mkdir(base + '/upper', { recursive: true });
        await mkdir(base + '/mnt', { recursive: true });
        mounted.push(await mountUnion({ layers, upper: base + '/upper', mountpoint: base + '/mnt' }));
      }
      console.log('ready rss=' + process.memoryUsage().rss);
      process.once('SIGTERM', async () => { for (const m of mounted) await m.unmount(); process.exit(0); });
    `;
    const server = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    let exit: ChildExit | undefined;
    try {
      const ready = await waitForLine(server, /ready rss=\d+/, 300_000);
      const rss = Number(ready.split('=')[1]);
      process.stdout.write(`      (${MOUNTS} mounts in one server: RSS ${(rss / 1024 / 1024).toFixed(0)} MiB)\n`);
      const mnt = (i: number): string => join(work.dir, `c${i}`, 'mnt');
      for (let i = 0; i < MOUNTS; i++) await writeFile(join(mnt(i), 'root', `mine-${i}`), String(i));
      for (let i = 0; i < MOUNTS; i += 7) {
        const names = (await readdir(join(mnt(i), 'root'))).filter((n) => n.startsWith('mine-'));
        expect(names, `mount ${i} sees only its own write`).to.deep.equal([`mine-${i}`]);
        expect(await readFile(join(mnt(i), 'etc', 'debian_version'), 'utf8')).to.match(/^12\./);
      }
      // Nothing of the image was copied: each writable layer holds the one file (and its directory).
      const { stdout } = await execFileAsync('sh', ['-c', `cd ${work.dir}/c42/upper && find . | sort`]);
      expect(stdout.trim().split('\n')).to.deep.equal(['.', './root', './root/mine-42']);
    } finally {
      // unmounting 100 mounts takes a while on a busy machine; SIGKILL after the grace period
      exit = await stopChild(server, { graceMs: 60_000, what: 'the mount server' });
    }
    expect(exit, 'the server unmounted everything and exited on SIGTERM').to.deep.equal({ code: 0, signal: null });
    for (let i = 0; i < MOUNTS; i++) expect(await findMount(join(work.dir, `c${i}`, 'mnt')), `mount ${i} gone`).to.equal(undefined);
  });

  it('keeps fsynced writes when the mount server is killed, and the mountpoint can be cleared', async () => {
    const upper = join(work.dir, 'kill', 'upper');
    const mnt = join(work.dir, 'kill', 'mnt');
    await mkdir(upper, { recursive: true });
    await mkdir(mnt, { recursive: true });
    const server = spawn(join(REPO, 'bin', 'layerd'), ['mount', '--root', root, '--image', 'debian-multi:latest', '--upper', upper, mnt], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await waitForLine(server, /ready /, 60_000);
      // Another process writes and fsyncs, then keeps writing without fsync.
      await execFileAsync('python3', ['-c', `
import os
fd = os.open(${JSON.stringify(join(mnt, 'root', 'durable'))}, os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b'fsynced data\\n'); os.fsync(fd); os.close(fd)
with open(${JSON.stringify(join(mnt, 'etc', 'hostname'))}, 'a') as f:
    f.write('appended\\n'); f.flush(); os.fsync(f.fileno())
`], { timeout: 60_000 });
    } finally {
      await stopChild(server, { signal: 'SIGKILL', what: 'the mount server' });
    }
    const probe = await execFileAsync('stat', [mnt]).then(() => 'ok', (err: { stderr?: string }) => err.stderr ?? '');
    expect(probe).to.match(/Transport endpoint is not connected/);
    await clearDeadMount(mnt);
    expect(await findMount(mnt)).to.equal(undefined);
    expect(await readFile(join(upper, 'root', 'durable'), 'utf8')).to.equal('fsynced data\n');
    expect(await readFile(join(upper, 'etc', 'hostname'), 'utf8')).to.equal('localhost\nappended\n');
  });
});
