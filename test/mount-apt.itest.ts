/**
 * A real workload: `apt-get update && apt-get install hello` in a chroot on
 * a layerd mount of debian-multi:l2-packages, and the same on kernel
 * overlayfs over the same layers; the two writable layers must record the
 * same change (times, apt's caches and logs left out). Needs the Debian
 * archive: apt itself is asked first (`apt-get update` of the configured
 * sources into scratch lists), and the suite is skipped, saying why, only
 * when apt cannot fetch from its archive.
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
import { stopChild } from './support/processes.js';

const IMAGE = 'debian-multi:l2-packages';
const VOLATILE = ['var/cache', 'var/lib/apt/lists', 'var/log', 'etc/resolv.conf', 'tmp', 'dev', 'proc', 'var/lib/dpkg/status-old',
  'var/lib/dpkg/diversions-old', 'var/lib/dpkg/statoverride-old', 'var/lib/dpkg/lock', 'var/lib/dpkg/lock-frontend', 'var/lib/dpkg/triggers/Lock',
  'var/lib/apt/extended_states', 'var/lib/dpkg/available', 'var/lib/dpkg/available-old', 'var/lib/apt/lists/lock', 'var/cache/apt'];

const APT_PROBE_TIMEOUT_MS = 180_000;

/**
 * Why apt cannot reach its archive (apt's own errors), or undefined if it can.
 * `apt-get update` of the host's configured sources into scratch directories
 * (the host's lists are left alone); a failure that is not a fetch failure throws.
 */
async function aptArchiveUnreachable(scratchDir: string): Promise<string | undefined> {
  const lists = join(scratchDir, 'apt-lists');
  const cache = join(scratchDir, 'apt-cache');
  await mkdir(join(lists, 'partial'), { recursive: true });
  await mkdir(join(cache, 'archives', 'partial'), { recursive: true });
  const args = ['update', '--error-on=any', '-o', `Dir::State::Lists=${lists}`, '-o', `Dir::Cache=${cache}`,
    '-o', 'Debug::NoLocking=true', '-o', 'APT::Sandbox::User=root', '-o', 'Acquire::Retries=1'];
  try {
    await execFileAsync('apt-get', args, { timeout: APT_PROBE_TIMEOUT_MS, env: { ...process.env, LC_ALL: 'C' } });
    return undefined;
  } catch (err) {
    const e = err as { killed?: boolean; stderr?: string };
    if (e.killed) return `apt-get update got no answer from the archive within ${APT_PROBE_TIMEOUT_MS / 1000} s`;
    const errors = (e.stderr ?? '').split('\n').filter((l) => l.startsWith('E: ') || l.startsWith('W: '));
    if (errors.some((l) => /Failed to fetch|Could not resolve|Temporary failure resolving|Could not connect|Unable to connect/.test(l))) {
      return `apt-get update cannot fetch from the archive: ${errors.slice(0, 3).join(' | ')}`;
    }
    throw new Error(`apt-get update failed, and not for want of the archive: ${(e.stderr ?? String(err)).trim()}`);
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

/** Resolves once the server prints `ready`; rejects if it exits first or after `timeoutMs`. */
function serverReady(server: ChildProcess, timeoutMs: number): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`mount server not ready after ${timeoutMs} ms: ${out}`)), timeoutMs);
    server.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('ready')) { clearTimeout(timer); resolve(); }
    });
    server.once('exit', (code) => { clearTimeout(timer); reject(new Error(`mount server exited ${code}: ${out}`)); });
  });
}

describe('real workload: apt-get install in a chroot', function () {
  this.timeout(1_200_000);
  let work: { dir: string; remove(): Promise<void> };
  let root: string;

  /** apt-get install on a layerd mount: its output and the writable layer's listing (run once, for whichever test asks first). */
  let layerdRun: Promise<{ out: string; listing: string[] }> | undefined;
  const installOnLayerd = (): Promise<{ out: string; listing: string[] }> => (layerdRun ??= (async () => {
    const upper = join(work.dir, 'layerd-upper');
    const mnt = join(work.dir, 'layerd-mnt');
    await mkdir(upper);
    await mkdir(mnt);
    const server: ChildProcess = spawn(join(REPO, 'bin', 'layerd'), ['mount', '--root', root, '--image', IMAGE, '--upper', upper, mnt], { stdio: ['ignore', 'pipe', 'ignore'] });
    let out: string;
    try {
      await serverReady(server, 60_000);
      out = await aptInstall(mnt);
    } finally {
      await stopChild(server, { what: 'the mount server' });
    }
    expect(await findMount(mnt), 'the server unmounted on SIGTERM').to.equal(undefined);
    return { out, listing: await upperListing(upper) };
  })());

  before(async function () {
    work = await scratch('layerd-apt-');
    const unreachable = await aptArchiveUnreachable(work.dir);
    if (unreachable) {
      process.stdout.write(`      (skipped: ${unreachable})\n`);
      this.skip();
    }
    root = join(work.dir, 'store');
    await storeWithDebianMulti(root);
  });
  after(async () => {
    if (!work) return;
    await clearMountsUnder(work.dir);
    await work.remove();
  });

  it('installs a package on a layerd mount', async () => {
    const { out } = await installOnLayerd();
    expect(out).to.contain('Status: install ok installed');
    expect(out).to.contain('Hello, world!');
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
    const ours = (await installOnLayerd()).listing;
    const onlyOurs = ours.filter((l) => !overlay.includes(l));
    const onlyOverlay = overlay.filter((l) => !ours.includes(l));
    expect({ onlyLayerd: onlyOurs, onlyOverlayfs: onlyOverlay }).to.deep.equal({ onlyLayerd: [], onlyOverlayfs: [] });
    expect(ours.some((l) => l.startsWith('usr/bin/hello\t'))).to.equal(true);
  });
});
