/**
 * A real workload: `apt-get update && apt-get install hello` in a chroot on
 * a layerd mount of debian-multi:l2-packages, and the same on kernel
 * overlayfs over the same layers; the two writable layers must record the
 * same change (times, apt's caches and logs left out). Needs the Debian
 * mirror; skipped with a message when it cannot be reached.
 */
import { expect } from 'chai';
import { type ChildProcess, spawn } from 'node:child_process';
import { access, copyFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { findMount } from '../mount/deadMount.js';
import { Store } from '../storage/store.js';
import { REPO, execFileAsync, scratch } from './support/env.js';
import { clearMountsUnder, storeWithDebianMulti } from './support/store.js';
import { overlayLower } from './support/overlayLower.js';

const IMAGE = 'debian-multi:l2-packages';
const VOLATILE = ['var/cache', 'var/lib/apt/lists', 'var/log', 'etc/resolv.conf', 'tmp', 'dev', 'proc', 'var/lib/dpkg/status-old',
  'var/lib/dpkg/diversions-old', 'var/lib/dpkg/statoverride-old', 'var/lib/dpkg/lock', 'var/lib/dpkg/lock-frontend', 'var/lib/dpkg/triggers/Lock',
  'var/lib/apt/extended_states', 'var/lib/dpkg/available', 'var/lib/dpkg/available-old', 'var/lib/apt/lists/lock', 'var/cache/apt'];

async function mirrorReachable(): Promise<boolean> {
  try {
    await execFileAsync('curl', ['-sfI', '--max-time', '10', 'http://deb.debian.org/debian/dists/bookworm/InRelease']);
    return true;
  } catch {
    return false;
  }
}

async function aptInstall(mnt: string): Promise<string> {
  await execFileAsync('mount', ['--bind', '/dev', join(mnt, 'dev')]);
  await execFileAsync('mount', ['-t', 'proc', 'proc', join(mnt, 'proc')]);
  try {
    await copyFile('/etc/resolv.conf', join(mnt, 'etc', 'resolv.conf'));
    const { stdout } = await execFileAsync('chroot', [mnt, 'sh', '-c',
      'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hello >/dev/null 2>&1 && dpkg -s hello && /usr/bin/hello'],
    { timeout: 420_000, maxBuffer: 16 * 1024 * 1024 });
    return stdout;
  } finally {
    await execFileAsync('umount', [join(mnt, 'proc')]).catch(() => undefined);
    await execFileAsync('umount', [join(mnt, 'dev')]).catch(() => undefined);
  }
}

async function upperListing(upper: string): Promise<string[]> {
  const { stdout } = await execFileAsync('python3', [join(REPO, 'test', 'tools', 'upperlist.py'), upper, ...VOLATILE], { maxBuffer: 64 * 1024 * 1024 });
  return stdout.split('\n').filter((l) => l !== '');
}

describe('real workload: apt-get install in a chroot', function () {
  this.timeout(1_200_000);
  let work: { dir: string; remove(): Promise<void> };
  let root: string;
  const listings: Record<string, string[]> = {};

  before(async function () {
    if (!(await mirrorReachable())) {
      process.stdout.write('      (the Debian mirror cannot be reached: skipped)\n');
      this.skip();
    }
    work = await scratch('layerd-apt-');
    root = join(work.dir, 'store');
    await storeWithDebianMulti(root);
  });
  after(async () => {
    if (!work) return;
    await clearMountsUnder(work.dir);
    await work.remove();
  });

  it('installs a package on a layerd mount', async () => {
    const upper = join(work.dir, 'layerd-upper');
    const mnt = join(work.dir, 'layerd-mnt');
    await mkdir(upper);
    await mkdir(mnt);
    const server: ChildProcess = spawn(join(REPO, 'bin', 'layerd'), ['mount', '--root', root, '--image', IMAGE, '--upper', upper, mnt], { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      await new Promise<void>((resolve, reject) => {
        server.stdout!.on('data', (d: Buffer) => { if (d.toString().includes('ready')) resolve(); });
        server.on('exit', (code) => reject(new Error(`mount server exited ${code}`)));
      });
      const out = await aptInstall(mnt);
      expect(out).to.contain('Status: install ok installed');
      expect(out).to.contain('Hello, world!');
    } finally {
      server.kill('SIGTERM');
      await new Promise((r) => server.once('exit', r));
    }
    expect(await findMount(mnt)).to.equal(undefined);
    listings['layerd'] = await upperListing(upper);
  });

  it('installs it on kernel overlayfs over the same layers, with the same resulting writable layer', async () => {
    const store = await Store.open(root);
    const layers = await store.imageLayers(IMAGE);
    store.close();
    const lowers: string[] = [];
    for (const [i, layer] of layers.entries()) {
      const dir = join(work.dir, `lower-${i}`);
      await overlayLower(layer.tarPath, dir);
      lowers.unshift(dir); // overlayfs: top first
    }
    const upper = join(work.dir, 'ovl-upper');
    const workdir = join(work.dir, 'ovl-work');
    const mnt = join(work.dir, 'ovl-mnt');
    for (const d of [upper, workdir, mnt]) await mkdir(d);
    await execFileAsync('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lowers.join(':')},upperdir=${upper},workdir=${workdir}`, mnt]);
    try {
      const out = await aptInstall(mnt);
      expect(out).to.contain('Status: install ok installed');
    } finally {
      await execFileAsync('umount', [mnt]);
    }
    // overlayfs may mark a directory it created opaque although nothing lies
    // below it; such a marker changes nothing, so it is not part of the change.
    const inLower = async (path: string): Promise<boolean> => {
      for (const dir of lowers) if (await access(join(dir, path)).then(() => true, () => false)) return true;
      return false;
    };
    const overlay: string[] = [];
    for (const line of await upperListing(upper)) {
      const [path, kind] = line.split('\t');
      if (kind === 'opaque' && !(await inLower(path!))) continue;
      overlay.push(line);
    }
    const ours = listings['layerd'];
    expect(ours, 'the layerd run produced a listing').to.not.equal(undefined);
    const onlyOurs = ours!.filter((l) => !overlay.includes(l));
    const onlyOverlay = overlay.filter((l) => !ours!.includes(l));
    expect({ onlyLayerd: onlyOurs, onlyOverlayfs: onlyOverlay }).to.deep.equal({ onlyLayerd: [], onlyOverlayfs: [] });
    expect(ours!.some((l) => l.startsWith('usr/bin/hello\t'))).to.equal(true);
  });
});
