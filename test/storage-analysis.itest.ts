/**
 * Debugging layer stacks on debian-multi, answered from the layer indexes:
 * which, history, diff --layer, tree and efficiency, offline and through
 * the daemon, each checked against what the corpus says the layers hold.
 */
import { expect } from 'chai';
import { join } from 'node:path';
import { DEBIAN_MULTI, execFileAsync, layerctl, layerctlJson, scratch } from './support/env.js';
import { type RunningDaemon, startDaemon } from './support/daemon.js';

interface Which {
  path: string; visible: boolean; layer: { position: number } | null;
  entry: { xattrs?: Record<string, string> } | null;
  shadows: { layer: { position: number } }[];
  deletedBy: { layer: { position: number }; kind: string; marker: string } | null;
}

const GZIP_BLOBS = [
  'c03315e586d033da36cda954a86e572ab9f2601a0000dc3377c6baef8fcf8639',
  '5ed84ad7e40a78fab91ea775b355cbf16d84ee1a603977ccbdcf4df853ba1fb5',
  '48faf52126d0077448cde6c03a61d062a89191f0f26f542f8ff4c25d422bddde',
  'dd17963f6facdd5aa380bd5096c1233d3a57a73c168343b4875f369618766a96',
];

describe('debugging layer stacks (which, history, diff --layer, tree, efficiency)', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let root: string;
  before(async () => {
    work = await scratch();
    root = join(work.dir, 'store');
    await layerctlJson(['--root', root, 'import', DEBIAN_MULTI]);
  });
  after(async () => { await work?.remove(); });
  const q = <T>(...args: string[]): Promise<T> => layerctlJson<T>(['--root', root, ...args]);

  it('which /usr/bin/ping names layer 2 and its security.capability xattr', async () => {
    const w = await q<Which>('which', 'debian-multi:latest', '/usr/bin/ping');
    expect(w.visible).to.equal(true);
    expect(w.layer!.position).to.equal(2);
    expect(Buffer.from(w.entry!.xattrs!['security.capability']!, 'base64').toString('hex')).to.equal('0100000200200000000000000000000000000000');
    const text = (await layerctl(['--root', root, 'which', 'debian-multi:latest', '/usr/bin/ping'])).stdout;
    expect(text).to.match(/^\/usr\/bin\/ping: layer 2:f5a14ed60163 .*security\.capability/);
  });

  it('which /etc/motd names the layer-3 whiteout and the version it hides', async () => {
    const w = await q<Which>('which', 'debian-multi:latest', '/etc/motd');
    expect(w.visible).to.equal(false);
    expect(w.deletedBy).to.deep.include({ kind: 'whiteout', marker: '/etc/.wh.motd' });
    expect(w.deletedBy!.layer.position).to.equal(3);
    expect(w.shadows.map((s) => s.layer.position)).to.deep.equal([1]);
    const doc = await q<Which>('which', 'debian-multi:l3-whiteouts', '/usr/share/doc/apt/copyright');
    expect(doc.deletedBy).to.deep.include({ kind: 'opaque', marker: '/usr/share/doc/.wh..wh..opq' });
    const missing = await layerctl(['--root', root, 'which', 'debian-multi:latest', '/no/such/thing']);
    expect(missing.code).to.equal(3);
  });

  it('history counts match the layer tars, and carry created_by', async () => {
    const rows = await q<{ added: number; modified: number; deleted: number; createdBy: string; size: number }[]>('history', 'debian-multi:latest');
    expect(rows).to.have.length(4);
    // layer 1 adds every entry its tar has (minus the root entry)
    const { stdout } = await execFileAsync('tar', ['-tzf', join(DEBIAN_MULTI, 'blobs', 'sha256', GZIP_BLOBS[0]!)], { maxBuffer: 1 << 26 });
    const entries = stdout.split('\n').filter((l) => !['', '.', './'].includes(l));
    expect(rows[0]!.added).to.equal(entries.length);
    expect(rows[0]!.modified + rows[0]!.deleted).to.equal(0);
    // layer 2 deletes what its 5 whiteouts hide (4 files, and the partial/ directory)
    expect(rows[1]!.deleted).to.equal(5);
    expect(rows[1]!.createdBy).to.match(/^apt-get install/);
    expect(rows[2]!.createdBy).to.match(/whiteouts/);
  });

  it('diff --layer 3 lists the opaque /usr/share/doc and the whiteouts', async () => {
    const lines = await q<{ kind: string; path: string }[]>('diff', 'debian-multi:latest', '--layer', '3');
    expect(lines).to.deep.include({ kind: 'C', path: '/usr/share/doc', size: 0 });
    expect(lines).to.deep.include({ kind: 'D', path: '/etc/motd', size: 0 });
    expect(lines).to.deep.include({ kind: 'D', path: '/usr/share/doc/apt/copyright', size: 0 });
    expect(lines.find((l) => l.path === '/usr/share/doc/apt/NEW')?.kind).to.equal('A');
  });

  it('efficiency reports the ~50 MB of apt lists deleted by layer 2, and --min fails CI', async () => {
    const e = await q<{ score: number; deletedBytes: number; offenders: { path: string; layers: number[] }[] }>('efficiency', 'debian-multi:latest');
    expect(e.deletedBytes).to.be.greaterThan(50_000_000);
    expect(e.offenders[0]!.path).to.match(/^\/var\/lib\/apt\/lists\//);
    expect(e.score).to.be.within(0, 1);
    const strict = await layerctl(['--root', root, 'efficiency', 'debian-multi:latest', '--min', '0.99']);
    expect(strict.code).to.equal(9);
    const lax = await layerctl(['--root', root, 'efficiency', 'debian-multi:latest', '--min', '0.1']);
    expect(lax.code).to.equal(0);
  });

  it('tree shows each entry with its layer', async () => {
    const t = await q<{ path: string; layer: { position: number } }[]>('tree', 'debian-multi:latest', '/opt/corpus', '--depth', '1');
    expect(t.map((e) => e.path)).to.include.members(['/opt/corpus/xattr', '/opt/corpus/links']);
    expect(t.every((e) => e.layer.position === 4)).to.equal(true);
    const all = await q<unknown[]>('tree', 'debian-multi:l4-special');
    expect(all).to.have.length(6830); // the intended listing's path count
  });

  describe('through the daemon', () => {
    let daemon: RunningDaemon | undefined;
    before(async () => { daemon = await startDaemon(join(work.dir, 'd')); });
    after(async () => { await daemon?.stop(); });
    it('answers the same as offline mode', async () => {
      const s = daemon!.socket;
      await layerctlJson(['--socket', s, 'import', DEBIAN_MULTI]);
      const w = await layerctlJson<Which>(['--socket', s, 'which', 'debian-multi:latest', '/etc/motd']);
      expect(w.deletedBy!.layer.position).to.equal(3);
      const queries = [
        ['which', 'debian-multi:latest', '/etc/motd'],
        ['which', 'debian-multi:latest', '/usr/bin/ping'],
        ['history', 'debian-multi:latest'],
        ['diff', 'debian-multi:latest', '--layer', '3'],
        ['tree', 'debian-multi:latest', '/opt/corpus', '--depth', '2'],
        ['efficiency', 'debian-multi:latest'],
      ];
      for (const query of queries) {
        const viaDaemon = await layerctlJson<unknown>(['--socket', s, ...query]);
        expect(viaDaemon, query.join(' ')).to.deep.equal(await q<unknown>(...query));
      }
    });
  });
});
