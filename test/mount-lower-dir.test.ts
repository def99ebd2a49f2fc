/**
 * mount/lowerDir.ts: a plain directory read once as a layer, in its marker
 * dialect: 'overlay' (0/0 devices, opaque xattrs; every name a name) or
 * 'layer-dir' (also OCI `.wh.` files). No FUSE; needs root (mknod,
 * trusted.* xattrs) and the attr tools.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { link, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { directorySource, scanDirectory } from '../mount/lowerDir.js';

describe('mount lower dir (plain directory as a layer)', () => {
  let dir: string;
  beforeEach(async () => { dir = await mkdtemp(join(tmpdir(), 'layerd-lowerdir-')); });
  afterEach(async () => { await rm(dir, { recursive: true, force: true }); });

  it('reads OCI and overlayfs whiteouts and opaque markers in a layer directory', async () => {
    await mkdir(join(dir, 'oci'));
    await writeFile(join(dir, 'oci/.wh.gone'), '');
    await writeFile(join(dir, 'oci/.wh..wh..opq'), '');
    await mkdir(join(dir, 'ovl'));
    execFileSync('mknod', [join(dir, 'ovl/gone'), 'c', '0', '0']);
    execFileSync('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', join(dir, 'ovl')]);
    await writeFile(join(dir, 'ovl/kept'), 'k');
    const scanned = await scanDirectory(dir, undefined, 'layer-dir');
    assert.deepEqual(scanned.index.whiteouts.sort(), ['oci/gone', 'ovl/gone']);
    assert.deepEqual(scanned.index.opaques.sort(), ['oci', 'ovl']);
    assert.deepEqual(scanned.index.entries.map((e) => e.path).sort(), ['', 'oci', 'ovl', 'ovl/kept']);
    assert.equal(scanned.whiteoutStyles.get('ovl/gone'), 'overlay');
    const ovl = scanned.index.entries.find((e) => e.path === 'ovl')!;
    assert.equal(ovl.xattrs, undefined, 'overlay bookkeeping xattrs are not content');
  });

  it('describes files, hard links, symlinks, devices and binary xattrs', async () => {
    await writeFile(join(dir, 'a'), 'AAA');
    await link(join(dir, 'a'), join(dir, 'b'));
    await symlink('../escape', join(dir, 'sl'));
    execFileSync('mknod', [join(dir, 'null'), 'c', '1', '3']);
    execFileSync('mknod', [join(dir, 'fifo'), 'p']);
    execFileSync('setfattr', ['-n', 'user.bin', '-v', '0x00ff0a', join(dir, 'a')]);
    const source = directorySource(await scanDirectory(dir));
    const byPath = new Map(source.index.entries.map((e) => [e.path, e]));
    assert.equal(byPath.get('b')!.link, 'a');
    assert.equal(byPath.get('sl')!.target, '../escape');
    assert.deepEqual([byPath.get('null')!.kind, byPath.get('null')!.devMajor, byPath.get('null')!.devMinor], ['char', 1, 3]);
    assert.equal(byPath.get('fifo')!.kind, 'fifo');
    assert.equal(Buffer.from(byPath.get('a')!.xattrs!['user.bin']!, 'base64').toString('hex'), '00ff0a');
    assert.equal(source.content(byPath.get('b')!)?.path, join(dir, 'a'));
    assert.equal(byPath.get('a')!.mtimeNsec === undefined || byPath.get('a')!.mtimeNsec! >= 0, true);
  });

  it('reads only overlayfs markers in a writable layer: .wh. names and escaped xattrs are the user\'s', async () => {
    await mkdir(join(dir, 'd'));
    await writeFile(join(dir, 'd/.wh.gone'), 'mine');
    await writeFile(join(dir, '.wh..wh..opq'), 'also mine');
    execFileSync('setfattr', ['-n', 'trusted.overlay.overlay.opaque', '-v', 'y', join(dir, 'd')]);
    execFileSync('setfattr', ['-n', 'trusted.overlay.origin', '-v', 'x', join(dir, 'd')]);
    execFileSync('setfattr', ['-n', 'user.fuseoverlayfs.opaque', '-v', 'y', join(dir, 'd')]);
    const scanned = await scanDirectory(dir, undefined, 'overlay');
    assert.deepEqual(scanned.index.whiteouts, []);
    assert.deepEqual(scanned.index.opaques, []);
    assert.deepEqual(scanned.index.entries.map((e) => e.path).sort(), ['', '.wh..wh..opq', 'd', 'd/.wh.gone']);
    const d = scanned.index.entries.find((e) => e.path === 'd')!;
    assert.deepEqual(Object.keys(d.xattrs ?? {}).sort(), ['trusted.overlay.opaque', 'user.fuseoverlayfs.opaque'],
      'the escaped name reads back as the user set it; overlay bookkeeping (origin) is dropped');
  });

  it('never walks or opens through a symlink swapped in after the walk', async () => {
    await mkdir(join(dir, 'sub'));
    await writeFile(join(dir, 'sub/shadow'), 'scanned');
    const source = directorySource(await scanDirectory(dir));
    const entry = source.index.entries.find((e) => e.path === 'sub/shadow')!;
    await rm(join(dir, 'sub'), { recursive: true });
    await symlink('/etc', join(dir, 'sub'));
    assert.throws(() => source.content(entry)!.open!(), (err: { errno?: string }) => err.errno === 'ELOOP');
    // A different file under the same name is not the scanned one either.
    await rm(join(dir, 'sub'));
    await mkdir(join(dir, 'sub'));
    await writeFile(join(dir, 'sub/shadow'), 'replaced');
    assert.throws(() => source.content(entry)!.open!(), (err: { errno?: string }) => err.errno === 'ESTALE');
  });
});
