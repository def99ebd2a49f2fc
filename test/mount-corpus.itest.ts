/**
 * layerd's merged view of the corpus image debian-multi, tag by tag, against
 * the corpus's oracle listings in expected/ (whiteouts of files and
 * directories, opaque dirs, whiteouts under paths a layer turned into a
 * symlink or file, hard links to lower files, devices, binary xattrs, odd
 * modes and times). The image is imported into a real store and mounted
 * from its layers; the mount is served in this process and listed from a
 * child process.
 */
import assert from 'node:assert/strict';
import { access, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { LayerSource } from '../storage/layerIndex.js';
import { mountUnion, type MountedUnion } from '../mount/mountCommand.js';
import { cleanupEverything, run } from './fixtures/mount/harness.js';
import { Store } from '../storage/store.js';
import { StoreOperations } from '../storage/operations.js';
import { tarLayerSource } from '../storage/layerIndex.js';
import { CORPUS } from './support/env.js';

const TAGS = ['l1-minbase', 'l2-packages', 'l3-whiteouts', 'l4-special'];

describe('mount corpus: layerd shows the intended merged tree', function () {
  this.timeout(600_000);
  let root: string;
  const layers: LayerSource[] = [];

  before(async function () {
    if (!(await access(join(CORPUS, 'oci/debian-multi/index.json')).then(() => true, () => false))) {
      process.stdout.write(`      (no corpus at ${CORPUS}; set LAYERD_CORPUS: skipped)\n`);
      this.skip();
    }
    root = await mkdtemp(join(tmpdir(), 'layerd-mount-corpus-'));
    const store = await Store.open(join(root, 'store'), { durability: 'none' });
    try {
      await new StoreOperations(store).importPath({ path: join(CORPUS, 'oci/debian-multi') });
      for (const layer of await store.imageLayers('debian-multi:l4-special')) layers.push(tarLayerSource(layer.index, layer.tarPath));
    } finally {
      store.close();
    }
  });

  after(async () => {
    if (root === undefined) return;
    await cleanupEverything(root);
    await rm(root, { recursive: true, force: true });
  });

  TAGS.forEach((tag, i) => {
    it(`${tag}: listing equals expected/debian-multi.${tag}.intended.tsv`, async () => {
      const upper = join(root, `upper-${tag}`);
      const mnt = join(root, `mnt-${tag}`);
      await mkdir(upper);
      await mkdir(mnt);
      let mounted: MountedUnion | undefined;
      let listing: string;
      try {
        mounted = await mountUnion({ layers: layers.slice(0, i + 1), upper, mountpoint: mnt, readOnly: true });
        const res = await run('python3', [join(CORPUS, 'tools/listing.py'), mnt], 300_000);
        assert.equal(res.code, 0, res.stderr);
        listing = res.stdout;
      } finally {
        await mounted?.unmount();
      }
      const expected = await readFile(join(CORPUS, `expected/debian-multi.${tag}.intended.tsv`), 'utf8');
      const got = new Set(listing.split('\n'));
      const want = new Set(expected.split('\n'));
      const missing = [...want].filter((l) => !got.has(l));
      const extra = [...got].filter((l) => !want.has(l));
      assert.deepEqual({ missing: missing.slice(0, 15), extra: extra.slice(0, 15) }, { missing: [], extra: [] },
        `${missing.length} expected lines missing, ${extra.length} unexpected`);
    });
  });
});
