/**
 * mount/directoryScan.ts: the daemon's walk of an unpack directory kept in a
 * file, read by a mount host instead of walking the directory again. It
 * must describe the directory as the walk did, open the very files the walk
 * saw and nothing else, and be refused when it is not a scan of the
 * directory asked for. No FUSE; needs root (mknod, trusted.* xattrs).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, readSync } from 'node:fs';
import { link, mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isLayerdError } from '../common/errors.js';
import { directoryScanSource, writeDirectoryScan } from '../mount/directoryScan.js';
import { directorySource, scanDirectory } from '../mount/lowerDir.js';
import { type LayerEntry, type LayerSource } from '../storage/layerIndex.js';

function readAll(source: LayerSource, entry: LayerEntry): string {
  const fd = source.content(entry)!.open!();
  try {
    const buf = Buffer.alloc(entry.size);
    readSync(fd, buf, 0, entry.size, 0);
    return buf.toString();
  } finally {
    closeSync(fd);
  }
}

describe('mount directory scan (a walk kept in a file)', () => {
  let work: string;
  let dir: string;
  beforeEach(async () => {
    work = await mkdtemp(join(tmpdir(), 'layerd-dirscan-'));
    dir = join(work, 'upper');
    await mkdir(join(dir, 'etc/opaque'), { recursive: true });
    await writeFile(join(dir, 'etc/a'), 'AAA');
    await link(join(dir, 'etc/a'), join(dir, 'etc/b'));
    execFileSync('mknod', [join(dir, 'etc/gone'), 'c', '0', '0']);
    execFileSync('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', join(dir, 'etc/opaque')]);
    execFileSync('setfattr', ['-n', 'user.bin', '-v', '0x00ff0a', join(dir, 'etc/a')]);
  });
  afterEach(async () => { await rm(work, { recursive: true, force: true }); });

  it('serves the directory as its walk did, from the file alone', async () => {
    const scanned = await scanDirectory(dir, 'x', 'overlay');
    const file = join(work, 'scan.json');
    await writeDirectoryScan(scanned, file);
    const walked = directorySource(scanned);
    const loaded = await directoryScanSource(file, dir);
    assert.deepEqual(loaded.index, walked.index);
    const a = loaded.index.entries.find((e) => e.path === 'etc/a')!;
    const b = loaded.index.entries.find((e) => e.path === 'etc/b')!;
    assert.equal(readAll(loaded, a), 'AAA');
    assert.equal(readAll(loaded, b), 'AAA', 'a hard link reads its first name');
    assert.deepEqual(loaded.index.whiteouts, ['etc/gone']);
    assert.deepEqual(loaded.index.opaques, ['etc/opaque']);
  });

  it('opens only the files the walk saw: one replaced since is ESTALE', async () => {
    const file = join(work, 'scan.json');
    await writeDirectoryScan(await scanDirectory(dir, 'x', 'overlay'), file);
    await writeFile(join(dir, 'etc/new'), 'BBB');
    await rename(join(dir, 'etc/new'), join(dir, 'etc/a'));
    const loaded = await directoryScanSource(file, dir);
    const a = loaded.index.entries.find((e) => e.path === 'etc/a')!;
    assert.throws(() => readAll(loaded, a), (err: unknown) => (err as NodeJS.ErrnoException).code === 'ESTALE' || /ESTALE/.test(String(err)));
  });

  it('refuses a scan of another directory, a torn file and an unknown version (ECORRUPT)', async () => {
    const file = join(work, 'scan.json');
    await writeDirectoryScan(await scanDirectory(dir, 'x', 'overlay'), file);
    const corrupt = (err: unknown): boolean => isLayerdError(err) && err.code === 'ECORRUPT';
    await assert.rejects(directoryScanSource(file, join(work, 'other')), corrupt);
    const whole = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>;
    await writeFile(file, JSON.stringify(whole).slice(0, 100));
    await assert.rejects(directoryScanSource(file, dir), corrupt);
    await writeFile(file, JSON.stringify({ ...whole, version: 99 }));
    await assert.rejects(directoryScanSource(file, dir), corrupt);
    await writeFile(file, JSON.stringify({ ...whole, inodes: [] }));
    await assert.rejects(directoryScanSource(file, dir), corrupt);
  });
});
