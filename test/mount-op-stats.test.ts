/**
 * mount/opStats.ts: the FUSE statistics a mount server writes for the
 * daemon. Writes to one file never overlap (a reader never sees a
 * half-written file), and a mount served again counts on from its file.
 */
import { expect } from 'chai';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { OpStats, addSnapshot, readSnapshot } from '../mount/opStats.js';

describe('mount op stats', () => {
  let dir: string;
  beforeEach(async () => { dir = await mkdtemp(join(tmpdir(), 'layerd-opstats-')); });
  afterEach(async () => { await rm(dir, { recursive: true, force: true }); });

  it('folds writes requested while one runs into one more write: all succeed, the file holds the last counts', async () => {
    const stats = new OpStats();
    const file = join(dir, 'fuse-stats.json');
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 50; i++) {
      stats.record('read', 0.0001);
      writes.push(stats.writeTo(file));
    }
    await Promise.all(writes);
    expect((await readSnapshot(file))!['read']!.count).to.equal(50);
    expect(await readdir(dir)).to.deep.equal(['fuse-stats.json']);
  });

  it('continues from the counts in an existing file', async () => {
    const file = join(dir, 'fuse-stats.json');
    const first = new OpStats();
    first.record('write', 0.002);
    first.record('write', 2);
    await first.writeTo(file);
    const again = await OpStats.continuing(file);
    again.record('write', 0.002);
    const snap = again.snapshot();
    expect(snap['write']!.count).to.equal(3);
    expect(snap['write']!.sumSeconds).to.be.closeTo(2.004, 1e-9);
    expect(snap['write']!.buckets.at(-1)).to.equal(2); // the 2 s write is only in +Inf
  });

  it('ignores a stats file that is missing, broken, or not counters', async () => {
    const file = join(dir, 'fuse-stats.json');
    expect(await readSnapshot(file)).to.equal(undefined);
    for (const text of ['{"read": {"count": 1', '[]', '{"read": {"count": -1, "sumSeconds": 0, "buckets": []}}', '{"read": 7}']) {
      await writeFile(file, text);
      expect(await readSnapshot(file), text).to.equal(undefined);
      expect((await OpStats.continuing(file)).snapshot()).to.deep.equal({});
    }
    expect(await readFile(file, 'utf8')).to.equal('{"read": 7}');
  });

  it('adds snapshots operation by operation', () => {
    const a = new OpStats();
    a.record('read', 0.00001);
    const b = new OpStats();
    b.record('read', 0.5);
    b.record('open', 0.00001);
    const total = {};
    addSnapshot(total, a.snapshot());
    addSnapshot(total, b.snapshot());
    expect(total).to.have.keys(['read', 'open']);
    expect((total as Record<string, { count: number }>)['read']!.count).to.equal(2);
  });
});
