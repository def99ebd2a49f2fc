/**
 * Issue 17, "one copy of each file": three images sharing most files take
 * about the bytes of the largest alone when the store keeps layers as
 * skeleton + objects (storage/tarSkeleton.ts):
 *
 *   - debian-multi (four layers, as imported from the corpus);
 *   - the same merged tree built differently: its mount re-tarred by GNU tar
 *     as one PAX layer, in name order, every mtime changed (no layer and no
 *     blob in common with debian-multi, only file contents);
 *   - a commit of debian-multi that changes one file.
 *
 * Measured against debian-multi alone in a store of `layer.tar` layers.
 * "Layer data" is what the layers themselves take: layer.tar, or skeleton +
 * inline + objects; the compressed blobs kept so a push sends the exact
 * originals are counted apart (docs/storage.md says why). Also: fsck
 * rebuilds every layer's tar and hashes it to its diffID.
 */
import { strict as assert } from 'node:assert';
import { lstat, mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { mountUnion, type MountedUnion } from '../mount/mountCommand.js';
import { clearMountsUnder } from '../mount/deadMount.js';
import { commitLayer } from '../storage/commit.js';
import { fsck } from '../storage/fsck.js';
import { importRawLayer } from '../storage/importer.js';
import { tarLayerSource } from '../storage/layerIndex.js';
import { StoreOperations } from '../storage/operations.js';
import { Store } from '../storage/store.js';
import { diskUsage } from '../storage/usage.js';
import { DEBIAN_MULTI, execFileAsync, scratch } from './support/env.js';
import { writeTar } from './support/tarBuilder.js';

/** Apparent bytes and allocated bytes (st_blocks) of every regular file beneath `dir`. */
async function bytesUnder(dir: string): Promise<{ bytes: number; allocated: number; files: number }> {
  const out = { bytes: 0, allocated: 0, files: 0 };
  const walk = async (d: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true }).catch(() => [])) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile()) {
        const st = await lstat(p);
        out.bytes += st.size;
        out.allocated += st.blocks * 512;
        out.files++;
      }
    }
  };
  await walk(dir);
  return out;
}

interface Usage { layerData: number; layerDataAllocated: number; blobs: number; total: number; objects: number }

async function usageOf(root: string): Promise<Usage> {
  const layers = await bytesUnder(join(root, 'layers'));
  const objects = await bytesUnder(join(root, 'objects', 'sha256'));
  const blobs = await bytesUnder(join(root, 'blobs'));
  return {
    layerData: layers.bytes + objects.bytes,
    layerDataAllocated: layers.allocated + objects.allocated,
    blobs: blobs.bytes,
    total: layers.bytes + objects.bytes + blobs.bytes,
    objects: objects.files,
  };
}

const MB = (n: number): string => `${(n / 1e6).toFixed(1)} MB`;

describe('one copy of each file: three images sharing most files', function () {
  this.timeout(900_000);
  let work: { dir: string; remove(): Promise<void> };

  before(async () => { work = await scratch('layerd-one-copy-'); });
  after(async () => {
    await clearMountsUnder(work.dir);
    await work.remove();
  });

  it('take at most 1.1× the layer data of the largest alone, and fsck rebuilds every diffID', async () => {
    // The baseline: debian-multi alone, layers kept as layer.tar.
    const baselineRoot = join(work.dir, 'baseline');
    const baseline = await Store.open(baselineRoot, { durability: 'none', layerFormat: 'tar', diskReserveBytes: 0 });
    try {
      await new StoreOperations(baseline).importPath({ path: DEBIAN_MULTI });
    } finally {
      baseline.close();
    }

    const root = join(work.dir, 'skeleton');
    const store = await Store.open(root, { durability: 'none', layerFormat: 'skeleton', diskReserveBytes: 0 });
    try {
      await new StoreOperations(store).importPath({ path: DEBIAN_MULTI });

      // The same tree built differently: mounted, re-tarred by GNU tar.
      const mnt = join(work.dir, 'mnt');
      const upper = join(work.dir, 'upper');
      await mkdir(mnt);
      await mkdir(upper);
      const rebuilt = join(work.dir, 'rebuilt.tar.gz');
      let mounted: MountedUnion | undefined;
      try {
        const layers = (await store.imageLayers('debian-multi:latest')).map((l) => tarLayerSource(l.index, l.tarPath));
        mounted = await mountUnion({ layers, upper, mountpoint: mnt, readOnly: true });
        await execFileAsync('sh', ['-c', `tar -C '${mnt}' --sort=name --format=posix --xattrs --numeric-owner --mtime=@1600000000 -cf - . | gzip -1 > '${rebuilt}'`], { maxBuffer: 1 << 20 });
      } finally {
        await mounted?.unmount();
      }
      await importRawLayer(store, rebuilt, 'rebuilt');

      // A commit of debian-multi changing one file.
      const change = join(work.dir, 'change.tar');
      await writeTar(change, [{ header: { name: 'etc/motd' }, content: 'changed by a commit\n' }]);
      await commitLayer(store, 'debian-multi:latest', change, { ref: { name: 'debian-multi', tag: 'changed' }, createdBy: 'test: one file changed' });

      const report = await fsck(store);
      assert.deepEqual(report.problems, []);
      assert.equal(report.checked.layers, 6, 'four corpus layers, the rebuilt one, the commit');
      // df says the same: six skeletons, and what one copy per file saves (107 MB when written).
      const df = await diskUsage(store);
      assert.equal(df.layers.skeletons, 6);
      assert.equal(df.objects.count, (await bytesUnder(join(root, 'objects', 'sha256'))).files);
      assert.ok(df.objects.savedByDedup > 50e6, `saved by one copy per file: ${df.objects.savedByDedup}`);
      assert.ok(df.layers.bytes < 0.1 * df.layers.tarBytes, 'skeletons and inline bytes are a small part of the tars');
    } finally {
      store.close();
    }

    const alone = await usageOf(baselineRoot);
    const three = await usageOf(root);
    const ratio = three.layerData / alone.layerData;
    process.stdout.write(`      debian-multi alone (layer.tar): layer data ${MB(alone.layerData)} (allocated ${MB(alone.layerDataAllocated)}), blobs ${MB(alone.blobs)}, total ${MB(alone.total)}\n`
      + `      three images (skeleton + ${three.objects} objects): layer data ${MB(three.layerData)} (allocated ${MB(three.layerDataAllocated)}), blobs ${MB(three.blobs)}, total ${MB(three.total)}\n`
      + `      layer data ${ratio.toFixed(3)}×, allocated ${(three.layerDataAllocated / alone.layerDataAllocated).toFixed(3)}×, with the blobs ${(three.total / alone.total).toFixed(3)}×\n`);
    await writeFile(join(work.dir, 'usage.json'), JSON.stringify({ alone, three }));
    assert.ok(ratio <= 1.1, `three images take ${ratio.toFixed(3)}× the layer data of debian-multi alone`);
  });
});
