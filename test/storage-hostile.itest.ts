/**
 * Bad and hostile input: each case fails with its error code, the store
 * stays consistent (fsck clean, nothing half-imported, ingest area empty),
 * and nothing appears outside the store's root.
 */
import { expect } from 'chai';
import { readdir, readFile, writeFile, mkdir, stat, truncate, cp } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { randomBytes } from 'node:crypto';
import { ErrorCodes, isLayerdError } from '../common/errors.js';
import { importRawLayer } from '../storage/importer.js';
import { DEFAULT_INGEST_LIMITS } from '../storage/layerIngest.js';
import { Store } from '../storage/store.js';
import { BUSYBOX, execFileAsync, layerctl, scratch } from './support/env.js';
import { writeLayout } from './support/layoutBuilder.js';
import { type TarItem, writeTar } from './support/tarBuilder.js';

async function tree(dir: string, skip: string): Promise<string[]> {
  const out: string[] = [];
  async function walk(d: string): Promise<void> {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (p === skip) continue;
      out.push(relative(dir, p));
      if (e.isDirectory()) await walk(p);
    }
  }
  await walk(dir);
  return out.sort();
}

describe('import: hostile and broken input fails cleanly', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let root: string;
  let outside: string;
  let n = 0;

  before(async () => {
    work = await scratch();
    root = join(work.dir, 'store');
    outside = join(work.dir, 'outside');
    await mkdir(outside);
    await writeFile(join(outside, 'secret'), 'do not touch\n');
  });
  after(async () => { await work?.remove(); });

  /** Import PATH, expect CODE, then check the store and the world around it. */
  async function expectRefused(path: string, code: string, args: string[] = []): Promise<string> {
    const before = await tree(work.dir, root);
    const r = await layerctl(['--root', root, 'import', path, ...args]);
    expect(r.stderr, `stderr for ${path}`).to.contain(`layerctl: ${code}:`);
    expect(r.code).to.not.equal(0);
    const after = await tree(work.dir, root);
    expect(after, 'nothing written outside the store root').to.deep.equal(before);
    expect(await readFile(join(outside, 'secret'), 'utf8')).to.equal('do not touch\n');
    const fsck = await layerctl(['--root', root, 'fsck', '--json']);
    expect(fsck.code, fsck.stdout).to.equal(0);
    const report = JSON.parse(fsck.stdout) as { checked: { blobs: number; layers: number } };
    expect(report.checked, 'a failed import leaves no trace').to.deep.include({ blobs: 0, layers: 0 });
    expect(await readdir(join(root, 'tmp')), 'ingest area is empty').to.deep.equal([]);
    expect(await readdir(join(root, 'blobs', 'sha256'))).to.deep.equal([]);
    expect(await readdir(join(root, 'layers', 'sha256'))).to.deep.equal([]);
    return r.stderr;
  }

  async function hostileTar(items: TarItem[], gzip = false): Promise<string> {
    const path = join(work.dir, `hostile-${n++}.tar${gzip ? '.gz' : ''}`);
    await writeTar(path, items, { gzip });
    return path;
  }

  const file = (name: string, content = 'x'): TarItem => ({ header: { name, type: 'file', size: Buffer.byteLength(content) }, content });

  it('refuses path traversal with ..', async () => {
    await expectRefused(await hostileTar([file('ok'), file('../../outside/evil')]), ErrorCodes.EBADTAR);
  });

  it('refuses absolute names', async () => {
    await expectRefused(await hostileTar([file(join(outside, 'evil'))]), ErrorCodes.EBADTAR);
  });

  it('refuses an entry that would be written through a symlink', async () => {
    await expectRefused(await hostileTar([
      { header: { name: 'a', type: 'symlink', linkname: outside } },
      file('a/evil'),
    ]), ErrorCodes.EBADTAR);
  });

  it('refuses a symlink that replaces a directory the layer already filled', async () => {
    await expectRefused(await hostileTar([
      file('d/sub/f'),
      { header: { name: 'd', type: 'symlink', linkname: outside } },
    ]), ErrorCodes.EBADTAR);
  });

  it('refuses hard links that point outside the layer', async () => {
    await expectRefused(await hostileTar([
      { header: { name: 'h', type: 'link', linkname: '../../outside/secret' } },
    ]), ErrorCodes.EBADTAR);
    await expectRefused(await hostileTar([
      { header: { name: 'h', type: 'link', linkname: join(outside, 'secret') } },
    ]), ErrorCodes.EBADTAR);
  });

  it('refuses a hard link through a symlink', async () => {
    await expectRefused(await hostileTar([
      { header: { name: 's', type: 'symlink', linkname: outside } },
      { header: { name: 'h', type: 'link', linkname: 's/secret' } },
    ]), ErrorCodes.EBADTAR);
  });

  it('refuses a hard link to a path that comes later in the archive (as GNU tar does)', async () => {
    await expectRefused(await hostileTar([
      { header: { name: 'h', type: 'link', linkname: 'f' } },
      file('f', 'later'),
    ]), ErrorCodes.EBADTAR);
  });

  it('refuses a PAX header bomb (a 64 MiB record) with ELIMIT, exit 6', async () => {
    // Compressed: the format check reads no further than the gzip header, the ingest meets the bomb.
    const path = await hostileTar([{ header: { name: 'f', type: 'file', size: 1, pax: { comment: 'x'.repeat(64 * 1024 * 1024) } }, content: 'x' }], true);
    await expectRefused(path, ErrorCodes.ELIMIT);
    const r = await layerctl(['--root', root, 'import', path]);
    expect(r.code, r.stderr).to.equal(6);
  });

  it('refuses duplicate entries', async () => {
    await expectRefused(await hostileTar([file('dup', 'a'), file('dup', 'b')]), ErrorCodes.EBADTAR);
  });

  it('refuses names and link targets that are not UTF-8 (ustar, GNU long name, PAX), and keeps UTF-8 ones', async () => {
    // Python's tarfile writes the raw bytes (tar-stream's packer would encode them as UTF-8).
    const pyTar = async (name: string, items: string, format: 'GNU' | 'PAX' = 'GNU'): Promise<string> => {
      const path = join(work.dir, `${name}.tar`);
      await execFileAsync('python3', ['-c', `import io, sys, tarfile
t = tarfile.open(sys.argv[1], 'w', format=tarfile.${format}_FORMAT, encoding='utf-8', errors='surrogateescape')
def add(name, target=None):
    ti = tarfile.TarInfo(name.decode('utf-8', 'surrogateescape'))
    if target is None:
        ti.size = 1
        t.addfile(ti, io.BytesIO(b'x'))
    else:
        ti.type = tarfile.SYMTYPE
        ti.linkname = target.decode('utf-8', 'surrogateescape')
        t.addfile(ti)
${items}
t.close()`, path]);
      return path;
    };
    for (const [name, items, format] of [
      ['short', "add(b'ok')\nadd(b'a\\xff')", 'GNU'],
      ['long', "add(b'd' * 120 + b'\\xfe')", 'GNU'],
      ['target', "add(b'l', b't\\xff')", 'GNU'],
      ['pax', "add(b'\\xff' * 3)", 'PAX'],
    ] as const) {
      expect(await expectRefused(await pyTar(name, items, format), ErrorCodes.EBADTAR)).to.match(/is not UTF-8: ".*\\x(ff|fe)"/);
    }
    const good = await pyTar('utf8', "add('é'.encode())\nadd('ü'.encode() * 120)\nadd(b'l', 'ñ'.encode())");
    const r = await layerctl(['--root', root, 'import', '--format', 'layer', good, '--name', 'utf8']);
    expect(r.code, r.stderr).to.equal(0);
    const listed = (await layerctl(['--root', root, 'tree', 'utf8'])).stdout;
    expect(listed).to.contain('/é\n').and.to.contain(`/${'ü'.repeat(120)}\n`).and.to.contain('/l\n');
    expect((await layerctl(['--root', root, 'rmi', 'utf8'])).code).to.equal(0);
    expect((await layerctl(['--root', root, 'prune'])).code).to.equal(0);
  });

  it('refuses a bare .wh. whiteout', async () => {
    await expectRefused(await hostileTar([file('etc/.wh.', '')]), ErrorCodes.EBADTAR);
  });

  it('refuses truncated archives (in a file, and at an entry boundary)', async () => {
    const big = await hostileTar([file('a', 'a'.repeat(100_000)), file('b', 'b'.repeat(100_000))]);
    await truncate(big, 60_000);
    await expectRefused(big, ErrorCodes.EBADTAR);
    const boundary = await hostileTar([file('a', 'a'.repeat(512))]);
    await truncate(boundary, 1024); // header + data, no end-of-archive blocks
    await expectRefused(boundary, ErrorCodes.EBADTAR);
  });

  it('refuses corrupt gzip', async () => {
    const path = await hostileTar([file('a', randomBytes(50_000).toString('base64'))], true);
    const bytes = await readFile(path);
    expect(bytes.length).to.be.greaterThan(30_000);
    for (let i = 20_000; i < 20_060; i++) bytes[i] = bytes[i]! ^ 0x5a;
    await writeFile(path, bytes);
    await expectRefused(path, ErrorCodes.EBADTAR);
  });

  it('refuses absurd sizes', async () => {
    const path = await hostileTar([{ header: { name: 'huge', type: 'file', size: 10, pax: { size: '99999999999999999' } }, content: 'x'.repeat(10) }]);
    const r = await layerctl(['--root', root, 'import', path]);
    expect(r.stderr).to.match(/layerctl: (ELIMIT|EBADTAR):/);
    expect((await layerctl(['--root', root, 'fsck'])).code).to.equal(0);
  });

  it('refuses absurd entry counts (limit lowered for the test)', async () => {
    const items = Array.from({ length: 50 }, (_, i) => file(`f${i}`, ''));
    const path = await hostileTar(items);
    const store = await Store.open(root);
    try {
      let error: unknown;
      await importRawLayer(store, path, 'many', { limits: { ...DEFAULT_INGEST_LIMITS, maxEntries: 20 } }).catch((e: unknown) => { error = e; });
      expect(isLayerdError(error, ErrorCodes.ELIMIT), String(error)).to.equal(true);
      expect(await readdir(join(root, 'tmp'))).to.deep.equal([]);
    } finally {
      store.close();
    }
  });

  describe('image layouts that lie', () => {
    let layer: Buffer;
    before(async () => {
      const p = await hostileTar([file('etc/hostname', 'box\n')], true);
      layer = await readFile(p);
    });

    it('a blob whose bytes do not match its digest', async () => {
      const dir = join(work.dir, `layout-${n++}`);
      await cp(BUSYBOX, dir, { recursive: true });
      const blob = join(dir, 'blobs', 'sha256', '0cd702848a3beeea7fc66881c07855b8d186e06494fb70f926316299adf65219');
      const bytes = await readFile(blob);
      bytes[bytes.length - 100] = bytes[bytes.length - 100]! ^ 1;
      await writeFile(blob, bytes);
      await expectRefused(dir, ErrorCodes.EDIGEST, ['--platform', 'linux/amd64']);
    });

    // The blob is decompressed and parsed while it is hashed (into the ingest
    // area only): its digest must still decide the error, and nothing stays.
    it('a blob corrupted near its start (the decompressor fails at once) is EDIGEST', async () => {
      const dir = join(work.dir, `layout-${n++}`);
      await cp(BUSYBOX, dir, { recursive: true });
      const blob = join(dir, 'blobs', 'sha256', '0cd702848a3beeea7fc66881c07855b8d186e06494fb70f926316299adf65219');
      const bytes = await readFile(blob);
      for (let i = 12; i < 64; i++) bytes[i] = bytes[i]! ^ 0x5a;
      await writeFile(blob, bytes);
      await expectRefused(dir, ErrorCodes.EDIGEST, ['--platform', 'linux/amd64']);
    });

    it('a hostile tar in place of the blob a manifest names is EDIGEST, not a parse error', async () => {
      const evil = await readFile(await hostileTar([file('ok'), file('../../outside/evil')], true));
      const promised = await readFile(await hostileTar([file('etc/data', randomBytes(2048).toString('hex'))], true));
      expect(evil.length).to.be.lessThan(promised.length);
      for (const extra of [0, promised.length]) {
        const dir = join(work.dir, `layout-${n++}`);
        const { layerDigests } = await writeLayout(dir, { layers: [promised] });
        // Shorter than promised, and longer (the size check stops it early).
        await writeFile(join(dir, 'blobs', 'sha256', layerDigests[0]!), Buffer.concat([evil, Buffer.alloc(extra)]));
        await expectRefused(dir, ErrorCodes.EDIGEST);
      }
    });

    it('a manifest that states the wrong size', async () => {
      const dir = join(work.dir, `layout-${n++}`);
      await writeLayout(dir, { layers: [layer], wrongSize: layer.length - 3 });
      await expectRefused(dir, ErrorCodes.EDIGEST);
    });

    it('a config whose diffID does not match the layer', async () => {
      const dir = join(work.dir, `layout-${n++}`);
      await writeLayout(dir, { layers: [layer], wrongDiffId: true });
      await expectRefused(dir, ErrorCodes.EDIGEST);
    });

    it('broken JSON in index.json and in a manifest', async () => {
      const a = join(work.dir, `layout-${n++}`);
      await writeLayout(a, { layers: [layer], indexBytes: Buffer.from('{"schemaVersion": 2, "manifests": [') });
      await expectRefused(a, ErrorCodes.EBADJSON);
      const b = join(work.dir, `layout-${n++}`);
      await writeLayout(b, { layers: [layer], manifestBytes: Buffer.from('{"schemaVersion": 2, "config": 42}') });
      await expectRefused(b, ErrorCodes.EBADJSON);
    });

    it('a Docker schema1 manifest gets a clear "unsupported"', async () => {
      const dir = join(work.dir, `layout-${n++}`);
      await writeLayout(dir, { layers: [layer], manifestBytes: Buffer.from(JSON.stringify({ schemaVersion: 1, name: 'x', tag: 'y', fsLayers: [] })) });
      await expectRefused(dir, ErrorCodes.EUNSUPPORTED);
    });

    it('an unknown path', async () => {
      const r = await layerctl(['--root', root, 'import', join(work.dir, 'does-not-exist')]);
      expect(r.code).to.equal(3);
      expect(r.stderr).to.contain('ENOTFOUND');
    });

    it('and a good layout still imports afterwards', async () => {
      const dir = join(work.dir, `layout-${n++}`);
      await writeLayout(dir, { layers: [layer], tag: 'v1' });
      const r = await layerctl(['--root', root, 'import', dir, '--name', 'good']);
      expect(r.code, r.stderr).to.equal(0);
      expect((await layerctl(['--root', root, 'inspect', 'good:v1'])).code).to.equal(0);
      expect((await stat(join(root, 'metadata.db'))).isFile()).to.equal(true);
    });
  });
});
