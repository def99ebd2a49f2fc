/**
 * The layer writer round-trips real layers: every debian-multi layer written
 * back out as a tar and re-indexed gives the same entries (metadata, link
 * targets, devices, binary xattrs), whiteouts and opaque markers.
 */
import { expect } from 'chai';
import { createReadStream, createWriteStream } from 'node:fs';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { tarLayerSource, type LayerEntry } from '../storage/layerIndex.js';
import { LayerUnpacker } from '../storage/layerUnpack.js';
import { writeLayerTar } from '../storage/layerWriter.js';
import { StoreOperations } from '../storage/operations.js';
import { Store } from '../storage/store.js';
import { DEBIAN_MULTI, execFileAsync, scratch } from './support/env.js';

const strip = (e: LayerEntry): Omit<LayerEntry, 'offset'> => {
  const { offset: _offset, ...rest } = e;
  return rest;
};

describe('layer writer', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let store: Store;
  before(async () => {
    work = await scratch();
    store = await Store.open(join(work.dir, 'store'), { durability: 'none' });
    await new StoreOperations(store).importPath({ path: DEBIAN_MULTI });
  });
  after(async () => {
    store?.close();
    await work?.remove();
  });

  it('writes every debian-multi layer back to a tar with the same index', async () => {
    const layers = await store.imageLayers('debian-multi:latest');
    for (const [i, layer] of layers.entries()) {
      const out = join(work.dir, `rewritten-${i}.tar`);
      await writeLayerTar(tarLayerSource(layer.index, layer.tarPath), createWriteStream(out));
      const unpacker = new LayerUnpacker();
      await pipeline(createReadStream(out), unpacker.writable);
      const { index } = await unpacker.done;
      const sortByPath = (a: { path: string }, b: { path: string }): number => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0);
      const want = layer.index.entries.filter((e) => e.path !== '').map(strip).sort(sortByPath);
      const got = index.entries.map(strip).sort(sortByPath);
      expect(got.length, `layer ${i + 1}`).to.equal(want.length);
      expect(got, `layer ${i + 1}`).to.deep.equal(want);
      expect([...index.whiteouts].sort()).to.deep.equal([...layer.index.whiteouts].sort());
      expect([...index.opaques].sort()).to.deep.equal([...layer.index.opaques].sort());
      // GNU tar reads it too
      await execFileAsync('tar', ['-tf', out], { maxBuffer: 64 * 1024 * 1024 });
    }
  });
});
