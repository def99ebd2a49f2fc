/**
 * mount/upperMigration.ts: an upper in the old OCI style becomes the
 * overlayfs format with the meaning it had. Needs root (mknod, trusted.*).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { lstatSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { scanDirectory } from '../mount/lowerDir.js';
import { convertOciUpper } from '../mount/upperMigration.js';

describe('mount upper migration (OCI-style upper → overlayfs format)', () => {
  let dir: string;
  beforeEach(() => { dir = mkdtempSync(join(tmpdir(), 'layerd-upper-migration-')); });
  afterEach(() => { rmSync(dir, { recursive: true, force: true }); });

  it('turns .wh. files into 0/0 devices and opaque markers into the xattr, keeping what they meant', async () => {
    writeFileSync(join(dir, '.wh.gone'), '');
    writeFileSync(join(dir, '.wh.kept'), '');
    writeFileSync(join(dir, 'kept'), 'mine');
    writeFileSync(join(dir, '.fuse_hidden0000000100000002'), 'stale');
    mkdirSync(join(dir, 'd'));
    writeFileSync(join(dir, 'd/.wh..wh..opq'), '');
    writeFileSync(join(dir, 'd/.wh.x'), '');
    writeFileSync(join(dir, 'd/new'), 'n');
    assert.deepEqual(convertOciUpper(dir), { whiteouts: 2, opaques: 1, removed: 2 });
    assert.deepEqual(readdirSync(dir).sort(), ['d', 'gone', 'kept']);
    assert.deepEqual(readdirSync(join(dir, 'd')).sort(), ['new', 'x']);
    const gone = lstatSync(join(dir, 'gone'));
    assert.equal(gone.isCharacterDevice() && gone.rdev === 0, true);
    assert.equal(execFileSync('getfattr', ['--only-values', '-n', 'trusted.overlay.opaque', join(dir, 'd')]).toString(), 'y');
    const scanned = await scanDirectory(dir, undefined, 'overlay');
    assert.deepEqual(scanned.index.whiteouts.sort(), ['d/x', 'gone']);
    assert.deepEqual(scanned.index.opaques, ['d']);
    assert.deepEqual(convertOciUpper(dir), { whiteouts: 0, opaques: 0, removed: 0 }, 'converting again changes nothing');
  });
});
