/**
 * A large synthetic image for the mount benchmark, generated
 * deterministically as real (uncompressed) layer tars in an OCI layout,
 * imported into a scratch layerd store, and laid out as overlayfs lower
 * directories from the very same tars. Built once and cached under
 * $LAYERD_BENCH_CACHE (default /var/tmp/layerd-bench-synthetic)/v<VERSION>;
 * a run that finds the cache complete reuses it. Bump SYNTHETIC_VERSION
 * whenever the content below changes.
 *
 * The layers, bottom → top:
 *  1. base: data/d000…d239 × f000…f249 (60,000 files, 0–4 KiB),
 *     rename/src (1,000 files: the lower directory the rename workload
 *     moves), opaque/ (1,000 files + opaque/sub with 100), gone/g0…g9 (50 each).
 *  2. update: overrides data/dNNN/f000…f019 (4,800 files), whiteouts of
 *     data/dNNN/f240…f249 (2,400 `.wh.` files), whole-directory whiteouts
 *     gone/.wh.g0…g4, new/n00…n19 × 250 new files.
 *  3. patch: opaque/.wh..wh..opq with 100 new files (hides the 1,100 below),
 *     overrides data/dNNN/f000…f004 again (1,200), re-creates data/dNNN/f240
 *     (whited out in layer 2), whiteout of the layer-2 directory new/n19.
 *  4. big: big/blob.bin, 1 GiB of AES-CTR keystream (incompressible, fixed key).
 * Merged: 63,941 regular files (checked against kernel overlayfs at build).
 *
 *   node dist/bench/synthetic.js     (root; builds or verifies the cache and prints its summary)
 */
import { execFile } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { once } from 'node:events';
import { createWriteStream } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Transform, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import tarStream, { type Headers, type Pack } from 'tar-stream';
import { StoreOperations } from '../storage/operations.js';
import { Store } from '../storage/store.js';
import { overlayLower } from '../test/support/overlayLower.js';

const run = promisify(execFile);

export const SYNTHETIC_VERSION = 1;
export const SYNTHETIC_IMAGE = 'synthetic:latest';
/** Image paths the workloads use. */
export const SYNTHETIC_PATHS = {
  bigFile: 'big/blob.bin',
  bigBytes: 1024 * 1024 * 1024,
  /** A lower directory of exactly 1,000 files. */
  renameDir: 'rename/src',
  renameEntries: 1000,
  /** ~5,000 lower files: data/d000…d020 (241 files each). */
  rmPaths: Array.from({ length: 21 }, (_, d) => `data/d${pad(d, 3)}`),
  copyUpRoot: 'data',
} as const;

const DATA_DIRS = 240;
const DATA_FILES = 250;
const MTIME = new Date(1_700_000_000_000);

export interface SyntheticDataset {
  /** The store root holding SYNTHETIC_IMAGE. */
  root: string;
  image: string;
  /** Store layer directories (layers/sha256/<hex>), bottom → top. */
  layerDirs: string[];
  /** overlayfs lower directories of the same layers, bottom → top. */
  lowers: string[];
  /** Counted on a kernel overlayfs mount of the lowers at build time. */
  mergedFiles: number;
  mergedDirs: number;
  layerEntries: number[];
  layerBytes: number[];
}

function pad(n: number, width: number): string {
  return String(n).padStart(width, '0');
}

/** Deterministic sizes: a small xorshift generator per layer. */
function sizes(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x % 4097;
  };
}

/** A file's content: its layer tag and path, repeated up to `size` bytes. */
function content(tag: string, path: string, size: number): Buffer {
  const line = Buffer.from(`${tag} ${path}\n`);
  const out = Buffer.alloc(size);
  for (let o = 0; o < size; o += line.length) line.copy(out, o);
  return out;
}

/** Adds entries to one layer tar, in order, parents first. */
class LayerWriter {
  entries = 0;
  private readonly dirs = new Set<string>();
  constructor(private readonly pack: Pack, private readonly tag: string, private readonly nextSize: () => number) {}

  private add(header: Headers, body?: Buffer): Promise<void> {
    this.entries++;
    const full: Headers = { mode: 0o644, uid: 0, gid: 0, mtime: MTIME, type: 'file', ...header };
    return new Promise((done, fail) => {
      const cb = (err?: Error | null): void => (err ? fail(err) : done());
      if (body === undefined) this.pack.entry(full, cb);
      else this.pack.entry(full, body, cb);
    });
  }

  async dir(path: string): Promise<void> {
    if (this.dirs.has(path)) return;
    const parent = dirname(path);
    if (parent !== '.') await this.dir(parent);
    this.dirs.add(path);
    await this.add({ name: `${path}/`, type: 'directory', mode: 0o755 });
  }

  async file(path: string): Promise<void> {
    await this.dir(dirname(path));
    await this.add({ name: path }, content(this.tag, path, this.nextSize()));
  }

  /** `.wh.<name>` next to `path`, or `.wh..wh..opq` in `path` with opaque. */
  async whiteout(path: string, opaque = false): Promise<void> {
    const name = opaque ? `${path}/.wh..wh..opq` : `${dirname(path)}/.wh.${path.slice(path.lastIndexOf('/') + 1)}`;
    await this.dir(opaque ? path : dirname(path));
    await this.add({ name }, Buffer.alloc(0));
  }

  /** A file streamed from `chunks` (for the 1 GiB one). */
  async bigFile(path: string, size: number, chunks: Iterable<Buffer>): Promise<void> {
    await this.dir(dirname(path));
    this.entries++;
    let entry: Writable | undefined;
    const finished = new Promise<void>((done, fail) => {
      entry = this.pack.entry({ name: path, size, mode: 0o644, uid: 0, gid: 0, mtime: MTIME, type: 'file' }, (err) => (err ? fail(err) : done()));
    });
    for (const chunk of chunks) {
      if (!entry!.write(chunk)) await once(entry!, 'drain');
    }
    entry!.end();
    await finished;
  }
}

function* keystream(bytes: number): Generator<Buffer> {
  const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, 7), Buffer.alloc(16, 0));
  const zeros = Buffer.alloc(1024 * 1024);
  for (let left = bytes; left > 0; left -= zeros.length) yield cipher.update(left >= zeros.length ? zeros : zeros.subarray(0, left));
}

const LAYERS: { tag: string; fill(w: LayerWriter): Promise<void> }[] = [
  {
    tag: 'base',
    async fill(w) {
      for (let d = 0; d < DATA_DIRS; d++) for (let f = 0; f < DATA_FILES; f++) await w.file(`data/d${pad(d, 3)}/f${pad(f, 3)}`);
      for (let e = 0; e < SYNTHETIC_PATHS.renameEntries; e++) await w.file(`${SYNTHETIC_PATHS.renameDir}/e${pad(e, 3)}`);
      for (let o = 0; o < 1000; o++) await w.file(`opaque/o${pad(o, 3)}`);
      for (let o = 0; o < 100; o++) await w.file(`opaque/sub/s${pad(o, 3)}`);
      for (let g = 0; g < 10; g++) for (let f = 0; f < 50; f++) await w.file(`gone/g${g}/f${pad(f, 2)}`);
    },
  },
  {
    tag: 'update',
    async fill(w) {
      for (let d = 0; d < DATA_DIRS; d++) {
        for (let f = 0; f < 20; f++) await w.file(`data/d${pad(d, 3)}/f${pad(f, 3)}`);
        for (let f = 240; f < DATA_FILES; f++) await w.whiteout(`data/d${pad(d, 3)}/f${pad(f, 3)}`);
      }
      for (let g = 0; g < 5; g++) await w.whiteout(`gone/g${g}`);
      for (let n = 0; n < 20; n++) for (let f = 0; f < 250; f++) await w.file(`new/n${pad(n, 2)}/x${pad(f, 3)}`);
    },
  },
  {
    tag: 'patch',
    async fill(w) {
      await w.whiteout('opaque', true);
      for (let p = 0; p < 100; p++) await w.file(`opaque/p${pad(p, 3)}`);
      for (let d = 0; d < DATA_DIRS; d++) {
        for (let f = 0; f < 5; f++) await w.file(`data/d${pad(d, 3)}/f${pad(f, 3)}`);
        await w.file(`data/d${pad(d, 3)}/f240`);
      }
      await w.whiteout('new/n19');
    },
  },
  {
    tag: 'big',
    async fill(w) { await w.bigFile(SYNTHETIC_PATHS.bigFile, SYNTHETIC_PATHS.bigBytes, keystream(SYNTHETIC_PATHS.bigBytes)); },
  },
];

/** Write one layer tar into `blobs`; returns its digest (= diffID: uncompressed) and size. */
async function writeLayer(blobs: string, layer: (typeof LAYERS)[number], seed: number): Promise<{ hex: string; size: number; entries: number }> {
  const tmp = join(blobs, `.tmp-${layer.tag}`);
  const hash = createHash('sha256');
  let size = 0;
  const tee = new Transform({ transform(chunk: Buffer, _enc, cb) { hash.update(chunk); size += chunk.length; cb(null, chunk); } });
  const pack = tarStream.pack();
  const done = pipeline(pack, tee, createWriteStream(tmp));
  const writer = new LayerWriter(pack, layer.tag, sizes(seed));
  await layer.fill(writer);
  pack.finalize();
  await done;
  const hex = hash.digest('hex');
  await rename(tmp, join(blobs, hex));
  return { hex, size, entries: writer.entries };
}

async function writeLayout(dir: string): Promise<{ entries: number[]; bytes: number[] }> {
  const blobs = join(dir, 'blobs', 'sha256');
  await mkdir(blobs, { recursive: true });
  const layers: { hex: string; size: number; entries: number }[] = [];
  for (const [i, layer] of LAYERS.entries()) layers.push(await writeLayer(blobs, layer, 0x9e3779b9 + i));
  const put = async (doc: object): Promise<{ digest: string; size: number }> => {
    const bytes = Buffer.from(JSON.stringify(doc));
    const hex = createHash('sha256').update(bytes).digest('hex');
    await writeFile(join(blobs, hex), bytes);
    return { digest: `sha256:${hex}`, size: bytes.length };
  };
  const config = await put({
    architecture: 'amd64', os: 'linux', created: MTIME.toISOString(),
    rootfs: { type: 'layers', diff_ids: layers.map((l) => `sha256:${l.hex}`) },
    config: { Env: ['PATH=/bin'] }, history: LAYERS.map((l) => ({ created: MTIME.toISOString(), created_by: `bench/synthetic.ts ${l.tag}` })),
  });
  const manifest = await put({
    schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json',
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
    layers: layers.map((l) => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: `sha256:${l.hex}`, size: l.size })),
  });
  await writeFile(join(dir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
  await writeFile(join(dir, 'index.json'), JSON.stringify({
    schemaVersion: 2,
    manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', ...manifest, annotations: { 'org.opencontainers.image.ref.name': 'latest' } }],
  }));
  return { entries: layers.map((l) => l.entries), bytes: layers.map((l) => l.size) };
}

/** Count regular files and directories of the merged view on a read-only kernel overlayfs. */
async function countMerged(lowers: string[], mnt: string): Promise<{ files: number; dirs: number }> {
  await mkdir(mnt, { recursive: true });
  await run('mount', ['-t', 'overlay', 'overlay', '-o', `ro,lowerdir=${[...lowers].reverse().join(':')}`, mnt]);
  try {
    const count = async (type: string): Promise<number> =>
      Number((await run('sh', ['-c', `find "$0" -type ${type} | wc -l`, mnt])).stdout.trim());
    return { files: await count('f'), dirs: await count('d') };
  } finally {
    await run('umount', [mnt]);
    await rm(mnt, { recursive: true });
  }
}

async function build(dir: string): Promise<SyntheticDataset> {
  const t0 = Date.now();
  const log = (msg: string): void => { process.stderr.write(`synthetic: ${msg} (${((Date.now() - t0) / 1000).toFixed(0)} s)\n`); };
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const layout = join(dir, 'synthetic');
  const { entries, bytes } = await writeLayout(layout);
  log(`layer tars written: ${entries.join(' + ')} entries`);
  const root = join(dir, 'store');
  const store = await Store.open(root, { durability: 'none' });
  let layerDirs: string[];
  let tars: string[];
  try {
    await new StoreOperations(store).importPath({ path: layout, name: 'synthetic' });
    const layers = await store.imageLayers(SYNTHETIC_IMAGE);
    layerDirs = layers.map((l) => dirname(l.tarPath));
    tars = layers.map((l) => l.tarPath);
  } finally {
    store.close();
  }
  await rm(layout, { recursive: true, force: true });
  log('imported into the store');
  const lowers: string[] = [];
  for (const [i, tar] of tars.entries()) {
    lowers.push(join(dir, `lower-${i}`));
    await overlayLower(tar, lowers[i]!);
  }
  log('overlayfs lowers laid out');
  const merged = await countMerged(lowers, join(dir, 'count-mnt'));
  if (merged.files < 60_000) throw new Error(`synthetic dataset has only ${merged.files} merged files`);
  const dataset: SyntheticDataset = {
    root, image: SYNTHETIC_IMAGE, layerDirs, lowers, mergedFiles: merged.files, mergedDirs: merged.dirs, layerEntries: entries, layerBytes: bytes,
  };
  await writeFile(join(dir, 'complete.json'), JSON.stringify(dataset, null, 2));
  log(`done: ${merged.files} merged files`);
  return dataset;
}

/** The cached synthetic dataset, built first if missing or incomplete. */
export async function syntheticDataset(cacheRoot = process.env['LAYERD_BENCH_CACHE'] ?? '/var/tmp/layerd-bench-synthetic'): Promise<SyntheticDataset> {
  const dir = join(cacheRoot, `v${SYNTHETIC_VERSION}`);
  const cached = await readFile(join(dir, 'complete.json'), 'utf8').then((t) => JSON.parse(t) as SyntheticDataset, () => undefined);
  return cached ?? build(dir);
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const dataset = await syntheticDataset();
  process.stdout.write(JSON.stringify(dataset, null, 2) + '\n');
}
