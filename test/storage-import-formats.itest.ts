/**
 * Every source format and compression imports debian-multi to the same
 * diffIDs and the same per-layer content, checked against an independent
 * reader of the original blobs (Python's tarfile, test/tools/tarlist.py).
 */
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Store } from '../storage/store.js';
import { type LayerIndex } from '../storage/layerIndex.js';
import { type Digest } from '../storage/digest.js';
import { DEBIAN_MULTI, REPO, execFileAsync, layerctl, layerctlJson, scratch } from './support/env.js';
import { type Variants, makeVariants } from './support/variants.js';

interface OracleMember {
  name: string; type: string; mode: number; uid: number; gid: number; size: number;
  linkname: string; devmajor: number; devminor: number; xattrs: Record<string, string>;
}

const CONFIG = 'bfa0db4fa2917f84460ea84b709b4c254b497fffaab7e7619e418fa0660ad8e3';
const GZIP_BLOBS = [
  'c03315e586d033da36cda954a86e572ab9f2601a0000dc3377c6baef8fcf8639',
  '5ed84ad7e40a78fab91ea775b355cbf16d84ee1a603977ccbdcf4df853ba1fb5',
  '48faf52126d0077448cde6c03a61d062a89191f0f26f542f8ff4c25d422bddde',
  'dd17963f6facdd5aa380bd5096c1233d3a57a73c168343b4875f369618766a96',
];

function norm(name: string): string {
  return name.split('/').filter((p) => p !== '' && p !== '.').join('/');
}

async function oracle(blob: string): Promise<OracleMember[]> {
  const { stdout } = await execFileAsync('python3', [join(REPO, 'test', 'tools', 'tarlist.py'), blob], { maxBuffer: 256 * 1024 * 1024 });
  return stdout.trim().split('\n').map((l) => JSON.parse(l) as OracleMember);
}

/** Compare a stored layer index with what the tar itself says, member by member. */
function compareLayer(index: LayerIndex, members: OracleMember[]): void {
  const byPath = new Map(index.entries.map((e) => [e.path, e]));
  const whiteouts = new Set(index.whiteouts);
  const opaques = new Set(index.opaques);
  let checked = 0;
  for (const m of members) {
    const path = norm(m.name);
    const base = path.slice(path.lastIndexOf('/') + 1);
    if (base === '.wh..wh..opq') {
      expect(opaques.has(path.slice(0, Math.max(0, path.lastIndexOf('/')))), `opaque ${path}`).to.equal(true);
      continue;
    }
    if (base.startsWith('.wh.')) {
      const dir = path.includes('/') ? path.slice(0, path.lastIndexOf('/') + 1) : '';
      expect(whiteouts.has(dir + base.slice(4)), `whiteout ${path}`).to.equal(true);
      continue;
    }
    const e = byPath.get(path);
    expect(e, `entry ${path}`).to.not.equal(undefined);
    if (!e) continue;
    checked++;
    if (m.type === 'hardlink') {
      expect(e.link, `hard link ${path}`).to.equal(norm(m.linkname));
      continue;
    }
    const kind = m.type;
    expect(e.kind, `kind of ${path}`).to.equal(kind);
    expect(e.mode, `mode of ${path}`).to.equal(m.mode);
    expect([e.uid, e.gid], `owner of ${path}`).to.deep.equal([m.uid, m.gid]);
    if (kind === 'file') expect(e.size, `size of ${path}`).to.equal(m.size);
    if (kind === 'symlink') expect(e.target, `target of ${path}`).to.equal(m.linkname);
    if (kind === 'char' || kind === 'block') expect([e.devMajor, e.devMinor], `rdev of ${path}`).to.deep.equal([m.devmajor, m.devminor]);
    const xattrs = Object.fromEntries(Object.entries(e.xattrs ?? {}).map(([k, v]) => [k, Buffer.from(v, 'base64').toString('hex')]));
    expect(xattrs, `xattrs of ${path}`).to.deep.equal(m.xattrs);
  }
  expect(checked).to.equal(index.entries.length);
}

describe('import: every format and compression (debian-multi)', function () {
  this.timeout(600_000);
  let work: { dir: string; remove(): Promise<void> };
  let variants: Variants;
  let expectedDiffIds: Digest[];
  let oracles: OracleMember[][];

  before(async () => {
    work = await scratch();
    variants = await makeVariants(join(work.dir, 'variants'));
    const config = JSON.parse(await readFile(join(DEBIAN_MULTI, 'blobs', 'sha256', CONFIG), 'utf8')) as { rootfs: { diff_ids: Digest[] } };
    expectedDiffIds = config.rootfs.diff_ids;
    oracles = await Promise.all(GZIP_BLOBS.map((b) => oracle(join(DEBIAN_MULTI, 'blobs', 'sha256', b))));
  });
  after(async () => { await work?.remove(); });

  const cases: [string, (v: Variants) => string][] = [
    ['OCI layout (gzip, umoci)', (v) => v.ociLayout],
    ['OCI archive', (v) => v.ociArchive],
    ['docker-save archive (uncompressed layers)', (v) => v.dockerArchive],
    ['OCI layout, zstd', (v) => v.zstdLayout],
    ['OCI layout, uncompressed', (v) => v.uncompressedLayout],
    ['OCI layout, plain tars mislabeled +gzip', (v) => v.mislabeledLayout],
    ['OCI layout, gzip re-compressed by skopeo', (v) => v.gzipFromDockerLayout],
  ];

  for (const [label, pick] of cases) {
    it(`${label}: same diffIDs, same content`, async () => {
      const root = join(work.dir, `store-${label.replace(/[^a-z0-9]+/gi, '-')}`);
      const imported = await layerctlJson<{ id: string; refs: string[] }[]>(['--root', root, 'import', pick(variants), '--name', 'dm']);
      const latest = imported.find((i) => i.refs.some((r) => r.endsWith(':latest')));
      expect(latest, 'an image tagged latest').to.not.equal(undefined);
      const info = await layerctlJson<{ RootFS: { Layers: string[] }; Layers: { diffId: string }[] }>(['--root', root, 'inspect', 'dm:latest']);
      expect(info.Layers.map((l) => l.diffId)).to.deep.equal(expectedDiffIds);
      const store = await Store.open(root);
      try {
        for (const [i, diffId] of expectedDiffIds.entries()) compareLayer(await store.layerIndex(diffId), oracles[i]!);
      } finally {
        store.close();
      }
      const fsck = await layerctl(['--root', root, 'fsck']);
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    });
  }

  it('raw layer tars, compressed and not, import to the layer diffID', async () => {
    const root = join(work.dir, 'store-raw');
    const gz = await layerctlJson<{ id: string }[]>(['--root', root, 'import', join(DEBIAN_MULTI, 'blobs', 'sha256', GZIP_BLOBS[3]!), '--name', 'l4gz']);
    const plainBlob = join(variants.uncompressedLayout, 'blobs', 'sha256', expectedDiffIds[3]!.slice(7));
    const plain = await layerctlJson<{ id: string }[]>(['--root', root, 'import', plainBlob, '--name', 'l4plain']);
    for (const ref of ['l4gz', 'l4plain']) {
      const info = await layerctlJson<{ Layers: { diffId: string }[] }>(['--root', root, 'inspect', ref]);
      expect(info.Layers.map((l) => l.diffId)).to.deep.equal([expectedDiffIds[3]]);
    }
    expect(gz[0]!.id).to.not.equal(plain[0]!.id);
    const layers = await layerctlJson<unknown[]>(['--root', root, 'layers']);
    expect(layers).to.have.length(1); // one layer, stored once, with two blobs
  });

  it('shares layers between images and formats: each layer is stored once', async () => {
    const root = join(work.dir, 'store-shared');
    await layerctlJson(['--root', root, 'import', variants.ociLayout]);
    await layerctlJson(['--root', root, 'import', variants.dockerArchive]);
    await layerctlJson(['--root', root, 'import', variants.zstdLayout, '--name', 'dmz']);
    const layers = await layerctlJson<{ diffId: string; blobs: string[]; usedBy: number }[]>(['--root', root, 'layers']);
    expect(layers.map((l) => l.diffId).sort()).to.deep.equal([...expectedDiffIds].sort());
    // gzip, zstd and uncompressed blobs for each layer, one unpacked copy
    for (const l of layers) expect(l.blobs.length, l.diffId).to.equal(3);
    const images = await layerctlJson<{ refs: string[] }[]>(['--root', root, 'images']);
    expect(images.flatMap((i) => i.refs)).to.include.members(['debian-multi:latest', 'corpus/debian-multi:latest', 'dmz:latest']);
  });
});
