/**
 * Layers kept as tar skeleton + objects (storage/tarSkeleton.ts,
 * storage/tarSplit.ts): every corpus layer and hand-made odd and hostile
 * tars come back bit for bit (the diffID), a tar the two parsers would read
 * differently is refused, identical files are one object, and fsck, GC and
 * the mount's content references work on them.
 */
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { closeSync as closeFd, readFileSync, readSync } from 'node:fs';
import { readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gunzipSync, gzipSync } from 'node:zlib';
import { LayerdError } from '../common/errors.js';
import { fsck } from '../storage/fsck.js';
import { removeImage } from '../storage/gc.js';
import { importFromSource, importRawLayer } from '../storage/importer.js';
import { type Digest } from '../storage/digest.js';
import { openContent } from '../storage/layerIndex.js';
import { openLayerTar } from '../storage/layerTar.js';
import { listObjects, objectRelPath, storeLayerSource } from '../storage/objectStore.js';
import { detectSource } from '../storage/sources/detect.js';
import { Store } from '../storage/store.js';
import { INLINE_MAX_SIZE } from '../storage/tarSkeleton.js';
import { DEBIAN_MULTI, scratch } from './support/env.js';
import { end, header, member, padded, paxRecord } from './support/rawTar.js';

async function bytesOf(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

const sha256 = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

describe('layers kept as tar skeleton + objects', function () {
  this.timeout(300_000);
  let dir: string;
  let remove: () => Promise<void>;
  let n = 0;

  before(async () => ({ dir, remove } = await scratch('layerd-skeleton-')));
  after(async () => remove());

  async function open(format: 'tar' | 'skeleton'): Promise<Store> {
    return Store.open(join(dir, `store-${n++}`), { durability: 'none', layerFormat: format, diskReserveBytes: 0 });
  }

  /** Import `tar` (gzipped) as a raw layer into a fresh store of `format`; the error code, or the layer. */
  async function importTar(format: 'tar' | 'skeleton', tar: Buffer): Promise<{ store: Store; diffId: Digest } | { code: string }> {
    const path = join(dir, `layer-${n++}.tar.gz`);
    await writeFile(path, gzipSync(tar));
    const store = await open(format);
    try {
      await importRawLayer(store, path, 'odd');
    } catch (err) {
      store.close();
      if (err instanceof LayerdError) return { code: err.code };
      throw err;
    }
    return { store, diffId: store.db.imageLayers(store.resolveImage('odd').id)[0]!.diff_id };
  }

  /** Both formats agree on `tar`; when it is taken, the skeleton layer rebuilds it bit for bit and fsck passes. */
  async function roundTrip(tar: Buffer): Promise<string> {
    const plain = await importTar('tar', tar);
    const split = await importTar('skeleton', tar);
    try {
      if ('code' in plain || 'code' in split) {
        assert.deepEqual('code' in split ? split.code : 'imported', 'code' in plain ? plain.code : 'imported');
        return 'code' in plain ? plain.code : 'imported';
      }
      const index = await split.store.layerIndex(split.diffId);
      assert.equal(index.storage, 'skeleton');
      const rebuilt = await bytesOf(openLayerTar(split.store, split.diffId, index));
      assert.equal(sha256(rebuilt), split.diffId);
      assert.ok(rebuilt.equals(tar), 'the rebuilt tar is the imported one');
      const report = await fsck(split.store);
      assert.deepEqual(report.problems, []);
      // Every file reads back through the layer source the mount uses.
      const plainIndex = await plain.store.layerIndex(plain.diffId);
      const source = storeLayerSource(index, split.store.layout.layerTarPath(split.diffId));
      const tarSource = storeLayerSource(plainIndex, plain.store.layout.layerTarPath(plain.diffId));
      for (const entry of index.entries) {
        const a = readContent(source.content(entry));
        const b = readContent(tarSource.content(plainIndex.entries.find((e) => e.path === entry.path)!));
        assert.ok(a.equals(b), `/${entry.path} reads the same`);
      }
      return 'imported';
    } finally {
      if (!('code' in plain)) plain.store.close();
      if (!('code' in split)) split.store.close();
    }
  }

  it('rebuilds every corpus layer bit for bit, with each distinct file once', async () => {
    const store = await open('skeleton');
    try {
      const detected = await detectSource(DEBIAN_MULTI, {});
      if (detected.kind !== 'image') throw new Error('not an image');
      await importFromSource(store, detected.source, {});
      const digests = new Set<string>();
      for (const row of store.db.listLayers()) {
        const index = await store.layerIndex(row.diff_id);
        assert.equal(index.storage, 'skeleton');
        await assert.rejects(readFile(store.layout.layerTarPath(row.diff_id)), /ENOENT/, 'no layer.tar is kept');
        const tar = await bytesOf(openLayerTar(store, row.diff_id, index));
        assert.equal(sha256(tar), row.diff_id);
        assert.equal(tar.length, row.size);
        for (const e of index.entries) {
          if (e.kind !== 'file' || e.size === 0) continue;
          if (e.size >= INLINE_MAX_SIZE) assert.ok(e.digest, `/${e.path} is an object`);
          else assert.equal(e.digest, undefined, `/${e.path} is inline`);
          if (e.digest) digests.add(e.digest);
        }
      }
      assert.deepEqual(new Set(listObjects(store.layout.root)), digests, 'one object per distinct file, no other');
      // The original blobs are kept: a push sends them as they are.
      const blobs = await readdir(store.layout.blobsDir);
      for (const row of store.db.listLayers()) {
        const blob = store.db.listImages().flatMap((i) => store.db.imageLayers(i.id)).find((l) => l.diff_id === row.diff_id)!.blob_digest!;
        assert.ok(blobs.includes(blob.slice(7)));
        assert.equal(sha256(gunzipSync(readFileSync(store.layout.blobPath(blob)))), row.diff_id);
      }
      assert.deepEqual((await fsck(store)).problems, []);
    } finally {
      store.close();
    }
  });

  it('rebuilds odd but valid tars bit for bit: PAX sizes, base-256 sizes, long names, links, trailing blocks', async () => {
    const big = Buffer.alloc(1024 * 1024 + 3, 7); // streamed to its object while it is hashed
    const mid = Buffer.alloc(8192, 9);
    const small = Buffer.from('small file\n');
    const cases: Record<string, Buffer> = {
      'sizes around the inline threshold and 512': Buffer.concat([
        member({ name: 'a', type: '0' }, Buffer.alloc(INLINE_MAX_SIZE - 1, 1)),
        member({ name: 'b', type: '0' }, Buffer.alloc(INLINE_MAX_SIZE, 2)),
        member({ name: 'c', type: '0' }, Buffer.alloc(512, 3)),
        member({ name: 'empty', type: '0' }),
        member({ name: 'big', type: '0' }, big),
        end(),
      ]),
      'a PAX size record overriding the header': Buffer.concat([
        member({ name: 'PaxHeaders/p', type: 'x' }, Buffer.concat([paxRecord('size', String(mid.length)), paxRecord('mtime', '1700000000.5')])),
        header({ name: 'p', type: '0', sizeField: 0 }), padded(mid),
        end(),
      ]),
      'a base-256 size, a contiguous file, a global PAX header': Buffer.concat([
        member({ name: 'pax_global_header', type: 'g' }, paxRecord('comment', 'made by hand')),
        header({ name: 'b256', type: '0', size: mid.length, base256Size: true }), padded(mid),
        member({ name: 'cont', type: '7' }, small),
        end(),
      ]),
      'GNU long names, hard links, the same bytes under three names': Buffer.concat([
        member({ name: '././@LongLink', type: 'L' }, Buffer.from(`${'d'.repeat(150)}/file\0`)),
        member({ name: 'd'.repeat(99), type: '0' }, mid),
        member({ name: 'copy', type: '0' }, mid),
        member({ name: 'link', type: '1', linkname: 'copy' }),
        member({ name: 'dir/', type: '5', mode: 0o755 }),
        member({ name: 'old-style-dir/', type: '0', mode: 0o755 }),
        member({ name: 'sym', type: '2', linkname: 'copy' }),
        member({ name: 'third', type: '0' }, mid),
        end(),
      ]),
      'blocking-factor zeros after the end': Buffer.concat([member({ name: 'f', type: '0' }, small), end(18)]),
    };
    for (const [name, tar] of Object.entries(cases)) {
      assert.equal(await roundTrip(tar), 'imported', name);
    }
  });

  it('refuses what the tar format refuses, the same way', async () => {
    const small = Buffer.from('x'.repeat(5000));
    const cases: Record<string, Buffer> = {
      'a bad header checksum': Buffer.concat([member({ name: 'f', type: '0', badChecksum: true }, small), end()]),
      'a tar cut inside a file': Buffer.concat([header({ name: 'f', type: '0', size: 100_000 }), small]),
      'no end-of-archive marker': member({ name: 'f', type: '0' }, small),
      'a PAX size larger than the archive': Buffer.concat([
        member({ name: 'PaxHeaders/p', type: 'x' }, paxRecord('size', '999999')),
        header({ name: 'p', type: '0', sizeField: 10 }), padded(small), end(),
      ]),
      'a path escaping the layer': Buffer.concat([member({ name: '../evil', type: '0' }, small), end()]),
    };
    for (const [name, tar] of Object.entries(cases)) {
      assert.notEqual(await roundTrip(tar), 'imported', name);
    }
  });

  it('fsck finds a skeleton layer whose inline bytes changed or whose object is gone', async () => {
    const big = Buffer.alloc(20_000, 8);
    const store = await open('skeleton');
    try {
      const path = join(dir, `fsck-${n++}.tar.gz`);
      await writeFile(path, gzipSync(Buffer.concat([member({ name: 'small', type: '0' }, Buffer.from('tiny\n')), member({ name: 'big', type: '0' }, big), end()])));
      await importRawLayer(store, path, 'f');
      const diffId = store.db.imageLayers(store.resolveImage('f').id)[0]!.diff_id;
      assert.deepEqual((await fsck(store)).problems, []);
      const inline = join(store.layout.layerDir(diffId), 'inline');
      await writeFile(inline, 'TINY\n');
      const changed = await fsck(store);
      assert.ok(changed.problems.some((p) => p.kind === 'layer' && p.id === diffId && /rebuilt from its skeleton hashes to/.test(p.message)), JSON.stringify(changed.problems));
      await writeFile(inline, 'tiny\n');
      assert.deepEqual((await fsck(store)).problems, []);
      await rm(join(store.layout.root, objectRelPath(sha256(big))!));
      const gone = await fsck(store);
      assert.ok(gone.problems.some((p) => p.kind === 'layer' && p.id === diffId && /missing or unreadable/.test(p.message)), JSON.stringify(gone.problems));
    } finally {
      store.close();
    }
  });

  it('GC removes the objects no layer names once their last image goes, and keeps shared ones', async () => {
    const shared = Buffer.alloc(10_000, 5);
    const only = Buffer.alloc(10_000, 6);
    const store = await open('skeleton');
    try {
      const a = join(dir, `gc-a-${n++}.tar.gz`);
      const b = join(dir, `gc-b-${n++}.tar.gz`);
      await writeFile(a, gzipSync(Buffer.concat([member({ name: 'shared', type: '0' }, shared), member({ name: 'only', type: '0' }, only), end()])));
      await writeFile(b, gzipSync(Buffer.concat([member({ name: 'again', type: '0' }, shared), end()])));
      await importRawLayer(store, a, 'a');
      await importRawLayer(store, b, 'b');
      assert.deepEqual(new Set(listObjects(store.layout.root)), new Set([sha256(shared), sha256(only)]));
      const gc = await removeImage(store, 'a:latest');
      assert.equal(gc.gc.objects, 1);
      assert.deepEqual(listObjects(store.layout.root), [sha256(shared)]);
      assert.deepEqual((await fsck(store)).problems, []);
    } finally {
      store.close();
    }
  });
});

function readContent(content: ReturnType<ReturnType<typeof storeLayerSource>['content']>): Buffer {
  if (content === undefined) return Buffer.alloc(0);
  const fd = openContent(content);
  try {
    const out = Buffer.alloc(content.size);
    let done = 0;
    while (done < content.size) {
      const got = readSyncAt(fd, out, done, content.offset + done);
      if (got === 0) break;
      done += got;
    }
    return out.subarray(0, done);
  } finally {
    closeFd(fd);
  }
}

function readSyncAt(fd: number, buffer: Buffer, at: number, position: number): number {
  return readSync(fd, buffer, at, buffer.length - at, position);
}
