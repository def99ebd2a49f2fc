/**
 * The content-addressed layer store: opening a root, the ingest area, the
 * commit step that makes verified content visible, and reference lookup.
 *
 * How content becomes visible (and why a crash at any point is harmless):
 *   1. An import writes and verifies everything in a private directory of
 *      the ingest area, `tmp/<pid>-<random>/`.
 *   2. In ONE write transaction of the metadata database it renames the
 *      verified blobs and layers into `blobs/` and `layers/` and inserts
 *      their rows. Renames happen only inside such a transaction.
 *   3. A crash before the commit leaves only a tmp directory (removed on the
 *      next open, once its process is gone); a crash inside it leaves files
 *      in `blobs/`/`layers/` with no row, which `recover()` removes while
 *      holding the write lock, so it can never race a live commit.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, renameSync } from 'node:fs';
import { mkdir, readFile, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ErrorCodes, LayerdError, errnoCode } from '../common/errors.js';
import { processAlive } from '../common/process.js';
import { ObjectStore, publishObjects, removeDeadStaging } from './objectStore.js';
import { type Logger, silentLogger } from '../common/log.js';
import { type Digest, isDigest } from './digest.js';
import { DEFAULT_DISK_RESERVE_BYTES, noSpaceError } from './diskSpace.js';
import { type LayerIndex, LAYER_INDEX_VERSION } from './layerIndex.js';
import { StoreLayout } from './layout.js';
import { type ImageRow, MetadataDb, type OpenOptions } from './metadata.js';
import { parseImageRef } from './references.js';

const run = promisify(execFile);

export interface StoreOptions extends OpenOptions {
  logger?: Logger;
  /**
   * 'full' (default): flush the filesystem before a commit, so committed
   * content survives a power loss. 'none': rely on the page cache (tests,
   * throwaway stores).
   */
  durability?: 'full' | 'none';
  /** Free space imports must leave on the store's filesystem (default 256 MiB; 0: no check). */
  diskReserveBytes?: number;
  /**
   * How new layers are kept: 'tar' (default: `layer.tar` + index) or
   * 'skeleton' (a tar skeleton + content-addressed objects, one copy of each
   * file per store: storage/tarSkeleton.ts). Default from
   * `$LAYERD_LAYER_FORMAT`. Layers of either kind are read either way.
   */
  layerFormat?: LayerFormat;
}

export type LayerFormat = 'tar' | 'skeleton';

/** The layer format a store uses when none is given: `$LAYERD_LAYER_FORMAT`, else 'tar'. */
export function defaultLayerFormat(): LayerFormat {
  const env = process.env['LAYERD_LAYER_FORMAT'];
  if (env === undefined || env === '' || env === 'tar') return 'tar';
  if (env === 'skeleton') return 'skeleton';
  throw new LayerdError(ErrorCodes.EINVAL, `LAYERD_LAYER_FORMAT must be 'tar' or 'skeleton', not '${env}'`, { value: env });
}

/** A verified item in the ingest area, ready to be renamed into place. */
export type StagedItem =
  | { kind: 'blob'; digest: Digest; path: string }
  | { kind: 'layer'; diffId: Digest; path: string }
  /** A lazily pulled layer's directory (storage/lazy/): goes to lazy/, its rows are the caller's. */
  | { kind: 'lazy'; diffId: Digest; path: string }
  /** A file's bytes, verified (its sha256 is `digest`): becomes objects/sha256/xx/<hex> unless one is there. */
  | { kind: 'object'; digest: string; path: string }
  /** A layer kept as skeleton + objects: every object it names must exist once the commit's renames are done. */
  | { kind: 'skeleton'; diffId: Digest; path: string; objects: ReadonlySet<string> };

/**
 * A layer of the store: its index and where its uncompressed tar is (`offset`s point into it).
 * A skeleton layer (`index.storage`) has no tar there: tarLayerSource and storeLayerSource
 * read its files from objects and its `inline` file, found from the same path.
 */
export interface StoredLayer {
  diffId: Digest;
  index: LayerIndex;
  tarPath: string;
  /** Set while the layer is lazy: its directory, to open with LazyLayerSource (its bytes are not in `tarPath`). */
  lazyDir?: string;
}

export class Store {
  readonly layout: StoreLayout;
  readonly db: MetadataDb;
  readonly logger: Logger;
  private readonly durability: 'full' | 'none';
  readonly diskReserveBytes: number;
  readonly layerFormat: LayerFormat;
  /**
   * The store's objects, with a descriptor of this root of its own (not
   * ObjectStore.forRoot's, which a process keeps for good: a store removed
   * and made again at the same path must not be looked at through the old one).
   */
  readonly objects: ObjectStore;
  private readonly indexCache = new Map<Digest, LayerIndex>();

  private constructor(root: string, db: MetadataDb, options: StoreOptions) {
    this.layout = new StoreLayout(root);
    this.db = db;
    this.logger = options.logger ?? silentLogger();
    this.durability = options.durability ?? 'full';
    this.diskReserveBytes = options.diskReserveBytes ?? DEFAULT_DISK_RESERVE_BYTES;
    this.layerFormat = options.layerFormat ?? defaultLayerFormat();
    this.objects = new ObjectStore(root, this.logger);
  }

  static async open(root: string, options: StoreOptions = {}): Promise<Store> {
    const layout = new StoreLayout(root);
    await mkdir(layout.root, { recursive: true, mode: 0o700 });
    await Promise.all([
      mkdir(layout.blobsDir, { recursive: true, mode: 0o700 }),
      mkdir(layout.layersDir, { recursive: true, mode: 0o700 }),
      mkdir(layout.tmpDir, { recursive: true, mode: 0o700 }),
      mkdir(layout.lazyDir, { recursive: true, mode: 0o700 }),
    ]);
    await refuseIfDaemonHolds(root, layout);
    // Dead ingests first: on a full disk they are what frees the room the
    // database needs to open at all.
    const deadIngests = await removeDeadIngests(layout);
    const store = new Store(root, new MetadataDb(layout.metadataDb, options), options);
    await store.recover(deadIngests);
    return store;
  }

  close(): void {
    this.db.close();
    this.objects.close();
  }

  /** Whether commits wait for the disk (imports then start flushing their files early). */
  get durable(): boolean {
    return this.durability === 'full';
  }

  // --- the ingest area ------------------------------------------------------

  /** A fresh private directory for one import; remove it with `releaseWorkDir`. */
  async newWorkDir(): Promise<string> {
    const dir = join(this.layout.tmpDir, `${process.pid}-${randomBytes(6).toString('hex')}`);
    await mkdir(dir, { mode: 0o700 });
    return dir;
  }

  async releaseWorkDir(dir: string): Promise<void> {
    await rm(dir, { recursive: true, force: true });
  }

  /**
   * Rename verified items into place and record them, all in one write
   * transaction together with `record` (which inserts the rows that make
   * them visible). Items already present are left as they are.
   */
  async commit(workDir: string, staged: readonly StagedItem[], record: (db: MetadataDb) => void): Promise<void> {
    if (this.durability === 'full' && staged.length > 0) await syncFilesystem(workDir);
    const trash = join(workDir, 'trash');
    try {
      this.commitRows(staged, trash, record);
    } catch (err) {
      throw noSpaceError(err, 'committing to the store', { root: this.layout.root }) ?? err;
    }
    if (this.durability === 'full' && staged.length > 0) await syncFilesystem(this.layout.root);
  }

  private commitRows(staged: readonly StagedItem[], trash: string, record: (db: MetadataDb) => void): void {
    let trashed = 0;
    this.db.write(() => {
      // Objects first: a layer named by a row must find every object it names.
      const objects = staged.filter((item): item is Extract<StagedItem, { kind: 'object' }> => item.kind === 'object');
      if (objects.length > 0) publishObjects(this.layout.root, objects);
      for (const item of staged) {
        if (item.kind === 'object') continue;
        if (item.kind === 'skeleton') {
          // An object found in the store at ingest was not staged again; a GC since may have removed it.
          for (const digest of item.objects) {
            if (!this.objects.has(digest)) {
              throw new LayerdError(ErrorCodes.ECONFLICT, `layer ${item.diffId}: object ${digest} was removed (by a GC) while the layer was imported; import it again`, { diffId: item.diffId, digest });
            }
          }
        }
        if (item.kind === 'blob') {
          if (this.db.getBlob(item.digest)) continue;
          renameSync(item.path, this.layout.blobPath(item.digest));
        } else {
          // A layer already recorded is left as it is, unless this is the complete form of a lazy one (its fill).
          if (this.db.getLayer(item.diffId) && (item.kind === 'lazy' || !this.db.getLazyLayer(item.diffId))) continue;
          const target = item.kind === 'lazy' ? this.layout.lazyLayerDir(item.diffId) : this.layout.layerDir(item.diffId);
          if (existsSync(target)) {
            // A leftover of an interrupted commit: no row points to it.
            if (trashed === 0) mkdirSync(trash, { recursive: true });
            renameSync(target, join(trash, String(trashed++)));
          }
          renameSync(item.path, target);
        }
      }
      record(this.db);
    });
  }

  // --- recovery -------------------------------------------------------------

  /**
   * Remove what interrupted imports left: ingest directories of processes
   * that are gone (and their object staging directories, objects/tmp/), and
   * files under blobs/ or layers/ that no row refers to.
   */
  async recover(removedIngests = 0): Promise<{ tmpDirs: number; blobs: number; layers: number }> {
    const tmpDirs = removedIngests + await removeDeadIngests(this.layout) + await removeDeadStaging(this.layout.root);
    const workDir = await this.newWorkDir();
    const trash: string[] = [];
    let blobs = 0;
    let layers = 0;
    try {
      this.db.write(() => {
        for (const hex of readdirSyncSafe(this.layout.blobsDir)) {
          const digest = `sha256:${hex}`;
          if (isDigest(digest) && this.db.getBlob(digest)) continue;
          const to = join(workDir, `b${blobs++}`);
          renameSync(join(this.layout.blobsDir, hex), to);
          trash.push(to);
        }
        for (const hex of readdirSyncSafe(this.layout.layersDir)) {
          const digest = `sha256:${hex}`;
          // A complete layer's row; a lazy layer's row does not vouch for layers/ (its fill may have died mid-commit).
          if (isDigest(digest) && this.db.getLayer(digest) && !this.db.getLazyLayer(digest)) continue;
          const to = join(workDir, `l${layers++}`);
          renameSync(join(this.layout.layersDir, hex), to);
          trash.push(to);
        }
        for (const hex of readdirSyncSafe(this.layout.lazyDir)) {
          const digest = `sha256:${hex}`;
          if (isDigest(digest) && this.db.getLazyLayer(digest)) continue;
          const to = join(workDir, `l${layers++}`);
          renameSync(join(this.layout.layersDir, hex), to);
          trash.push(to);
        }
      });
    } finally {
      await this.releaseWorkDir(workDir);
    }
    if (tmpDirs + blobs + layers > 0) {
      this.logger.info('recovered the store after an interrupted operation', { tmpDirs, blobs, layers, root: this.layout.root });
    }
    return { tmpDirs, blobs, layers };
  }

  // --- lookups --------------------------------------------------------------

  /** The image a reference names: NAME[:TAG], NAME@digest, a digest or a unique digest prefix. */
  resolveImage(text: string): ImageRow {
    const ref = parseImageRef(text);
    const notFound = (): LayerdError => new LayerdError(ErrorCodes.ENOTFOUND, `no such image: ${text}`, { ref: text });
    switch (ref.kind) {
      case 'digest': {
        const row = this.db.getImage(ref.digest);
        if (!row) throw notFound();
        return row;
      }
      case 'prefix': {
        const rows = this.db.findImagesByPrefix(ref.hex);
        if (rows.length > 1) throw new LayerdError(ErrorCodes.EAMBIGUOUS, `image digest prefix ${ref.hex} matches more than one image`, { ref: text });
        if (rows.length === 0) throw notFound();
        return rows[0]!;
      }
      case 'tag': {
        const tag = this.db.getTag(ref.name, ref.tag);
        if (tag) return this.db.getImage(tag.image_id)!;
        // A short hex string that is no tag may still be a digest prefix.
        if (/^[0-9a-f]{4,}$/.test(text)) {
          const rows = this.db.findImagesByPrefix(text);
          if (rows.length === 1) return rows[0]!;
          if (rows.length > 1) throw new LayerdError(ErrorCodes.EAMBIGUOUS, `image digest prefix ${text} matches more than one image`, { ref: text });
        }
        throw notFound();
      }
    }
  }

  async readBlob(digest: Digest): Promise<Buffer> {
    if (!this.db.getBlob(digest)) throw new LayerdError(ErrorCodes.ENOTFOUND, `no such blob: ${digest}`, { digest });
    return readFile(this.layout.blobPath(digest));
  }

  async layerIndex(diffId: Digest): Promise<LayerIndex> {
    const cached = this.indexCache.get(diffId);
    if (cached) return cached;
    if (!this.db.getLayer(diffId)) throw new LayerdError(ErrorCodes.ENOTFOUND, `no such layer: ${diffId}`, { diffId });
    const index = await readLayerIndex(this.layerDirFor(diffId), diffId);
    // A lazy layer's index is replaced when its fill completes: not cached.
    if (!this.isLazy(diffId)) this.indexCache.set(diffId, index);
    return index;
  }

  /** Whether the layer is still being pulled lazily (its bytes are not all here). */
  isLazy(diffId: Digest): boolean {
    return this.db.getLazyLayer(diffId) !== undefined;
  }

  /** The directory a layer is served from: its lazy directory until it is complete. */
  layerDirFor(diffId: Digest): string {
    return this.isLazy(diffId) ? this.layout.lazyLayerDir(diffId) : this.layout.layerDir(diffId);
  }

  /** Refuse what needs a layer's whole tar (push, export of an image) while it is lazy. */
  requireComplete(diffId: Digest, what: string): void {
    const lazy = this.db.getLazyLayer(diffId);
    if (!lazy) return;
    const done = lazy.blob_size > 0 ? Math.floor((100 * lazy.filled_bytes) / lazy.blob_size) : 0;
    throw new LayerdError(ErrorCodes.ECONFLICT, `${what}: layer ${diffId} was pulled lazily and is not complete yet (${lazy.state}${lazy.state === 'filling' ? ` ${done} %` : ''})`, { diffId, state: lazy.state });
  }

  /** The layers of an image, base first: each index and the tar holding its bytes. */
  async imageLayers(ref: string): Promise<StoredLayer[]> {
    const image = this.resolveImage(ref);
    const layers: StoredLayer[] = [];
    for (const row of this.db.imageLayers(image.id)) layers.push(await this.storedLayer(row.diff_id));
    return layers;
  }

  /** A lazy layer's `tarPath` is its content file, whose offsets are not a tar's: serve it through `lazy`'s source (storage/lazy/). */
  async storedLayer(diffId: Digest): Promise<StoredLayer> {
    const lazy = this.isLazy(diffId);
    return {
      diffId, index: await this.layerIndex(diffId), tarPath: this.layout.layerTarPath(diffId),
      ...(lazy ? { lazyDir: this.layout.lazyLayerDir(diffId) } : {}),
    };
  }

  forgetLayerIndex(diffId: Digest): void {
    this.indexCache.delete(diffId);
  }
}

/**
 * Read a layer directory's index (`index.json`), checking it describes the
 * layer it should. Needs no database: mount servers use it directly.
 */
export async function readLayerIndex(layerDir: string, diffId?: Digest): Promise<LayerIndex> {
  const path = join(layerDir, 'index.json');
  let index: LayerIndex;
  try {
    index = JSON.parse(await readFile(path, 'utf8')) as LayerIndex;
  } catch (err) {
    const code = errnoCode(err) === 'ENOENT' ? ErrorCodes.ENOTFOUND : ErrorCodes.ECORRUPT;
    throw new LayerdError(code, `cannot read the layer index ${path}: ${(err as Error).message}`, { path }, { cause: err });
  }
  if (index.version !== LAYER_INDEX_VERSION || !Array.isArray(index.entries) || (diffId !== undefined && index.id !== diffId)) {
    throw new LayerdError(ErrorCodes.ECORRUPT, `layer index ${path} is not a version-${LAYER_INDEX_VERSION} index${diffId ? ` of ${diffId}` : ''}`, { path });
  }
  return index;
}

/**
 * The file a running daemon leaves in its root (`{pid, socket}`), so an
 * offline `layerctl --root` can say at once which daemon holds the store.
 * The database lock, not this file, is what actually keeps them apart.
 */
export function daemonMarker(root: string): string {
  return join(root, 'daemon.json');
}

/**
 * Refuse at once if a live daemon holds `root`. The marker only says whom to
 * blame: its pid may since belong to an unrelated process (a crash, a
 * reboot, pid reuse). What decides is the database lock, tried without
 * waiting; a marker whose store is not locked is stale and ignored.
 */
async function refuseIfDaemonHolds(root: string, layout: StoreLayout): Promise<void> {
  let marker: { pid?: unknown; socket?: unknown };
  try {
    marker = JSON.parse(await readFile(daemonMarker(root), 'utf8')) as typeof marker;
  } catch {
    return;
  }
  if (typeof marker.pid !== 'number' || marker.pid === process.pid || !processAlive(marker.pid)) return;
  if (!existsSync(layout.metadataDb)) return;
  try {
    new MetadataDb(layout.metadataDb, { busyTimeoutMs: 1 }).close();
  } catch (err) {
    if (!(err instanceof LayerdError) || err.code !== ErrorCodes.EBUSY) throw err;
    throw new LayerdError(ErrorCodes.EBUSY, `the store ${root} is held by the layerd daemon (pid ${marker.pid}); use --socket ${String(marker.socket)} or stop the daemon`, { root, pid: marker.pid }, { cause: err });
  }
}

/** Remove the ingest directories (`tmp/<pid>-*`) of processes that are gone. */
async function removeDeadIngests(layout: StoreLayout): Promise<number> {
  let removed = 0;
  for (const name of await readdir(layout.tmpDir)) {
    const pid = Number(name.split('-')[0]);
    if (pid === process.pid) continue;
    if (Number.isInteger(pid) && pid > 0 && processAlive(pid)) continue;
    await rm(join(layout.tmpDir, name), { recursive: true, force: true });
    removed++;
  }
  return removed;
}

function readdirSyncSafe(dir: string): string[] {
  try {
    // Synchronous on purpose: runs inside a database transaction callback.
    return readdirSync(dir);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return [];
    throw err;
  }
}

/** Flush the filesystem holding `path` (one syncfs instead of an fsync per file). */
async function syncFilesystem(path: string): Promise<void> {
  await run('sync', ['--file-system', path]);
}

