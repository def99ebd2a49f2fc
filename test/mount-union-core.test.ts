/**
 * Unit tests of the union core (mount/unionFs.ts) on its own: no FUSE, the
 * layers are in-memory indexes with their bytes in a temporary directory.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { lstatSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type LayerEntry, type LayerSource, tarLayerSource } from '../storage/layerIndex.js';
import { FsError } from '../mount/fsError.js';
import { LowerMergeCache } from '../mount/lowerMerges.js';
import { UnionFs, type UnionStat } from '../mount/unionFs.js';

interface FileSpec extends Partial<LayerEntry> { content?: string }

/** How the upper records a deletion (overlayfs format): a 0/0 character device. */
function isWhiteoutDevice(path: string): boolean {
  const st = lstatSync(path);
  return st.isCharacterDevice() && st.rdev === 0;
}

let work: string;
let layerCount = 0;

/** A layer whose index is given inline; file contents land in a data dir. */
function layer(spec: Record<string, FileSpec>, whiteouts: string[] = [], opaques: string[] = []): LayerSource {
  // Like a store layer: every file's bytes are a range of one blob.
  const blobPath = join(work, `layer${layerCount++}.blob`);
  const chunks: Buffer[] = [];
  let offset = 512; // never at 0, so ranges are exercised
  chunks.push(Buffer.alloc(512));
  const entries: LayerEntry[] = Object.entries(spec).map(([path, s]) => {
    const kind = s.kind ?? (s.link !== undefined ? 'file' : s.target !== undefined ? 'symlink' : path.endsWith('/') ? 'dir' : 'file');
    const entry: LayerEntry = {
      path: path.replace(/\/$/, ''), kind, mode: s.mode ?? (kind === 'dir' ? 0o755 : 0o644),
      uid: s.uid ?? 0, gid: s.gid ?? 0, mtime: s.mtime ?? 1_000_000_000, size: s.content?.length ?? 0,
    };
    if (s.target !== undefined) entry.target = s.target;
    if (s.link !== undefined) entry.link = s.link;
    if (s.xattrs !== undefined) entry.xattrs = s.xattrs;
    if (s.devMajor !== undefined) { entry.devMajor = s.devMajor; entry.devMinor = s.devMinor ?? 0; }
    if (s.content) {
      const bytes = Buffer.from(s.content);
      entry.offset = offset;
      chunks.push(bytes, Buffer.alloc(7, 0x58)); // trailing junk that must never be read
      offset += bytes.length + 7;
    }
    return entry;
  });
  writeFileSync(blobPath, Buffer.concat(chunks));
  return tarLayerSource({ version: 1, id: `test:${blobPath}`, entries, whiteouts, opaques }, blobPath);
}

function freshUpper(): string {
  const upper = join(work, `upper${layerCount++}`);
  mkdirSync(upper);
  return upper;
}

async function stat(fs: UnionFs, path: string): Promise<UnionStat> {
  return fs.getattr(path);
}

function names(fs: UnionFs, path: string): string[] {
  return fs.readdir(path).names.filter((n) => n !== '.' && n !== '..').sort();
}

async function errnoOf(promise: Promise<unknown> | (() => unknown)): Promise<string | undefined> {
  try {
    await (typeof promise === 'function' ? promise() : promise);
  } catch (err) {
    if (err instanceof FsError) return err.errno;
    return (err as NodeJS.ErrnoException).code;
  }
  return undefined;
}

async function readAll(fs: UnionFs, path: string): Promise<string> {
  const fh = await fs.open(path, 0);
  const buf = Buffer.alloc(65536);
  const n = await fs.read(fh, buf, buf.length, 0);
  await fs.release(fh);
  return buf.toString('utf8', 0, n);
}

describe('mount union core (no FUSE)', () => {
  beforeEach(() => {
    work = mkdtempSync(join(tmpdir(), 'layerd-union-core-'));
  });
  afterEach(() => {
    rmSync(work, { recursive: true, force: true });
  });

  describe('merging layers', () => {
    it('applies whiteouts and opaque directories of higher layers only to lower ones', async () => {
      const l1 = layer({ 'a/': {}, 'a/x': { content: 'x1' }, 'a/y': { content: 'y1' }, 'b/': {}, 'b/old': {}, 'c': { content: 'c' } });
      const l2 = layer({ 'a/z': { content: 'z2' }, 'b/': {}, 'b/new': {}, 'c': { content: 'c2' } }, ['a/x', 'c'], ['b']);
      const fs = await UnionFs.create({ layers: [l1, l2], upper: freshUpper() });
      assert.deepEqual(names(fs, 'a'), ['y', 'z']);
      assert.deepEqual(names(fs, 'b'), ['new']);
      assert.equal(await readAll(fs, 'c'), 'c2'); // own entry survives own whiteout
    });

    it('reads index paths in any spelling tar allows (./a, a//b, /c, a/./d)', async () => {
      const l1 = layer({ './a/': { kind: 'dir' }, 'a//b': { content: 'B' }, '/c': { content: 'C' }, 'a/./d': { content: 'D' }, '.': { kind: 'dir' } });
      const fs = await UnionFs.create({ layers: [l1], upper: freshUpper() });
      assert.deepEqual(names(fs, ''), ['a', 'c']);
      assert.deepEqual(names(fs, 'a'), ['b', 'd']);
      assert.equal(await readAll(fs, 'a/d'), 'D');
    });

    it('gives a merged directory the attributes of the topmost explicit entry, an invented parent 0755 root', async () => {
      const l1 = layer({ 'd/': { mode: 0o700, uid: 5, mtime: 100 }, 'd/f': {} });
      const l2 = layer({ 'd/g': {}, 'p/q/r': {} }); // no entry for d, p or p/q
      const fs = await UnionFs.create({ layers: [l1, l2], upper: freshUpper() });
      const d = await stat(fs, 'd');
      assert.equal(d.mode & 0o7777, 0o700);
      assert.equal(d.uid, 5);
      const p = await stat(fs, 'p/q');
      assert.equal(p.mode, 0o040755);
      assert.deepEqual([p.uid, p.gid, p.mtime], [0, 0, { sec: 0, nsec: 0 }]);
      assert.equal(p.nlink, 2, 'a directory with no subdirectories has nlink 2');
      assert.equal((await stat(fs, 'p')).nlink, 3, 'one subdirectory: nlink 3');
      const l3 = layer({ 'd/': { mode: 0o711 } });
      const fs2 = await UnionFs.create({ layers: [l1, l2, l3], upper: freshUpper() });
      assert.equal((await stat(fs2, 'd')).mode & 0o7777, 0o711);
      assert.deepEqual(names(fs2, 'd'), ['f', 'g']);
    });

    it('never applies a whiteout through a symlink, and tolerates one under a file', async () => {
      const l1 = layer({ 'doc/': {}, 'doc/apt/': {}, 'doc/apt/keep': {}, 'file/': {}, 'file/x': {} });
      const l2 = layer({ 'doc/apt': { target: '/elsewhere' }, 'file': { content: 'now a file' } },
        ['doc/apt/keep', 'file/x']);
      const l3 = layer({}, ['doc/apt/keep', 'file/x']); // whiteouts below a symlink / a file
      const fs = await UnionFs.create({ layers: [l1, l2, l3], upper: freshUpper() });
      assert.equal((await stat(fs, 'doc/apt')).mode & 0o170000, 0o120000);
      assert.equal(await fs.readlink('doc/apt'), '/elsewhere');
      assert.equal(await readAll(fs, 'file'), 'now a file');
    });

    it('shares inode and data among hard links and counts names', async () => {
      const l1 = layer({ 'bin/': {}, 'bin/a': { content: 'AAA' }, 'bin/b': { link: 'bin/a' } });
      const l2 = layer({ 'bin/c': { link: 'bin/a' } }); // link to a lower file
      const fs = await UnionFs.create({ layers: [l1, l2], upper: freshUpper() });
      const [a, b, c] = await Promise.all(['bin/a', 'bin/b', 'bin/c'].map((p) => stat(fs, p)));
      assert.equal(a!.ino, b!.ino);
      assert.equal(a!.ino, c!.ino);
      assert.equal(a!.nlink, 3);
      assert.equal(await readAll(fs, 'bin/c'), 'AAA');
      const l3 = layer({}, ['bin/a']);
      const fs2 = await UnionFs.create({ layers: [l1, l2, l3], upper: freshUpper() });
      assert.equal((await stat(fs2, 'bin/b')).nlink, 2);
    });

    it('gives different files different, stable inode numbers', async () => {
      const l1 = layer({ 'x': {}, 'y': {}, 'd/': {}, 'd/z': {} });
      const upper = freshUpper();
      const fs1 = await UnionFs.create({ layers: [l1], upper });
      const inos = await Promise.all(['', 'x', 'y', 'd', 'd/z'].map(async (p) => (await stat(fs1, p)).ino));
      assert.equal(new Set(inos).size, 5);
      assert.equal(inos[0], 1);
      await fs1.chmod('d/z', 0o600); // copies d up too: d keeps its number
      const fs2 = await UnionFs.create({ layers: [l1], upper });
      const again = await Promise.all(['', 'x', 'y', 'd', 'd/z'].map(async (p) => (await stat(fs2, p)).ino));
      assert.deepEqual(again.slice(0, 4), inos.slice(0, 4));
      assert.equal(again[4], (await stat(fs1, 'd/z')).ino);
      assert.equal(again[4]! >>> 31, 1); // upper numbers carry the top bit
    });
  });

  describe('merges kept between mounts of the same layers', () => {
    it('builds every mount over one kept merge: a mount\'s changes never show in another mount or in the kept merge', async () => {
      const l1 = layer({ 'bin/': {}, 'bin/a': { content: 'AAA' }, 'bin/b': { link: 'bin/a' }, 'd/': {}, 'd/x': { content: 'X' }, 'gone': {} });
      const l2 = layer({ 'bin/c': { link: 'bin/a' }, 'd/y': {} }, ['gone']);
      const cache = new LowerMergeCache();
      assert.equal(cache.get([l1, l2]), cache.get([l1, l2]), 'the same layers: the same merge');
      assert.notEqual(cache.get([l1]), cache.get([l1, l2]));

      const upper1 = freshUpper();
      const fs1 = await UnionFs.create({ layers: [l1, l2], upper: upper1, lowerMerges: cache });
      const fs2 = await UnionFs.create({ layers: [l1, l2], upper: freshUpper(), lowerMerges: cache });
      await fs1.unlink('bin/b');
      await fs1.rename('d', 'e');
      await fs1.mkdir('new', 0o755);
      assert.deepEqual(names(fs1, ''), ['bin', 'e', 'new']);
      assert.equal((await stat(fs1, 'bin/a')).nlink, 2);

      assert.deepEqual(names(fs2, ''), ['bin', 'd']);
      assert.deepEqual(names(fs2, 'd'), ['x', 'y']);
      assert.equal((await stat(fs2, 'bin/a')).nlink, 3);
      assert.equal((await stat(fs2, 'bin/a')).ino, (await stat(fs2, 'bin/b')).ino);
      assert.equal(await readAll(fs2, 'd/x'), 'X');

      const kept = cache.get([l1, l2]);
      assert.deepEqual([...kept.get('')!.children!].sort(), ['bin', 'd']);
      assert.equal(kept.get('bin/a')!.lower!.names.size, 3);
      assert.throws(() => kept.removeSubtree('d'), /must not change/, 'the kept merge is frozen');

      // A later mount of fs1's upper: the kept merge with that upper on top, the same view as fs1.
      const fs3 = await UnionFs.create({ layers: [l1, l2], upper: upper1, lowerMerges: cache });
      assert.deepEqual(names(fs3, ''), ['bin', 'e', 'new']);
      assert.deepEqual(names(fs3, 'e'), ['x', 'y']);
      assert.equal((await stat(fs3, 'bin/c')).nlink, 2);
      // Same numbering as a merge made from scratch.
      const fresh = await UnionFs.create({ layers: [l1, l2], upper: freshUpper() });
      for (const p of ['', 'bin', 'bin/a', 'd/y']) assert.equal((await stat(fs2, p)).ino, (await stat(fresh, p)).ino, p);
    });
  });

  describe('writes', () => {
    it('takes a write\'s bytes when called: the caller may reuse its buffer at once, small write or big', async () => {
      const fs = await UnionFs.create({ layers: [layer({})], upper: freshUpper() });
      for (const size of [4096, 1 << 20]) {
        const fh = await fs.create(`f${size}`, 0o644);
        const buffer = Buffer.alloc(size, 0x41);
        const written = fs.write(fh, buffer, size, 0);
        buffer.fill(0x42); // what a FUSE binding does with its request buffer once write() has returned
        assert.equal(await written, size);
        const back = Buffer.alloc(size);
        assert.equal(await fs.read(fh, back, size, 0), size);
        assert.ok(back.equals(Buffer.alloc(size, 0x41)), `${size}-byte write kept the bytes it was given`);
        await fs.release(fh);
      }
    });

    it('copies up on chmod keeping content, owner, times and binary xattrs', async () => {
      const xattr = Buffer.from([0, 1, 2, 255, 10]).toString('base64');
      const l1 = layer({ 'f': { content: 'data', mode: 0o4755, uid: 1234, gid: 99, mtime: 1_500_000_000, xattrs: { 'user.bin': xattr, 'trusted.t': xattr } } });
      const upper = freshUpper();
      const fs = await UnionFs.create({ layers: [l1], upper });
      await fs.chmod('f', 0o4750);
      const st = lstatSync(join(upper, 'f'));
      assert.equal(st.mode & 0o7777, 0o4750);
      assert.deepEqual([st.uid, st.gid, Math.floor(st.mtimeMs / 1000)], [1234, 99, 1_500_000_000]);
      assert.equal(readFileSync(join(upper, 'f'), 'utf8'), 'data');
      assert.equal((await fs.getxattr('f', 'user.bin'))!.equals(Buffer.from(xattr, 'base64')), true);
      const dump = execFileSync('getfattr', ['-d', '-m', '-', '-e', 'hex', join(upper, 'f')]).toString();
      assert.ok(dump.includes('user.bin=0x000102ff0a'), dump);
      assert.ok(dump.includes('trusted.t=0x000102ff0a'), dump);
    });

    it('copies up a hard-link group as one inode', async () => {
      const l1 = layer({ 'a/': {}, 'b/': {}, 'a/one': { content: 'old' }, 'b/two': { link: 'a/one' }, 'a/three': { link: 'a/one' } });
      const upper = freshUpper();
      const fs = await UnionFs.create({ layers: [l1], upper });
      const fh = await fs.open('b/two', 2 /* O_RDWR */);
      await fs.write(fh, Buffer.from('NEW'), 3, 0);
      await fs.release(fh);
      for (const p of ['a/one', 'b/two', 'a/three']) assert.equal(await readAll(fs, p), 'NEW');
      const sts = await Promise.all(['a/one', 'b/two', 'a/three'].map((p) => stat(fs, p)));
      assert.deepEqual(sts.map((s) => s.nlink), [3, 3, 3]);
      assert.equal(new Set(sts.map((s) => s.ino)).size, 1);
      assert.equal(lstatSync(join(upper, 'a/one')).ino, lstatSync(join(upper, 'b/two')).ino);
    });

    it('records deletions of lower content as whiteouts and hides them from readdir', async () => {
      const l1 = layer({ 'f': {}, 'd/': {}, 'd/x': {}, 'e/': {} });
      const upper = freshUpper();
      const fs = await UnionFs.create({ layers: [l1], upper });
      await fs.unlink('f');
      assert.equal(await errnoOf(fs.rmdir('d')), 'ENOTEMPTY');
      await fs.unlink('d/x');
      await fs.rmdir('d');
      await fs.rmdir('e');
      assert.deepEqual(readdirSync(upper).sort(), ['d', 'e', 'f']);
      for (const name of ['d', 'e', 'f']) assert.equal(isWhiteoutDevice(join(upper, name)), true, `${name} is a 0/0 device`);
      assert.deepEqual(names(fs, ''), []);
      assert.equal(await errnoOf(() => fs.getattr('f')), 'ENOENT');
      const fs2 = await UnionFs.create({ layers: [l1], upper }); // remount: same view
      assert.deepEqual(names(fs2, ''), []);
    });

    it('marks a directory recreated over a deleted lower one opaque', async () => {
      const l1 = layer({ 'd/': {}, 'd/x': {} });
      const upper = freshUpper();
      const fs = await UnionFs.create({ layers: [l1], upper });
      await fs.unlink('d/x');
      await fs.rmdir('d');
      await fs.mkdir('d', 0o750);
      assert.deepEqual(names(fs, 'd'), []);
      assert.deepEqual(readdirSync(upper).sort(), ['d']);
      assert.deepEqual(readdirSync(join(upper, 'd')), []);
      assert.equal(execFileSync('getfattr', ['--only-values', '-n', 'trusted.overlay.opaque', join(upper, 'd')]).toString(), 'y');
      const fs2 = await UnionFs.create({ layers: [l1], upper });
      assert.deepEqual(names(fs2, 'd'), []);
      assert.equal((await stat(fs2, 'd')).mode & 0o7777, 0o750);
    });

    it('renames a lower directory (no EXDEV) and a lower file', async () => {
      const l1 = layer({ 'src/': { mode: 0o711 }, 'src/a': { content: 'A' }, 'src/sub/': {}, 'src/sub/b': { content: 'B' }, 'dst/': {}, 'dst/old': {}, 'f': { content: 'F' } });
      const upper = freshUpper();
      const fs = await UnionFs.create({ layers: [l1], upper });
      await fs.unlink('dst/old');
      await fs.rename('src', 'dst'); // over an empty (merged) lower dir
      await fs.rename('f', 'g');
      assert.deepEqual(names(fs, ''), ['dst', 'g']);
      assert.deepEqual(names(fs, 'dst'), ['a', 'sub']);
      assert.equal(await readAll(fs, 'dst/sub/b'), 'B');
      assert.equal(await readAll(fs, 'g'), 'F');
      assert.equal((await stat(fs, 'dst')).mode & 0o7777, 0o711);
      const fs2 = await UnionFs.create({ layers: [l1], upper });
      assert.deepEqual(names(fs2, ''), ['dst', 'g']);
      assert.deepEqual(names(fs2, 'dst'), ['a', 'sub']);
      assert.deepEqual(readdirSync(upper).sort(), ['dst', 'f', 'g', 'src']);
      assert.equal(isWhiteoutDevice(join(upper, 'f')) && isWhiteoutDevice(join(upper, 'src')), true);
    });

    it('puts what it makes at a path into the directory at that path, after directories were renamed and removed', async () => {
      const upper = freshUpper();
      const fs = await UnionFs.create({ layers: [layer({})], upper });
      const touch = async (path: string): Promise<void> => { await fs.release(await fs.create(path, 0o644)); };
      await fs.mkdir('a', 0o755);
      await fs.mkdir('a/b', 0o755);
      await touch('a/b/f'); // the upper keeps a descriptor of a/b from here
      await fs.chmod('a/b/f', 0o600);
      await fs.rename('a', 'c');
      await fs.mkdir('a', 0o755);
      await fs.mkdir('a/b', 0o755);
      await touch('a/b/g');
      await fs.utimens('a/b/g', { sec: 5, nsec: 0 }, { sec: 7, nsec: 0 });
      await fs.unlink('c/b/f');
      await fs.rmdir('c/b');
      await fs.mkdir('c/b', 0o755);
      await touch('c/b/h');
      assert.deepEqual(readdirSync(join(upper, 'a/b')), ['g']);
      assert.equal(lstatSync(join(upper, 'a/b/g')).mtimeMs, 7000);
      assert.deepEqual(readdirSync(join(upper, 'c/b')), ['h']);
    });

    it('refuses renames that POSIX refuses', async () => {
      const l1 = layer({ 'd/': {}, 'd/x': {}, 'e/': {}, 'f': {} });
      const fs = await UnionFs.create({ layers: [l1], upper: freshUpper() });
      assert.equal(await errnoOf(fs.rename('f', 'd')), 'EISDIR');
      assert.equal(await errnoOf(fs.rename('e', 'f')), 'ENOTDIR');
      assert.equal(await errnoOf(fs.rename('e', 'd')), 'ENOTEMPTY');
      assert.equal(await errnoOf(fs.rename('d', 'd/x/y')), 'EINVAL');
      assert.equal(await errnoOf(fs.rename('nope', 'z')), 'ENOENT');
    });

    it('round-trips binary xattrs and honours create/replace flags', async () => {
      const l1 = layer({ 'f': {} });
      const fs = await UnionFs.create({ layers: [l1], upper: freshUpper() });
      const value = Buffer.from([0, 0xff, 0x0a, 0x3d, 0x22]);
      await fs.setxattr('f', 'user.v', value, 0);
      assert.equal((await fs.getxattr('f', 'user.v'))!.equals(value), true);
      assert.equal(await errnoOf(fs.setxattr('f', 'user.v', value, 1)), 'EEXIST');
      assert.equal(await errnoOf(fs.setxattr('f', 'user.w', value, 2)), 'ENODATA');
      assert.deepEqual(await fs.listxattr('f'), ['user.v']);
      await fs.removexattr('f', 'user.v');
      assert.equal(await fs.getxattr('f', 'user.v'), undefined);
      assert.equal(await errnoOf(fs.removexattr('f', 'user.v')), 'ENODATA');
    });

    it('creates files, fifos, devices and symlinks in the upper', async () => {
      const upper = freshUpper();
      const fs = await UnionFs.create({ layers: [layer({ 'dev/': {} })], upper });
      const fh = await fs.create('dev/file', 0o640);
      assert.equal(await fs.write(fh, Buffer.from('hello'), 5, 0), 5);
      await fs.release(fh);
      await fs.mknod('dev/fifo', 0o010644, 0);
      await fs.mknod('dev/null2', 0o020666, (1 << 8) | 3);
      await fs.symlink('../x', 'dev/link');
      assert.equal(await readAll(fs, 'dev/file'), 'hello');
      assert.equal((await stat(fs, 'dev/file')).mode, 0o100640);
      assert.equal((await stat(fs, 'dev/fifo')).mode, 0o010644);
      const dev = await stat(fs, 'dev/null2');
      assert.equal(dev.mode, 0o020666);
      assert.equal(dev.rdev, (1 << 8) | 3);
      assert.equal(await fs.readlink('dev/link'), '../x');
      assert.equal(await errnoOf(fs.mkdir('dev/file', 0o755)), 'EEXIST');
    });

    it('truncates and re-times lower files through copy-up', async () => {
      const l1 = layer({ 'f': { content: '0123456789' } });
      const fs = await UnionFs.create({ layers: [l1], upper: freshUpper() });
      await fs.truncate('f', 4);
      assert.equal(await readAll(fs, 'f'), '0123');
      await fs.utimens('f', { sec: 2_000_000_000, nsec: 7 }, { sec: 1_000_000_000, nsec: 123_456_789 });
      const st = await stat(fs, 'f');
      assert.deepEqual(st.mtime, { sec: 1_000_000_000, nsec: 123_456_789 });
      assert.deepEqual(st.atime, { sec: 2_000_000_000, nsec: 7 });
      await fs.utimens('f', 'omit', { sec: 5, nsec: 1 });
      assert.deepEqual((await stat(fs, 'f')).atime, { sec: 2_000_000_000, nsec: 7 }, 'UTIME_OMIT leaves atime alone');
    });

    it('shows an xattr change through one name of a hard link through the others', async () => {
      const fs = await UnionFs.create({ layers: [layer({ 'f': { content: 'x' } })], upper: freshUpper() });
      await fs.link('f', 'g');
      await fs.setxattr('f', 'user.k', Buffer.from('v'), 0);
      assert.deepEqual(fs.listxattr('g'), ['user.k']);
      await fs.removexattr('g', 'user.k');
      assert.equal(fs.getxattr('f', 'user.k'), undefined, 'removed through g: gone through f too');
      await fs.setxattr('g', 'user.n', Buffer.from('w'), 0);
      assert.equal(fs.getxattr('f', 'user.n')?.toString(), 'w');
    });

    it('answers fstat of a lower file opened for reading after another open copied it up', async () => {
      const fs = await UnionFs.create({ layers: [layer({ 'f': { content: 'lower' } })], upper: freshUpper() });
      const reader = await fs.open('f', 0);
      const writer = await fs.open('f', 2 | 0o1000); // O_RDWR | O_TRUNC: copies up, then empties
      assert.equal(fs.fgetattr(reader).size, 5, 'the reader still has the lower file');
      assert.equal(fs.fgetattr(reader).nlink, 1);
      assert.equal(fs.fgetattr(writer).size, 0);
      await fs.release(reader);
      await fs.release(writer);
    });

    it('makes a change at once (the *Now calls FUSE answers use) only when it needs no copy-up and no change is queued before it', async () => {
      const upper = freshUpper();
      const fs = await UnionFs.create({ layers: [layer({ 'd/': {}, 'd/low': { content: 'lower' } })], upper });
      await fs.release(await fs.create('a', 0o644));
      await fs.release(await fs.create('b', 0o644));
      const unlinking = fs.unlink('a'); // queued: nothing may overtake it
      assert.equal(fs.createFileNow('a', 0o600), undefined, 'a create of the name a queued unlink frees waits for it (else EEXIST)');
      assert.equal(fs.setattrNow('b', { mode: 0o600 }), false);
      assert.equal(fs.openNow('b', 1 /* O_WRONLY */), undefined);
      const created = fs.createFile('a', 0o600);
      await unlinking;
      await fs.release((await created).fh);
      // Nothing queued: upper files change at once; what needs a copy-up (or a truncation) does not.
      assert.equal(fs.setattrNow('b', { mode: 0o640, times: [{ sec: 5, nsec: 6 }, { sec: 7, nsec: 8 }] }), true);
      const st = lstatSync(join(upper, 'b'), { bigint: true });
      assert.equal(Number(st.mode) & 0o7777, 0o640);
      assert.equal(st.mtimeNs, 7_000_000_008n);
      assert.equal(fs.setattrNow('d/low', { mode: 0o600 }), false, 'a lower file is copied up on the queued path');
      assert.equal(fs.createFileNow('d/new', 0o644), undefined, 'so is its directory');
      assert.equal(fs.openNow('b', 1 | 0o1000 /* O_WRONLY|O_TRUNC */), undefined);
      const fh = fs.openNow('b', 1);
      assert.notEqual(fh, undefined);
      await fs.release(fh!);
      const made = fs.createFileNow('c', 0o644);
      assert.ok(made !== undefined && made.stat.size === 0 && lstatSync(join(upper, 'c')).isFile());
      await fs.release(made.fh);
      assert.throws(() => fs.createFileNow('c', 0o644), (err: unknown) => err instanceof FsError && err.errno === 'EEXIST');
      assert.equal(fs.lookupStat('nothing'), undefined);
      assert.throws(() => fs.lookupStat('x'.repeat(300)), (err: unknown) => err instanceof FsError && err.errno === 'ENAMETOOLONG');
      assert.equal(await readAll(fs, 'd/low'), 'lower');
    });

    it('refuses every change when read-only', async () => {
      const fs = await UnionFs.create({ layers: [layer({ 'f': {} })], upper: freshUpper(), readOnly: true });
      assert.equal(await errnoOf(fs.unlink('f')), 'EROFS');
      assert.equal(await errnoOf(fs.open('f', 2)), 'EROFS');
    });
  });
});
