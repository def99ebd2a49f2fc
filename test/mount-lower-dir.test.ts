/**
 * mount/lowerDir.ts: a plain directory read once as a layer, in both marker
 * dialects (OCI `.wh.` files, overlayfs 0/0 devices and opaque xattrs).
 * No FUSE; needs root (mknod, trusted.* xattrs) and the attr tools.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { link, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { directorySource, scanDirectory } from '../mount/lowerDir.js';
import { parseGetfattrDump } from '../mount/xattrTool.js';

describe('mount lower dir (plain directory as a layer)', () => {
  let dir: string;
  beforeEach(async () => { dir = await mkdtemp(join(tmpdir(), 'layerd-lowerdir-')); });
  afterEach(async () => { await rm(dir, { recursive: true, force: true }); });

  it('reads OCI and overlayfs whiteouts and opaque markers', async () => {
    await mkdir(join(dir, 'oci'));
    await writeFile(join(dir, 'oci/.wh.gone'), '');
    await writeFile(join(dir, 'oci/.wh..wh..opq'), '');
    await mkdir(join(dir, 'ovl'));
    execFileSync('mknod', [join(dir, 'ovl/gone'), 'c', '0', '0']);
    execFileSync('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', join(dir, 'ovl')]);
    await writeFile(join(dir, 'ovl/kept'), 'k');
    const scanned = await scanDirectory(dir);
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
  });

  it('parses getfattr dumps with escaped names and empty values', () => {
    const dump = Buffer.from('# file: /x/we ird\\012n\nuser.e=0x\nuser.b=0x00ff\n\n# file: /x/plain\ntrusted.t=0x79\n');
    const parsed = parseGetfattrDump(dump);
    assert.deepEqual([...parsed.keys()], ['/x/we ird\nn', '/x/plain']);
    assert.equal(parsed.get('/x/we ird\nn')!.get('user.e')!.length, 0);
    assert.equal(parsed.get('/x/we ird\nn')!.get('user.b')!.toString('hex'), '00ff');
    assert.equal(parsed.get('/x/plain')!.get('trusted.t')!.toString(), 'y');
  });
});
