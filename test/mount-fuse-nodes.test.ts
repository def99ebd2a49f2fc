/**
 * Unit tests of the kernel's node table (mount/fuseNodes.ts): which node id
 * the kernel is given for a name, so that hard links share one kernel inode,
 * renames move whole subtrees, and nothing stale is found again.
 */
import assert from 'node:assert/strict';
import { NodeTable } from '../mount/fuseNodes.js';
import type { UnionStat } from '../mount/unionFs.js';

const FILE = 0o100644;
const DIR = 0o040755;

const T0 = { sec: 0, nsec: 0 };

function st(ino: number, mode = FILE): UnionStat {
  return { ino, mode, nlink: 1, uid: 0, gid: 0, size: 0, rdev: 0, blksize: 4096, blocks: 0, atime: T0, mtime: T0, ctime: T0 };
}

describe('mount: FUSE node table', () => {
  it('gives all names of a hard-link group one node, and a directory rename moves the paths below it', () => {
    const nodes = new NodeTable();
    const dir = nodes.remember(1, 'etc', st(10, DIR));
    const a = nodes.remember(dir.id, 'a', st(20));
    const b = nodes.remember(1, 'b', st(20));
    assert.equal(b.id, a.id);
    assert.equal(a.lookups, 2);
    assert.equal(nodes.pathOf(a.id), 'etc/a');
    nodes.move(1, 'etc', 1, 'conf');
    assert.equal(nodes.pathOf(a.id), 'conf/a');
    assert.equal(nodes.childPath(dir.id, 'x'), 'conf/x');
    // Once one name is gone, the node is reached through the other.
    nodes.removeName(dir.id, 'a');
    assert.equal(nodes.pathOf(a.id), 'b');
  });

  it('never gives a directory a second name by its inode number, nor a node of another type', () => {
    const nodes = new NodeTable();
    const d1 = nodes.remember(1, 'd1', st(30, DIR));
    const d2 = nodes.remember(1, 'd2', st(30, DIR));
    assert.notEqual(d2.id, d1.id);
    const f = nodes.remember(1, 'f', st(40));
    const link = nodes.remember(1, 'l', st(40, 0o120777));
    assert.notEqual(link.id, f.id);
  });

  it('follows a new inode number (copy-up) and forgets the old one', () => {
    const nodes = new NodeTable();
    const a = nodes.remember(1, 'a', st(50));
    nodes.noteIno(a, 0x80000005);
    assert.equal(nodes.remember(1, 'other-name', st(0x80000005)).id, a.id);
    assert.notEqual(nodes.remember(1, 'new', st(50)).id, a.id);
  });

  it('does not hand out a nameless node again when the upper reuses its inode number', () => {
    const nodes = new NodeTable();
    const gone = nodes.remember(1, 'gone', st(0x80000009));
    nodes.removeName(1, 'gone');
    assert.notEqual(nodes.remember(1, 'fresh', st(0x80000009)).id, gone.id);
  });

  it('drops a node once the kernel forgot every lookup, and never reuses its id', () => {
    const nodes = new NodeTable();
    const a = nodes.remember(1, 'a', st(60));
    nodes.remember(1, 'a', st(60));
    nodes.forget(a.id, 1);
    assert.equal(nodes.get(a.id)?.id, a.id);
    nodes.forget(a.id, 1);
    assert.equal(nodes.get(a.id), undefined);
    assert.equal(nodes.find(1, 'a'), undefined);
    const again = nodes.remember(1, 'a', st(60));
    assert.ok(again.id > a.id);
    nodes.forget(1, 5); // the root stays
    assert.equal(nodes.pathOf(1), '');
  });

  it('with inode matching off (live layers renumber), names never share a node by number', () => {
    const nodes = new NodeTable(false);
    const a = nodes.remember(1, 'a', st(70));
    assert.notEqual(nodes.remember(1, 'b', st(70)).id, a.id);
  });

  it('gives a name replaced by another kind of file a new node', () => {
    const nodes = new NodeTable(false);
    const a = nodes.remember(1, 'x', st(80));
    const b = nodes.remember(1, 'x', st(80, DIR));
    assert.notEqual(b.id, a.id);
    assert.equal(nodes.find(1, 'x')?.id, b.id);
  });
});
