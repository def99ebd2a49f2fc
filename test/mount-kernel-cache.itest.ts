/**
 * What the kernel's caches of a layerd mount spare the server (issue 17,
 * read-all round trips), counted with the server's own operation stats
 * (--stats-file), and that what they keep is right after changes made
 * through the mount.
 *
 * Files are touched only from child processes (never synchronous I/O on a
 * mount from the process that could serve it). Needs root.
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { type OpStatsSnapshot } from '../mount/opStats.js';
import { Store } from '../storage/store.js';
import { makeWorkspace, mustRun, removeWorkspace, startLayerdServer, stopLayerdServer, type Workspace } from './fixtures/mount/harness.js';
import { scratch } from './support/env.js';
import { clearMountsUnder, storeWithDebianMulti } from './support/store.js';

/** More entries than one READDIRPLUS reply holds, so a listing takes several chunks. */
const ENTRIES = 2000;

describe('mount kernel caches', function () {
  this.timeout(60_000);
  let ws: Workspace;
  let server: ChildProcess | undefined;
  let statsFile: string;

  const mount = async (): Promise<void> => {
    server = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper, '--stats-file', statsFile], ws.mnt);
  };
  /** Unmount; the server writes its final counts as it exits. */
  const unmountCounts = async (): Promise<Record<string, number>> => {
    await stopLayerdServer(server!, ws.mnt);
    server = undefined;
    const snap = JSON.parse(await readFile(statsFile, 'utf8')) as OpStatsSnapshot;
    return Object.fromEntries(Object.entries(snap).map(([op, c]) => [op, c.count]));
  };

  beforeEach(async () => {
    ws = await makeWorkspace();
    statsFile = join(ws.root, 'stats.json');
    const big = join(ws.lowers[1]!, 'big');
    await mkdir(big);
    for (let i = 0; i < ENTRIES; i++) await writeFile(join(big, `a-file-with-a-longer-name-${String(i).padStart(5, '0')}`), `${i}\n`);
  });
  afterEach(async () => {
    if (server) await stopLayerdServer(server, ws.mnt);
    server = undefined;
    await removeWorkspace(ws);
  });

  it('a listing brings every entry\'s attributes: lstat of all entries of a large directory asks no LOOKUP', async () => {
    await mount();
    const out = await mustRun('python3', ['-c', `
import os
d = ${JSON.stringify(join(ws.mnt, 'big'))}
names = os.listdir(d)
print(len(names), sum(os.lstat(os.path.join(d, n)).st_size for n in names))`]);
    const counts = await unmountCounts();
    const sizes = Array.from({ length: ENTRIES }, (_, i) => `${i}\n`.length).reduce((a, b) => a + b, 0);
    expect(out.trim()).to.equal(`${ENTRIES} ${sizes}`);
    // The one LOOKUP of `big` itself; none per entry (READDIRPLUS_AUTO sent a LOOKUP per entry of every chunk after the first).
    expect(counts['lookup'] ?? 0, 'lookups').to.be.at.most(1);
    expect(counts['readdirplus'] ?? 0, 'listing chunks').to.be.greaterThan(2);
  });

  it('entries a listing cached show changes made through the mount at once to another process', async () => {
    await mount();
    const d = join(ws.mnt, 'big');
    const name = (i: number): string => join(d, `a-file-with-a-longer-name-${String(i).padStart(5, '0')}`);
    // Cache every entry (names and attributes) in the kernel, from the end of the listing too.
    await mustRun('sh', ['-c', 'ls -l "$0" > /dev/null', d]);
    await mustRun('chmod', ['600', name(ENTRIES - 1)]);
    await mustRun('mv', [name(ENTRIES - 2), join(d, 'renamed')]);
    await mustRun('rm', [name(ENTRIES - 3)]);
    await mustRun('sh', ['-c', 'echo longer-content > "$0"', name(ENTRIES - 4)]);
    const seen = await mustRun('python3', ['-c', `
import os
def show(p):
    try:
        st = os.lstat(p)
        return '%o %d' % (st.st_mode & 0o7777, st.st_size)
    except FileNotFoundError:
        return 'gone'
print(';'.join(show(p) for p in ${JSON.stringify([name(ENTRIES - 1), name(ENTRIES - 2), join(d, 'renamed'), name(ENTRIES - 3), name(ENTRIES - 4)])}))
print(len(os.listdir(${JSON.stringify(d)})))`]);
    expect(seen.trim().split('\n')).to.deep.equal([
      `600 ${`${ENTRIES - 1}\n`.length};gone;644 ${`${ENTRIES - 2}\n`.length};gone;644 ${'longer-content\n'.length}`,
      String(ENTRIES - 1),
    ]);
  });
});

describe('mount kernel caches: store layers', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let server: ChildProcess | undefined;
  let mnt: string;

  before(async () => {
    work = await scratch();
    await storeWithDebianMulti(join(work.dir, 'store'));
    mnt = join(work.dir, 'mnt');
    for (const d of [mnt, join(work.dir, 'upper')]) await mkdir(d);
    server = await startLayerdServer(['--root', join(work.dir, 'store'), '--image', 'debian-multi:latest', '--upper', join(work.dir, 'upper')], mnt);
  });
  after(async () => {
    if (server) await stopLayerdServer(server, mnt);
    if (work) await clearMountsUnder(work.dir);
    await work?.remove();
  });

  it('opens of page-cached files of a layer cost the server no descriptor, and read the right bytes', async () => {
    const dir = join(mnt, 'usr/share/zoneinfo');
    const out = await mustRun('python3', ['-c', `
import os, hashlib
fds = lambda: len(os.listdir('/proc/${server!.pid}/fd'))
paths = sorted(os.path.join(r, n) for r, _, ns in os.walk(${JSON.stringify(dir)}) for n in ns)
paths = [p for p in paths if not os.path.islink(p) and 0 < os.path.getsize(p) < 65536][:300]
first = hashlib.sha256(b''.join(open(p, 'rb').read() for p in paths)).hexdigest()   # into the page cache
before = fds()
held = [open(p, 'rb') for p in paths]
during = fds()
again = hashlib.sha256(b''.join(f.read() for f in held)).hexdigest()
print(len(paths), during - before, first == again)`]);
    const [files, moreFds, same] = out.trim().split(' ');
    expect(Number(files), 'files opened').to.equal(300);
    // Before: one descriptor of layer.tar per open handle.
    expect(Number(moreFds), 'descriptors the server took for 300 held opens').to.be.below(10);
    expect(same, 'the held opens read the same bytes').to.equal('True');
  });

  it('cold reads of a layer\'s small files: one descriptor of the tar for all held opens, and the right bytes', async () => {
    // The bottom layer's small files that no layer above replaces, in the order of its tar.
    const store = await Store.open(join(work!.dir, 'store'), { durability: 'none' });
    let tarPath: string;
    let files: { path: string; offset: number; size: number }[];
    try {
      const layers = await store.imageLayers('debian-multi:latest');
      // A path is the bottom layer's when no layer above has it, a non-directory on its way, a whiteout or an opaque directory over it.
      const aboveKinds = new Map(layers.slice(1).flatMap((l) => l.index.entries.map((e) => [e.path, e.kind] as const)));
      const hiding = new Set(layers.slice(1).flatMap((l) => [...l.index.whiteouts, ...l.index.opaques]));
      const visible = (path: string): boolean => path.split('/').every((_, i, parts) => {
        const prefix = parts.slice(0, i + 1).join('/');
        const kind = aboveKinds.get(prefix);
        return !hiding.has(prefix) && (kind === undefined || (kind === 'dir' && prefix !== path));
      });
      tarPath = layers[0]!.tarPath;
      files = layers[0]!.index.entries
        .filter((e) => e.kind === 'file' && e.link === undefined && e.size > 0 && e.size < 65536 && e.offset !== undefined
          && visible(e.path) && !e.path.startsWith('usr/share/zoneinfo/'))
        .map((e) => ({ path: e.path, offset: e.offset!, size: e.size }))
        .sort((a, b) => a.offset - b.offset);
    } finally {
      store.close();
    }
    // Those in the first 2 MiB of the tar from the first of them.
    const first = files[0]!.offset;
    const run = files.filter((f) => f.offset < first + 2 * 1024 * 1024);
    expect(run.length, 'small files read').to.be.above(50);

    const out = await mustRun('python3', ['-c', `
import os, sys, json, hashlib
tar, mnt, paths = ${JSON.stringify(tarPath)}, ${JSON.stringify(mnt)}, json.loads(sys.argv[1])
fd = os.open(tar, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)   # the tar cold
fds = lambda: len(os.listdir('/proc/${server!.pid}/fd'))
before = fds()
held = []
h = hashlib.sha256()
for p in paths:
    f = open(os.path.join(mnt, p), 'rb'); h.update(f.read()); held.append(f)
print(len(held), fds() - before, h.hexdigest())`, JSON.stringify(run.map((f) => f.path))]);
    const [read, moreFds, digest] = out.trim().split(' ');
    expect(Number(read)).to.equal(run.length);
    // Before: each open that had read held a descriptor of layer.tar until its release.
    expect(Number(moreFds), `descriptors the server took for ${run.length} held opens that read`).to.be.below(10);

    const expected = createHash('sha256');
    const handle = await open(tarPath, 'r');
    try {
      for (const f of run) expected.update((await handle.read(Buffer.alloc(f.size), 0, f.size, f.offset)).buffer);
    } finally {
      await handle.close();
    }
    expect(digest, 'the bytes read through the mount').to.equal(expected.digest('hex'));
  });
});

describe('mount kernel caches: small lower files handed to the page cache at open', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let server: ChildProcess | undefined;
  let mnt: string;
  let statsFile: string;
  /** Small files of the image (a directory no layer above changes), with the bytes each must read. */
  let files: { path: string; sha256: string }[];

  const mount = async (env: NodeJS.ProcessEnv = process.env): Promise<void> => {
    await writeFile(statsFile, '{}');
    server = await startLayerdServer(['--root', join(work!.dir, 'store'), '--image', 'debian-multi:latest', '--upper', join(work!.dir, 'upper'),
      '--stats-file', statsFile], mnt, env);
  };
  const unmountCounts = async (): Promise<Record<string, number>> => {
    await stopLayerdServer(server!, mnt);
    server = undefined;
    const snap = JSON.parse(await readFile(statsFile, 'utf8')) as OpStatsSnapshot;
    return Object.fromEntries(Object.entries(snap).map(([op, c]) => [op, c.count]));
  };
  /** What GNU tar does with each file: open, fstat, read to the end, fstat, close; the digests of what was read. */
  const readLikeTar = (extra = ''): Promise<string> => mustRun('python3', ['-c', `
import os, sys, json, hashlib
out = []
for p in json.loads(sys.argv[1]):
    fd = os.open(os.path.join(${JSON.stringify(mnt)}, p), os.O_RDONLY)
    size = os.fstat(fd).st_size
    data = b''
    while True:
        chunk = os.read(fd, 10240)
        if not chunk: break
        data += chunk
    os.fstat(fd)
${extra}
    os.close(fd)
    out.append(hashlib.sha256(data).hexdigest() if len(data) == size else 'short')
print(json.dumps(out))`, JSON.stringify(files.map((f) => f.path))]);

  before(async () => {
    work = await scratch();
    await storeWithDebianMulti(join(work.dir, 'store'));
    mnt = join(work.dir, 'mnt');
    statsFile = join(work.dir, 'stats.json');
    for (const d of [mnt, join(work.dir, 'upper')]) await mkdir(d);
    // The expected bytes, read through a mount with the READ path (the corpus oracles check that one against the image).
    await mount({ ...process.env, LAYERD_FUSE_PREFILL: '0' });
    const listed = await mustRun('python3', ['-c', `
import os, json, hashlib
root = ${JSON.stringify(join(mnt, 'usr/share/zoneinfo'))}
paths = sorted(os.path.join(r, n) for r, _, ns in os.walk(root) for n in ns)
paths = [p for p in paths if not os.path.islink(p) and os.path.isfile(p) and 0 < os.path.getsize(p) < 65536][:200]
print(json.dumps([[os.path.relpath(p, ${JSON.stringify(mnt)}), hashlib.sha256(open(p, 'rb').read()).hexdigest()] for p in paths]))`]);
    files = (JSON.parse(listed) as [string, string][]).map(([path, sha256]) => ({ path, sha256 }));
    await unmountCounts();
  });
  after(async () => {
    if (server) await stopLayerdServer(server, mnt);
    if (work) await clearMountsUnder(work.dir);
    await work?.remove();
  });
  afterEach(async () => {
    if (server) await stopLayerdServer(server, mnt);
    server = undefined;
  });

  it('a first read of each small file asks no READ and no GETATTR after it, and reads the right bytes', async () => {
    expect(files.length, 'small files').to.equal(200);
    await mount();
    const digests = JSON.parse(await readLikeTar()) as string[];
    const counts = await unmountCounts();
    expect(digests).to.deep.equal(files.map((f) => f.sha256));
    expect(counts['prefill'] ?? 0, 'files handed to the page cache').to.equal(files.length);
    // Before: one READ per file, and a GETATTR for the fstat after it (each READ drops the cached atime).
    expect(counts['read'] ?? 0, 'READs').to.equal(0);
    expect(counts['getattr'] ?? 0, 'GETATTRs').to.be.below(10);
  });

  it('with LAYERD_FUSE_PREFILL=0 each file is READ, and its fstat asks again (what the test above would see without it)', async () => {
    await mount({ ...process.env, LAYERD_FUSE_PREFILL: '0' });
    const digests = JSON.parse(await readLikeTar()) as string[];
    const counts = await unmountCounts();
    expect(digests).to.deep.equal(files.map((f) => f.sha256));
    expect(counts['prefill'] ?? 0).to.equal(0);
    expect(counts['read'] ?? 0, 'READs').to.be.at.least(files.length);
    expect(counts['getattr'] ?? 0, 'GETATTRs').to.be.at.least(files.length);
  });

  it('pages the kernel dropped after the first open are read again as asked, with the same bytes', async () => {
    await mount();
    await readLikeTar();
    // Drop each file's pages (it stays open), then read it again: the node was prefilled once, so this goes to READ.
    const digests = JSON.parse(await readLikeTar(`
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.lseek(fd, 0, 0)
    again = b''
    while True:
        chunk = os.read(fd, 10240)
        if not chunk: break
        again += chunk
    if again != data: data = b'different'`)) as string[];
    const counts = await unmountCounts();
    expect(digests).to.deep.equal(files.map((f) => f.sha256));
    expect(counts['prefill'] ?? 0, 'each node handed over once').to.equal(files.length);
    expect(counts['read'] ?? 0, 'READs after the pages were dropped').to.be.at.least(files.length);
  });
});
