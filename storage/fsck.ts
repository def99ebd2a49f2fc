/**
 * `fsck`: re-verify everything the store claims. Every blob is re-hashed;
 * every layer's `layer.tar` (or the tar its skeleton and objects rebuild) is
 * re-hashed against its diffID (and a stored
 * blob of it must decompress to the same), and its index must point inside
 * it; every image's records must point at present content; files no record
 * refers to are reported as orphans; every file object must hash to its name.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { type Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { LayerdError } from '../common/errors.js';
import { processAlive } from '../common/process.js';
import { createDecompressor, readHead, sniffCompression } from './compression.js';
import { type Digest, DigestingStream } from './digest.js';
import { readLazyInfo } from './lazy/lazyLayer.js';
import { hashObject, listObjects, stagingDirs, stagingRelPath } from './objectStore.js';
import { type Store } from './store.js';
import { openLayerTar } from './layerTar.js';
import { INLINE_FILE } from './tarSkeleton.js';

export interface FsckProblem {
  kind: 'blob' | 'layer' | 'image' | 'object' | 'orphan';
  id: string;
  message: string;
}

export interface FsckReport {
  ok: boolean;
  checked: { blobs: number; layers: number; files: number; images: number; objects: number };
  problems: FsckProblem[];
}

export async function fsck(store: Store): Promise<FsckReport> {
  const problems: FsckProblem[] = [];
  const checked = { blobs: 0, layers: 0, files: 0, images: 0, objects: 0 };

  for (const row of store.db.listBlobs()) {
    checked.blobs++;
    const path = store.layout.blobPath(row.digest);
    try {
      const { digest, size } = await hashFile(path);
      if (size !== row.size) problems.push({ kind: 'blob', id: row.digest, message: `size ${size}, expected ${row.size}` });
      else if (digest !== row.digest) problems.push({ kind: 'blob', id: row.digest, message: `content hashes to ${digest}` });
    } catch (err) {
      problems.push({ kind: 'blob', id: row.digest, message: `unreadable: ${(err as Error).message}` });
    }
  }

  const blobOfLayer = new Map<Digest, Digest>();
  for (const image of store.db.listImages()) {
    checked.images++;
    for (const d of [image.id, image.config_digest, ...(image.index_digest ? [image.index_digest] : [])]) {
      if (!store.db.getBlob(d)) problems.push({ kind: 'image', id: image.id, message: `refers to missing blob ${d}` });
    }
    for (const l of store.db.imageLayers(image.id)) {
      if (!store.db.getLayer(l.diff_id)) problems.push({ kind: 'image', id: image.id, message: `refers to missing layer ${l.diff_id}` });
      if (l.blob_digest && store.db.getBlob(l.blob_digest)) blobOfLayer.set(l.diff_id, l.blob_digest);
    }
  }

  for (const row of store.db.listLayers()) {
    checked.layers++;
    const lazy = store.db.getLazyLayer(row.diff_id);
    if (lazy) {
      // Not complete yet: no tar to hash. Its index and description must be readable, and it must not be broken.
      try {
        await store.layerIndex(row.diff_id);
        await readLazyInfo(store.layout.lazyLayerDir(row.diff_id));
        if (lazy.state === 'broken') problems.push({ kind: 'layer', id: row.diff_id, message: `lazily pulled layer is broken: ${lazy.error ?? 'unknown'}` });
      } catch (err) {
        problems.push({ kind: 'layer', id: row.diff_id, message: err instanceof LayerdError ? err.message : String(err) });
      }
      continue;
    }
    try {
      const index = await store.layerIndex(row.diff_id);
      // The layer's tar IS what the diffID names: re-hash it (a skeleton layer's
      // as its skeleton and objects rebuild it, bit for bit).
      const skeleton = index.storage === 'skeleton';
      const what = skeleton ? 'the tar rebuilt from its skeleton' : 'layer.tar';
      const tar = await hashStream(openLayerTar(store, row.diff_id, index));
      if (tar.digest !== row.diff_id) problems.push({ kind: 'layer', id: row.diff_id, message: `${what} hashes to ${tar.digest}` });
      if (tar.size !== row.size) problems.push({ kind: 'layer', id: row.diff_id, message: `${what} is ${tar.size} bytes, expected ${row.size}` });
      const inlineSize = skeleton ? (await stat(join(store.layout.layerDir(row.diff_id), INLINE_FILE))).size : 0;
      for (const entry of index.entries) {
        if (entry.kind !== 'file' || entry.size === 0) continue;
        checked.files++;
        if (skeleton && entry.digest !== undefined) continue; // its object is hashed below, and was read into the tar above
        const limit = skeleton ? inlineSize : tar.size;
        if (entry.offset === undefined || entry.offset + entry.size > limit) {
          problems.push({ kind: 'layer', id: row.diff_id, message: `index entry /${entry.path} points outside ${skeleton ? 'the layer\'s inline file' : 'layer.tar'}` });
        }
      }
      const blob = blobOfLayer.get(row.diff_id);
      if (blob) {
        const diff = await diffIdOfBlob(store.layout.blobPath(blob));
        if (diff !== row.diff_id) problems.push({ kind: 'layer', id: row.diff_id, message: `blob ${blob} decompresses to ${diff}` });
      }
    } catch (err) {
      problems.push({ kind: 'layer', id: row.diff_id, message: err instanceof LayerdError ? err.message : String(err) });
    }
  }

  for (const hex of await readdir(store.layout.blobsDir)) {
    if (!store.db.getBlob(`sha256:${hex}`)) problems.push({ kind: 'orphan', id: join('blobs/sha256', hex), message: 'file with no record' });
  }
  for (const hex of await readdir(store.layout.layersDir)) {
    if (!store.db.getLayer(`sha256:${hex}`)) problems.push({ kind: 'orphan', id: join('layers/sha256', hex), message: 'directory with no record' });
  }
  for (const hex of await readdir(store.layout.lazyDir).catch(() => [] as string[])) {
    if (!store.db.getLazyLayer(`sha256:${hex}`)) problems.push({ kind: 'orphan', id: join('lazy/sha256', hex), message: 'lazy layer directory with no record' });
  }
  for (const name of await readdir(store.layout.tmpDir)) {
    const st = await stat(join(store.layout.tmpDir, name)).catch(() => undefined);
    if (st && !name.startsWith(`${process.pid}-`)) problems.push({ kind: 'orphan', id: join('tmp', name), message: 'ingest directory (an import is running, or one was interrupted)' });
  }
  // File objects (storage/objectStore.ts): each must hash to its name. One no layer names is
  // no problem (GC removes it); a staging directory of a process that is gone is an orphan.
  for (const digest of listObjects(store.layout.root)) {
    checked.objects++;
    try {
      const got = await hashObject(store.layout.root, digest);
      if (got !== digest) problems.push({ kind: 'object', id: digest, message: `object content hashes to ${got}` });
    } catch (err) {
      problems.push({ kind: 'object', id: digest, message: `unreadable: ${(err as Error).message}` });
    }
  }
  for (const { name, pid } of stagingDirs(store.layout.root)) {
    if (pid !== process.pid && !(Number.isInteger(pid) && pid > 0 && processAlive(pid))) {
      problems.push({ kind: 'orphan', id: stagingRelPath(name), message: 'object staging directory of a process that is gone' });
    }
  }
  return { ok: problems.length === 0, checked, problems };
}

async function hashFile(path: string): Promise<{ digest: Digest; size: number }> {
  return hashStream(createReadStream(path, { highWaterMark: 1024 * 1024 }));
}

async function hashStream(stream: Readable): Promise<{ digest: Digest; size: number }> {
  const hash = createHash('sha256');
  let size = 0;
  await pipeline(stream, new Writable({
    write(chunk: Buffer, _enc, cb) { hash.update(chunk); size += chunk.length; cb(); },
  }));
  return { digest: `sha256:${hash.digest('hex')}`, size };
}

async function diffIdOfBlob(path: string): Promise<Digest> {
  const head = await readHead(path);
  const hasher = new DigestingStream();
  await pipeline(createReadStream(path, { highWaterMark: 1024 * 1024 }), createDecompressor(sniffCompression(head)), hasher, new Writable({ write(_c, _e, cb) { cb(); } }));
  return hasher.result().digest;
}
