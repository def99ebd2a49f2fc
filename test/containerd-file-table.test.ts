/**
 * fileTableDifference: the check that a directory containerd unpacked holds
 * what the layer's original tar holds, before layerd stores the snapshot as
 * that blob (daemon/snapshotter/fileTable.ts).
 */
import { expect } from 'chai';
import { fileTableDifference } from '../daemon/snapshotter/fileTable.js';
import { type LayerEntry, type LayerIndex } from '../storage/layerIndex.js';

const entry = (path: string, kind: LayerEntry['kind'], extra: Partial<LayerEntry> = {}): LayerEntry =>
  ({ path, kind, mode: 0o644, uid: 0, gid: 0, mtime: 0, size: 0, ...extra });
const index = (entries: LayerEntry[], whiteouts: string[] = [], opaques: string[] = []): LayerIndex =>
  ({ version: 1, id: 'x', entries, whiteouts, opaques });

const layer = index([
  entry('etc', 'dir'), entry('etc/motd', 'file', { size: 12 }), entry('etc/link', 'symlink', { target: 'motd' }), entry('usr/bin/x', 'file', { size: 3 }),
], ['var/gone'], ['opt']);

describe('containerd: the file table of an unpacked directory against its layer', () => {
  it('agrees when the directory holds the same entries, plus the parent directories the tar did not list', () => {
    const unpacked = index([
      entry('', 'dir'), entry('etc', 'dir', { mode: 0o700, mtime: 99 }), entry('etc/motd', 'file', { size: 12, uid: 5 }),
      entry('etc/link', 'symlink', { target: 'motd' }), entry('usr', 'dir'), entry('usr/bin', 'dir'), entry('usr/bin/x', 'file', { size: 3 }), entry('var', 'dir'),
    ], ['var/gone'], ['opt']);
    expect(fileTableDifference(unpacked, layer)).to.equal(undefined);
  });

  it('names a missing file, a size, a symlink target, an extra file, a whiteout and an opaque directory that differ', () => {
    const unpacked = index([
      entry('etc', 'dir'), entry('etc/motd', 'file', { size: 13 }), entry('etc/link', 'symlink', { target: 'other' }), entry('tmp', 'dir'), entry('tmp/extra', 'file'),
    ], [], ['opt', 'srv']);
    const why = fileTableDifference(unpacked, layer) ?? '';
    expect(why).to.include('etc/motd: the directory has a file of 13 bytes, the layer a file of 12 bytes');
    expect(why).to.include('etc/link: the directory has a symlink to "other"');
    expect(why).to.include('usr/bin/x: missing from the directory');
    expect(why).to.include('tmp: a dir in the directory is not in the layer');
    expect(why).to.match(/and \d+ more/);
    const sets = fileTableDifference(index(layer.entries, [], ['opt', 'srv']), layer) ?? '';
    expect(sets).to.include('var/gone: whiteout missing from the directory');
    expect(sets).to.include('srv: opaque directory in the directory is not in the layer');
  });
});
