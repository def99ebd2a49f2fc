/**
 * Directories and indexes written as layer tars (storage/layerWriter.ts),
 * checked by reading the tars back with layerd's indexer, GNU tar and
 * Python's tarfile: hard links whatever order their names are written in,
 * nanosecond times, names an OCI layer cannot express, sockets, and bytes
 * read through the descriptor a source hands out.
 */
import { expect } from 'chai';
import { fsError } from '../common/sys/errors.js';
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, openSync, readlinkSync } from 'node:fs';
import { link, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { type LayerdError, isLayerdError } from '../common/errors.js';
import { directorySource, scanDirectory } from '../mount/lowerDir.js';
import { type ContentRef, type LayerEntry, type LayerIndex, type LayerSource, LAYER_INDEX_VERSION } from '../storage/layerIndex.js';
import { LayerUnpacker } from '../storage/layerUnpack.js';
import { type LayerTarSummary, writeLayerTar } from '../storage/layerWriter.js';
import { execFileAsync, scratch } from './support/env.js';
import { writeTar } from './support/tarBuilder.js';

type Work = { dir: string; remove(): Promise<void> };

/** A source over real files: `files` maps an entry's path to the file holding its bytes. */
function sourceOf(entries: LayerEntry[], files: Record<string, string> = {}, extra: Partial<LayerIndex> = {}): LayerSource {
  const index: LayerIndex = { version: LAYER_INDEX_VERSION, id: 'test', entries, whiteouts: [], opaques: [], ...extra };
  return {
    index,
    content: (entry): ContentRef | undefined => {
      if (entry.kind !== 'file' || entry.size === 0) return undefined;
      const path = files[entry.path];
      if (path === undefined) throw new Error(`test source has no bytes for ${entry.path}`);
      return { path, offset: 0, size: entry.size };
    },
  };
}

function fileEntry(path: string, size: number, more: Partial<LayerEntry> = {}): LayerEntry {
  return { path, kind: 'file', mode: 0o644, uid: 0, gid: 0, mtime: 1_700_000_000, size, ...more };
}

function dirEntry(path: string, more: Partial<LayerEntry> = {}): LayerEntry {
  return { path, kind: 'dir', mode: 0o755, uid: 0, gid: 0, mtime: 1_700_000_000, size: 0, ...more };
}

async function indexTar(tar: string): Promise<Omit<LayerIndex, 'id'>> {
  const unpacker = new LayerUnpacker();
  await pipeline(createReadStream(tar), unpacker.writable);
  return (await unpacker.done).index;
}

/** Python's tarfile: every member's name, type and raw PAX records. */
async function pythonMembers(tar: string): Promise<{ name: string; type: string; linkname: string; pax: Record<string, string> }[]> {
  const script = [
    'import json, sys, tarfile',
    'for m in tarfile.open(sys.argv[1]):',
    '    print(json.dumps({"name": m.name, "type": m.type.decode(), "linkname": m.linkname, "pax": m.pax_headers}))',
  ].join('\n');
  const { stdout } = await execFileAsync('python3', ['-c', script, tar]);
  return stdout.trim().split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as { name: string; type: string; linkname: string; pax: Record<string, string> });
}

async function gnuExtract(work: Work, tar: string, name: string): Promise<string> {
  const dir = join(work.dir, name);
  await mkdir(dir);
  await execFileAsync('tar', ['--same-owner', '-xpf', tar, '-C', dir]);
  return dir;
}

async function expectRefusal(promise: Promise<unknown>, code: string, pattern: RegExp): Promise<LayerdError> {
  let caught: unknown;
  try {
    await promise;
  } catch (err) {
    caught = err;
  }
  if (!isLayerdError(caught)) expect.fail(`expected a LayerdError ${code}, got ${String(caught)}`);
  expect(caught.code).to.equal(code);
  expect(caught.message).to.match(pattern);
  return caught;
}

describe('layer tars', function () {
  this.timeout(60_000);
  let work: Work;
  let count = 0;
  before(async () => { work = await scratch('layerd-layer-tar-'); });
  after(async () => { await work?.remove(); });

  async function write(source: LayerSource): Promise<{ tar: string; summary: LayerTarSummary }> {
    const tar = join(work.dir, `out-${++count}.tar`);
    const summary = await writeLayerTar(source, createWriteStream(tar));
    return { tar, summary };
  }

  describe('hard links', () => {
    /** Link groups of a directory, each listed in the scan's order (BFS): the first name scanned first. */
    const groups: Record<string, string[]> = {
      z: ['z', 'a/z'], // a name in a directory that sorts before the first name
      y: ['y', 'b/y', 'm/n/o/y'], // three names at three depths
      c: ['c/one', 'c/two'], // one directory
      d: ['d', 'deep/er/x'], // scan order and byte order agree
      k: ['k/w', 'k/k2/w'], // deeper, and sorting first
    };

    async function linkedDirectory(): Promise<string> {
      const dir = join(work.dir, 'links');
      for (const [key, names] of Object.entries(groups)) {
        for (const [i, name] of names.entries()) {
          const path = join(dir, name);
          await mkdir(join(path, '..'), { recursive: true });
          if (i === 0) await writeFile(path, `content of ${key}\n`, { mode: 0o640 });
          else await link(join(dir, names[0]!), path);
        }
      }
      await writeFile(join(dir, 'plain'), 'not linked\n');
      return dir;
    }

    it('writes one inode per group, the first name written carrying the content (indexer, GNU tar)', async () => {
      const dir = await linkedDirectory();
      const { tar } = await write(directorySource(await scanDirectory(dir)));

      // GNU tar's rule: every link names a member written before it.
      const members = await pythonMembers(tar);
      const seen = new Set<string>();
      for (const m of members) {
        if (m.type === '1') expect(seen.has(m.linkname), `${m.name} -> ${m.linkname} before its target`).to.equal(true);
        seen.add(m.name.replace(/\/$/, ''));
      }
      expect(members.filter((m) => m.type === '1')).to.have.length(6);

      // layerd's indexer: one member with the bytes per group, the rest link to it.
      const index = await indexTar(tar);
      const bytes = await readFile(tar);
      const by = new Map(index.entries.map((e) => [e.path, e]));
      for (const [key, names] of Object.entries(groups)) {
        const firstWritten = [...names].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)))[0]!;
        const carrier = by.get(firstWritten)!;
        expect(carrier.link, firstWritten).to.equal(undefined);
        const want = `content of ${key}\n`;
        expect(bytes.subarray(carrier.offset!, carrier.offset! + carrier.size).toString()).to.equal(want);
        for (const name of names.filter((n) => n !== firstWritten)) {
          expect(by.get(name), name).to.deep.include({ kind: 'file', link: firstWritten, offset: carrier.offset, size: want.length, mode: 0o640 });
        }
      }
      expect(by.get('plain')?.link).to.equal(undefined);

      // GNU tar extracts one inode per group, with the right link count and bytes.
      const out = await gnuExtract(work, tar, 'links-extracted');
      for (const [key, names] of Object.entries(groups)) {
        const stats = await Promise.all(names.map((n) => stat(join(out, n))));
        expect(new Set(stats.map((s) => s.ino)).size, key).to.equal(1);
        expect(stats[0]!.nlink, key).to.equal(names.length);
        for (const n of names) expect(await readFile(join(out, n), 'utf8')).to.equal(`content of ${key}\n`);
      }
      expect((await stat(join(out, 'plain'))).nlink).to.equal(1);
    });

    it('writes a link to a file of a lower layer as a link to that name', async () => {
      const { tar } = await write(sourceOf([fileEntry('a', 0, { link: 'lower/z' })]));
      const members = await pythonMembers(tar);
      expect(members.map((m) => [m.name, m.type, m.linkname])).to.deep.equal([['a', '1', 'lower/z']]);
      expect((await indexTar(tar)).entries).to.deep.equal([fileEntry('a', 0, { link: 'lower/z' })]);
    });

    it('refuses a link to a lower file whose name this layer also replaces, in either order', async () => {
      // The indexer refuses a link to a later member (as GNU tar does), and one listed after the
      // replacement would read back as a link to the new file: the writer writes neither.
      const b = join(work.dir, 'b-bytes');
      await writeFile(b, 'new b');
      await expectRefusal(write(sourceOf([fileEntry('a', 0, { link: 'b' }), fileEntry('b', 5)], { b })), 'EUNSUPPORTED', /hard link a to b.*replaces b/);
      const a = join(work.dir, 'a-bytes');
      await writeFile(a, 'new a');
      await expectRefusal(write(sourceOf([fileEntry('b', 0, { link: 'a' }), fileEntry('a', 5)], { a })), 'EUNSUPPORTED', /hard link b to a.*replaces a/);
    });

    it('the indexer refuses a link to a member that comes later in the archive, as GNU tar does', async () => {
      const tar = join(work.dir, 'lower-links.tar');
      await writeTar(tar, [
        { header: { name: 'a', type: 'link', linkname: 'z' } },
        { header: { name: 'z', type: 'file', size: 3 }, content: 'new' },
      ]);
      await expectRefusal(indexTar(tar), 'EBADTAR', /hard link a points to z, which comes later/);
    });

    it('the indexer keeps a link to a lower file by name, and a second link on the first', async () => {
      const tar = join(work.dir, 'lower-links2.tar');
      await writeTar(tar, [
        { header: { name: 'a', type: 'link', linkname: 'z' } },
        { header: { name: 'c', type: 'link', linkname: 'a' } },
      ]);
      const by = new Map((await indexTar(tar)).entries.map((e) => [e.path, e]));
      expect(by.get('a')).to.deep.include({ link: 'z', size: 0 });
      expect(by.get('c')).to.deep.include({ link: 'a', size: 0 });
      expect(by.get('c')?.offset).to.equal(undefined);
    });
  });

  describe('nanosecond times', () => {
    const entries = (): LayerEntry[] => [
      dirEntry('d', { mtimeNsec: 5 }),
      fileEntry('d/f', 2, { mtimeNsec: 123_456_789 }),
      fileEntry('future', 0, { mtime: 2 ** 33, mtimeNsec: 999_999_999 }),
      fileEntry('neg', 0, { mtime: -2, mtimeNsec: 750_000_000 }),
      fileEntry('old', 0, { mtime: -31_536_001, mtimeNsec: 1 }),
      fileEntry('whole', 0),
    ];

    it('round-trip through the writer and the indexer, read exactly by Python and GNU tar', async () => {
      const f = join(work.dir, 'f-bytes');
      await writeFile(f, 'f\n');
      const { tar } = await write(sourceOf(entries(), { 'd/f': f }));

      const index = await indexTar(tar);
      expect(index.entries).to.deep.equal(entries().map((e) => (e.kind === 'file' && e.size > 0 ? { ...e, offset: index.entries[1]!.offset } : e)));

      const pax = new Map((await pythonMembers(tar)).map((m) => [m.name.replace(/\/$/, ''), m.pax]));
      expect(pax.get('d')?.['mtime']).to.equal('1700000000.000000005');
      expect(pax.get('d/f')?.['mtime']).to.equal('1700000000.123456789');
      expect(pax.get('future')?.['mtime']).to.equal('8589934592.999999999');
      expect(pax.get('neg')?.['mtime']).to.equal('-1.25');
      expect(pax.get('old')?.['mtime']).to.equal('-31536000.999999999');
      expect(pax.get('whole')).to.deep.equal({}); // no PAX header at all

      const { stdout } = await execFileAsync('tar', ['--full-time', '-tvf', tar]);
      expect(stdout).to.match(/2023-11-14 22:13:20\.123456789 d\/f\n/);
      const out = await gnuExtract(work, tar, 'times-extracted');
      const { stdout: times } = await execFileAsync('stat', ['-c', '%n %.9Y', ...['d/f', 'neg', 'old', 'future', 'whole'].map((n) => join(out, n))]);
      expect(times.replaceAll(`${out}/`, '').trim().split('\n')).to.deep.equal([
        'd/f 1700000000.123456789', 'neg -1.250000000', 'old -31536000.999999999', 'future 8589934592.999999999', 'whole 1700000000.000000000',
      ]);
    });

    it('are read from a tar GNU tar wrote of files with nanosecond times', async () => {
      const dir = join(work.dir, 'gnu-times');
      await mkdir(join(dir, 'sub'), { recursive: true });
      await writeFile(join(dir, 'sub', 'f'), 'x');
      await execFileAsync('touch', ['-h', '-d', '@1700000000.987654321', join(dir, 'sub', 'f')]);
      await execFileAsync('touch', ['-h', '-d', '@-0.5', join(dir, 'sub')]);
      const tar = join(work.dir, 'gnu-times.tar');
      await execFileAsync('tar', ['--format=posix', '-cf', tar, '-C', dir, 'sub']);
      const by = new Map((await indexTar(tar)).entries.map((e) => [e.path, e]));
      expect(by.get('sub/f')).to.deep.include({ mtime: 1_700_000_000, mtimeNsec: 987_654_321 });
      expect(by.get('sub')).to.deep.include({ mtime: -1, mtimeNsec: 500_000_000 });
    });

    it('whole seconds write the same bytes as before nanoseconds were kept (diffIDs unchanged)', async () => {
      const hosts = join(work.dir, 'hosts-bytes');
      await writeFile(hosts, '127.0.0.1 localhost\n');
      const layer = (nsec: { mtimeNsec?: number }): LayerSource => sourceOf([
        dirEntry('etc', nsec),
        fileEntry('etc/hosts', 20, { uid: 1 << 22, ...nsec }),
        { path: 'etc/localtime', kind: 'symlink', mode: 0o777, uid: 0, gid: 0, mtime: -5, size: 0, target: '/usr/share/zoneinfo/UTC', ...nsec },
        fileEntry('etc/hosts.bak', 20, { link: 'etc/hosts', uid: 1 << 22, ...nsec }),
      ], { 'etc/hosts': hosts }, { whiteouts: ['etc/motd'], opaques: ['etc'] });
      const digest = async (tar: string): Promise<string> => createHash('sha256').update(await readFile(tar)).digest('hex');
      const before = await digest((await write(layer({}))).tar);
      // The digest the writer gave this layer before it knew nanoseconds.
      expect(before).to.equal('240938741ef6d65dc90ed2d346d30076d20d8d5ab52efc59d6674dc895b6e292');
      expect(await digest((await write(layer({ mtimeNsec: 0 }))).tar)).to.equal(before);
    });

    it('refuses nanoseconds out of range', async () => {
      await expectRefusal(write(sourceOf([fileEntry('f', 0, { mtimeNsec: 1_000_000_000 })])), 'EINVAL', /nanoseconds of f/);
    });
  });

  describe('what OCI cannot express', () => {
    for (const [what, entry] of [
      ['a file named .wh.foo', fileEntry('.wh.foo', 0)],
      ['a file named .wh..wh..opq in a directory', fileEntry('sub/.wh..wh..opq', 0)],
      ['a directory named .wh.dir', dirEntry('.wh.dir')],
    ] as const) {
      it(`refuses ${what} before writing anything`, async () => {
        const tar = join(work.dir, `refused-${++count}.tar`);
        const source = sourceOf([dirEntry('sub'), fileEntry('sub/a', 0), entry]);
        const err = await expectRefusal(writeLayerTar(source, createWriteStream(tar)), 'EUNSUPPORTED', /whiteout/);
        expect(err.message).to.contain(entry.path);
        expect(err.context['path']).to.equal(entry.path);
        expect((await stat(tar).catch(() => undefined))?.size ?? 0).to.equal(0);
      });
    }

    it('still writes the layer\'s own whiteouts and opaque markers', async () => {
      const { tar } = await write(sourceOf([dirEntry('sub'), fileEntry('sub/a', 0)], {}, { whiteouts: ['gone', 'sub/old'], opaques: ['sub'] }));
      expect((await pythonMembers(tar)).map((m) => m.name)).to.deep.equal(['.wh.gone', 'sub', 'sub/.wh..wh..opq', 'sub/.wh.old', 'sub/a']);
      const index = await indexTar(tar);
      expect(index.whiteouts).to.deep.equal(['gone', 'sub/old']);
      expect(index.opaques).to.deep.equal(['sub']);
    });

    it('leaves sockets out, and counts them', async () => {
      const { tar, summary } = await write(sourceOf([dirEntry('run'), { ...fileEntry('run/sock', 0), kind: 'socket' }, fileEntry('run/pid', 0)]));
      expect(summary).to.deep.equal({ written: 2, socketsSkipped: 1 });
      expect((await pythonMembers(tar)).map((m) => m.name)).to.deep.equal(['run', 'run/pid']);
    });

    it('leaves a real socket of a directory out of its tar', async () => {
      const dir = join(work.dir, 'with-socket');
      await mkdir(dir);
      await writeFile(join(dir, 'file'), 'x');
      const server = createServer();
      await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(join(dir, 'sock'), resolve); });
      try {
        const { tar } = await write(directorySource(await scanDirectory(dir)));
        expect((await pythonMembers(tar)).map((m) => m.name)).to.deep.equal(['file']);
      } finally {
        await new Promise<void>((resolve) => server.close(() => resolve()));
      }
    });
  });

  it('fails with ECONFLICT when a file has shrunk since it was scanned', async () => {
    const short = join(work.dir, 'short-bytes');
    await writeFile(short, 'abc');
    await expectRefusal(write(sourceOf([fileEntry('f', 10)], { f: short })), 'ECONFLICT', /file f changed/);
  });

  it('fails with the open\'s own error when a file is no longer the one scanned (no stray stream error)', async () => {
    const source: LayerSource = {
      index: { version: LAYER_INDEX_VERSION, id: 'test', entries: [fileEntry('a', 0), fileEntry('f', 10)], whiteouts: [], opaques: [] },
      content: () => ({ path: 'f', offset: 0, size: 10, open: () => { throw fsError('ESTALE', 'f', 'open layer file'); } }),
    };
    let uncaught: unknown;
    const onUncaught = (err: unknown): void => { uncaught = err; };
    process.on('uncaughtException', onUncaught);
    try {
      let caught: unknown;
      await write(source).catch((err: unknown) => { caught = err; });
      expect((caught as { errno?: string }).errno).to.equal('ESTALE');
      await new Promise((r) => setImmediate(r));
    } finally {
      process.off('uncaughtException', onUncaught);
    }
    expect(uncaught, 'an error event nobody listens to would kill the daemon').to.equal(undefined);
  });

  it('reads a file\'s bytes through the descriptor its source opens, and closes it', async () => {
    const real = join(work.dir, 'real-bytes');
    const decoy = join(work.dir, 'decoy-bytes');
    await writeFile(real, '---real bytes---');
    await writeFile(decoy, '---decoy bytes--');
    let fd = -1;
    const source: LayerSource = {
      index: { version: LAYER_INDEX_VERSION, id: 'test', entries: [fileEntry('f', 10)], whiteouts: [], opaques: [] },
      content: () => ({ path: decoy, offset: 3, size: 10, open: () => (fd = openSync(real, 'r')) }),
    };
    const { tar } = await write(source);
    const index = await indexTar(tar);
    const offset = index.entries[0]!.offset!;
    expect((await readFile(tar)).subarray(offset, offset + 10).toString()).to.equal('real bytes');
    expect(fd).to.be.greaterThan(-1);
    // Closed: the number is free, or some later open of another file has it.
    let open: string | undefined;
    try { open = readlinkSync(`/proc/self/fd/${fd}`); } catch { open = undefined; }
    expect(open).to.not.equal(real);
  });
});
