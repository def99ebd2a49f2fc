/**
 * Lower files as content-addressed objects (storage/objectStore.ts) behind
 * FUSE passthrough: a store layer's file read through a mount becomes an
 * object named by its digest, and later opens hand its reads to the kernel.
 * The server's own operation counts (--stats-file) show which way data went.
 *
 * Files on mounts are touched only from child processes (never synchronous
 * I/O on a mount from the process that could serve it). Needs root and
 * Linux 6.9+ (passthrough).
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { type OpStatsSnapshot } from '../mount/opStats.js';
import { fsck } from '../storage/fsck.js';
import { type LayerIndex, PASSTHROUGH_MIN_LOWER_SIZE } from '../storage/layerIndex.js';
import { listObjects, objectRelPath } from '../storage/objectStore.js';
import { StoreOperations } from '../storage/operations.js';
import { Store } from '../storage/store.js';
import { mustRun, startLayerdServer, stopLayerdServer } from './fixtures/mount/harness.js';
import { waitFor } from './support/daemon.js';
import { scratch } from './support/env.js';
import { clearMountsUnder } from './support/store.js';
import { writeTar } from './support/tarBuilder.js';

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

describe('lower files as content-addressed objects (passthrough)', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let root: string;
  let mnt: string;
  let statsFile: string;
  let server: ChildProcess | undefined;
  let serverLog = '';
  /** Store layer directories, top first: image b over image a. */
  let layerDirs: string[];
  const same = randomBytes(3 << 20); // in both layers, at a/same and b/same
  const onlyA = randomBytes(300_000); // over PASSTHROUGH_MIN_LOWER_SIZE, as the other files
  const small = randomBytes(PASSTHROUGH_MIN_LOWER_SIZE - 1); // served from the tar and page-cached: no object

  const withStore = async <T>(fn: (store: Store) => Promise<T>): Promise<T> => {
    const store = await Store.open(root, { durability: 'none' });
    try {
      return await fn(store);
    } finally {
      store.close();
    }
  };
  const mount = async (options: { passthrough?: boolean; upper?: string } = {}): Promise<void> => {
    serverLog = '';
    server = await startLayerdServer(
      ['--layers', layerDirs.join(':'), '--stats-file', statsFile, ...(options.upper ? ['--upper', options.upper] : [])], mnt,
      { ...process.env, LAYERD_FUSE_PASSTHROUGH: options.passthrough === false ? '0' : '1' },
    );
    server.stderr!.on('data', (d: Buffer) => { serverLog += d.toString(); });
  };
  /** Unmount; the server writes its final counts as it exits. */
  const unmountCounts = async (): Promise<Record<string, number>> => {
    await stopLayerdServer(server!, mnt);
    server = undefined;
    const snap = JSON.parse(await readFile(statsFile, 'utf8')) as OpStatsSnapshot;
    return Object.fromEntries(Object.entries(snap).map(([op, c]) => [op, c.count]));
  };
  const shaOnMount = async (path: string): Promise<string> => `sha256:${(await mustRun('sha256sum', [join(mnt, path)])).split(' ')[0]}`;
  const objects = (): string[] => listObjects(root);
  const stagedFiles = async (): Promise<string[]> => {
    const dirs = await readdir(join(root, 'objects', 'tmp')).catch(() => [] as string[]);
    const out: string[] = [];
    for (const d of dirs) for (const f of await readdir(join(root, 'objects', 'tmp', d)).catch(() => [] as string[])) out.push(join(d, f));
    return out;
  };

  beforeEach(async () => {
    work = await scratch('layerd-objects-');
    root = join(work.dir, 'store');
    mnt = join(work.dir, 'mnt');
    statsFile = join(work.dir, 'stats.json');
    await mkdir(mnt);
    await writeTar(join(work.dir, 'a.tar'), [
      { header: { name: 'a/', type: 'directory', mode: 0o755 } },
      { header: { name: 'a/same' }, content: same },
      { header: { name: 'a/only' }, content: onlyA },
      { header: { name: 'a/small' }, content: small },
    ]);
    await writeTar(join(work.dir, 'b.tar'), [
      { header: { name: 'b/', type: 'directory', mode: 0o755 } },
      { header: { name: 'b/same', mode: 0o755 }, content: same },
    ]);
    layerDirs = await withStore(async (store) => {
      const ops = new StoreOperations(store);
      await ops.importPath({ path: join(work.dir, 'a.tar'), name: 'obj-a' });
      await ops.importPath({ path: join(work.dir, 'b.tar'), name: 'obj-b' });
      const [a] = await store.imageLayers('obj-a');
      const [b] = await store.imageLayers('obj-b');
      return [store.layout.layerDir(b!.diffId), store.layout.layerDir(a!.diffId)];
    });
  });
  afterEach(async () => {
    if (server) await stopLayerdServer(server, mnt);
    server = undefined;
    await clearMountsUnder(work.dir);
    await work.remove();
  });

  it('a lower file read once becomes one object for both layers holding it (a small one none); then its reads pass through and equal its bytes', async () => {
    await mount();
    expect(await shaOnMount('a/small')).to.equal(sha(small));
    expect(await shaOnMount('a/same')).to.equal(sha(same)); // served from layer.tar; makes the object
    await waitFor('the object of a/same', () => objects().includes(sha(same)), 60_000); // one syncfs: slow on a busy disk
    expect(objects(), 'a small file is no object').to.not.include(sha(small));
    await unmountCounts();
    const object = await readFile(join(root, objectRelPath(sha(same))!));
    expect(sha(object)).to.equal(sha(same));

    await rm(statsFile); // counts of this mount only (the server continues a file it finds)
    await mount(); // fresh kernel inodes: nothing of these files in the page cache
    expect(await shaOnMount('a/same')).to.equal(sha(same));
    expect(await shaOnMount('b/same')).to.equal(sha(same)); // the other layer's copy: the same object
    const mmapped = await mustRun('python3', ['-c', `
import mmap, hashlib
with open(${JSON.stringify(join(mnt, 'b/same'))}, 'rb') as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    print('sha256:' + hashlib.sha256(m[:]).hexdigest())
`]);
    expect(mmapped.trim()).to.equal(sha(same));
    const counts = await unmountCounts();
    expect(counts['read'] ?? 0, 'reads served by layerd').to.equal(0);
    expect(objects().filter((d) => d === sha(same)), 'one object for the two layers').to.have.length(1);
  });

  it('skeleton layers (one copy): a big file passes through its object from the first open, both layers\' copies one object; a small one reads from its object', async () => {
    const skeletonRoot = join(work.dir, 'skeleton-store');
    await writeTar(join(work.dir, 'a.tar.gz'), [
      { header: { name: 'a/', type: 'directory', mode: 0o755 } },
      { header: { name: 'a/same' }, content: same },
      { header: { name: 'a/only' }, content: onlyA },
      { header: { name: 'a/small' }, content: small },
    ], { gzip: true });
    await writeTar(join(work.dir, 'b.tar.gz'), [
      { header: { name: 'b/', type: 'directory', mode: 0o755 } },
      { header: { name: 'b/same', mode: 0o755 }, content: same },
    ], { gzip: true });
    const store = await Store.open(skeletonRoot, { durability: 'none', layerFormat: 'skeleton' });
    try {
      const ops = new StoreOperations(store);
      await ops.importPath({ path: join(work.dir, 'a.tar.gz'), name: 'obj-a' });
      await ops.importPath({ path: join(work.dir, 'b.tar.gz'), name: 'obj-b' });
      const [a] = await store.imageLayers('obj-a');
      const [b] = await store.imageLayers('obj-b');
      expect(a!.index.storage).to.equal('skeleton');
      layerDirs = [store.layout.layerDir(b!.diffId), store.layout.layerDir(a!.diffId)];
    } finally {
      store.close();
    }
    expect(listObjects(skeletonRoot).sort()).to.deep.equal([sha(same), sha(onlyA), sha(small)].sort(), 'made at import, each once');

    await mount(); // first opens, fresh kernel inodes
    expect(await shaOnMount('a/same')).to.equal(sha(same));
    expect(await shaOnMount('b/same')).to.equal(sha(same));
    expect(await shaOnMount('a/only')).to.equal(sha(onlyA));
    const mmapped = await mustRun('python3', ['-c', `
import mmap, hashlib
with open(${JSON.stringify(join(mnt, 'a/only'))}, 'rb') as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    print('sha256:' + hashlib.sha256(m[:]).hexdigest())
`]);
    expect(mmapped.trim()).to.equal(sha(onlyA));
    expect((await unmountCounts())['read'] ?? 0, 'reads served by layerd').to.equal(0);

    await rm(statsFile);
    await mount();
    // Under PASSTHROUGH_MIN_LOWER_SIZE: served here, read from its object and handed to the page cache at its open.
    expect(await shaOnMount('a/small')).to.equal(sha(small));
    const smallCounts = await unmountCounts();
    expect(smallCounts['prefill'] ?? 0, 'handed to the page cache at open').to.equal(1);
    expect(smallCounts['read'] ?? 0, 'READs').to.equal(0);
  });

  it('with passthrough off makes no object and serves every read', async () => {
    await mount({ passthrough: false });
    expect(await shaOnMount('a/same')).to.equal(sha(same));
    expect(await shaOnMount('a/same')).to.equal(sha(same));
    const counts = await unmountCounts();
    expect(counts['read'] ?? 0).to.be.greaterThan(0);
    expect(objects()).to.deep.equal([]);
  });

  it('never makes an object whose bytes do not hash to the digest an index claims', async () => {
    // An index that lies about a file (as a hostile TOC could): a/only claims the digest of other bytes.
    const aDir = layerDirs[1]!;
    const index = JSON.parse(await readFile(join(aDir, 'index.json'), 'utf8')) as LayerIndex;
    const claimed = sha(Buffer.from('not what a/only holds'));
    index.entries.find((e) => e.path === 'a/only')!.digest = claimed;
    await writeFile(join(aDir, 'index.json'), JSON.stringify(index));

    await mount();
    expect(await shaOnMount('a/only')).to.equal(sha(onlyA)); // the layer's real bytes
    await waitFor('the refusal', () => serverLog.includes('does not hash to the digest'), 60_000);
    expect(await shaOnMount('a/only')).to.equal(sha(onlyA)); // still served, never from an object
    const counts = await unmountCounts();
    expect(counts['read'] ?? 0).to.be.greaterThan(0);
    expect(objects()).to.not.include(claimed);
    expect(await stagedFiles(), 'nothing left half-made').to.deep.equal([]);
  });

  it('refuses (ETXTBSY) writing a lower file while its object backs an open; then copies it up, the object unchanged', async () => {
    const upper = join(work.dir, 'upper');
    await mkdir(upper);
    await mount({ upper });
    await shaOnMount('a/same');
    await waitFor('the object of a/same', () => objects().includes(sha(same)), 60_000); // one syncfs: slow on a busy disk
    const out = await mustRun('python3', ['-c', `
import errno, os
p = ${JSON.stringify(join(mnt, 'a/same'))}
r = open(p, 'rb')                          # passed through to the object
head = r.read(4)
try:
    open(p, 'r+b')                         # would write into the object: the kernel takes no other backing file while r lasts
except OSError as e:
    print(errno.errorcode[e.errno])
try:
    os.truncate(p, 1)
except OSError as e:
    print(errno.errorcode[e.errno])
os.chmod(p, 0o600)                         # copies it up: same bytes, so later reads may share the backing
print(open(p, 'rb').read(4) == head)
r.close()
with open(p, 'r+b') as w:                  # r is closed: writes go to the upper copy
    w.write(b'XXXX')
print(open(p, 'rb').read(4))
`]);
    expect(out.trim().split('\n')).to.deep.equal(['ETXTBSY', 'ETXTBSY', 'True', "b'XXXX'"]);
    await unmountCounts();
    expect(sha(await readFile(join(root, objectRelPath(sha(same))!))), 'the object').to.equal(sha(same));
    const copied = await readFile(join(upper, 'a/same'));
    expect(copied.subarray(0, 4).toString()).to.equal('XXXX');
    expect(copied.subarray(4).equals(same.subarray(4))).to.equal(true);
  });

  it('df counts objects; GC removes objects no layer names; fsck re-hashes them', async () => {
    await mount();
    await shaOnMount('a/same');
    await shaOnMount('a/only');
    await waitFor('two objects', () => objects().length === 2, 60_000);
    await unmountCounts();
    expect((await withStore((s) => fsck(s))).ok).to.equal(true);
    const usage = await withStore((s) => new StoreOperations(s).diskUsage());
    expect(usage.objects).to.deep.equal({ count: 2, bytes: same.length + onlyA.length, savedByDedup: same.length }); // a/same and b/same: one object

    // A corrupt object is reported.
    const onlyPath = join(root, objectRelPath(sha(onlyA))!);
    const saved = await readFile(onlyPath);
    await writeFile(onlyPath, Buffer.from('corrupt'));
    const report = await withStore((s) => fsck(s));
    expect(report.ok).to.equal(false);
    expect(report.problems).to.deep.include({ kind: 'object', id: sha(onlyA), message: `object content hashes to ${sha(Buffer.from('corrupt'))}` });
    await writeFile(onlyPath, saved);

    // Image a goes: a/only's object with it; the object b/same also names stays.
    const gc = await withStore(async (s) => (await new StoreOperations(s).removeImage('obj-a', false)).gc);
    expect(gc.objects).to.equal(1);
    expect(objects()).to.deep.equal([sha(same)]);
    await withStore(async (s) => new StoreOperations(s).removeImage('obj-b', false));
    expect(objects()).to.deep.equal([]);
    expect((await withStore((s) => fsck(s))).ok).to.equal(true);
  });

  it('a mount host killed (SIGKILL) while it makes an object leaves a consistent store', async () => {
    const big = randomBytes(128 << 20); // long enough to kill its copy mid-way
    await writeTar(join(work.dir, 'c.tar'), [{ header: { name: 'big' }, content: big }]);
    layerDirs = await withStore(async (store) => {
      await new StoreOperations(store).importPath({ path: join(work.dir, 'c.tar'), name: 'obj-c' });
      return [store.layout.layerDir((await store.imageLayers('obj-c'))[0]!.diffId)];
    });
    await mount();
    const reading = mustRun('dd', [`if=${join(mnt, 'big')}`, 'of=/dev/null', 'bs=1M', 'status=none']);
    await waitFor('the copy of big under way', async () => (await stagedFiles()).length > 0, 60_000, 5);
    process.kill(server!.pid!, 'SIGKILL');
    await reading.catch(() => undefined); // the mount is gone under it
    await stopLayerdServer(server!, mnt); // reaps it and clears the dead mount
    server = undefined;
    // Never a partial object under the name: either none yet, or the whole file.
    if (objects().includes(sha(big))) expect(sha(await readFile(join(root, objectRelPath(sha(big))!)))).to.equal(sha(big));

    const report = await withStore((s) => fsck(s)); // opening the store removes what the dead process left
    expect(report.problems).to.deep.equal([]);
    expect(await readdir(join(root, 'objects', 'tmp'))).to.deep.equal([]);

    await mount();
    expect(await shaOnMount('big')).to.equal(sha(big));
    await waitFor('the object of big', () => objects().includes(sha(big)), 60_000);
    await unmountCounts();
    expect(sha(await readFile(join(root, objectRelPath(sha(big))!)))).to.equal(sha(big));
  });
});
