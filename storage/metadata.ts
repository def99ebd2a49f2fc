/**
 * The metadata database: which blobs, layers, images and tags the store
 * holds. SQLite (better-sqlite3) in WAL mode gives transactions that survive
 * a crash at any point; see docs/storage.md for why a database rather than
 * JSON files.
 *
 * A row here is what makes content visible: files under blobs/ and layers/
 * without a row are leftovers of an interrupted import and are removed on
 * open (see Store.recover).
 */
import { statfsSync } from 'node:fs';
import { dirname } from 'node:path';
import Database from 'better-sqlite3';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type Digest } from './digest.js';

type Db = Database.Database;

const SCHEMA_VERSION = 3;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS meta (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
  digest     TEXT PRIMARY KEY,
  size       INTEGER NOT NULL,
  media_type TEXT NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS layers (
  diff_id    TEXT PRIMARY KEY,
  size       INTEGER NOT NULL,   -- bytes of the uncompressed tar
  file_bytes INTEGER NOT NULL,   -- bytes of regular-file content
  entries    INTEGER NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
  id            TEXT PRIMARY KEY, -- manifest digest
  media_type    TEXT NOT NULL,
  config_digest TEXT NOT NULL REFERENCES blobs(digest),
  os            TEXT NOT NULL,
  architecture  TEXT NOT NULL,
  variant       TEXT,
  index_digest  TEXT REFERENCES blobs(digest),
  created       TEXT,            -- from the image config
  imported_at   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS image_layers (
  image_id    TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
  position    INTEGER NOT NULL,  -- 0 = base
  diff_id     TEXT NOT NULL REFERENCES layers(diff_id),
  blob_digest TEXT REFERENCES blobs(digest),
  media_type  TEXT NOT NULL,
  blob_size   INTEGER NOT NULL,
  PRIMARY KEY (image_id, position)
);
CREATE INDEX IF NOT EXISTS image_layers_diff_id ON image_layers(diff_id);
CREATE TABLE IF NOT EXISTS tags (
  name       TEXT NOT NULL,
  tag        TEXT NOT NULL,
  image_id   TEXT NOT NULL REFERENCES images(id),
  created_at INTEGER NOT NULL,
  PRIMARY KEY (name, tag)
);
CREATE INDEX IF NOT EXISTS tags_image_id ON tags(image_id);
CREATE TABLE IF NOT EXISTS lazy_layers (  -- schema 3: layers pulled lazily, not yet complete
  diff_id      TEXT PRIMARY KEY REFERENCES layers(diff_id),
  blob_digest  TEXT NOT NULL,     -- the blob the layer is fetched from (no blobs row until it is complete)
  media_type   TEXT NOT NULL,
  blob_size    INTEGER NOT NULL,
  format       TEXT NOT NULL,     -- 'estargz'
  state        TEXT NOT NULL,     -- 'lazy' | 'filling' | 'broken'
  filled_bytes INTEGER NOT NULL,  -- bytes of the blob the background fill has fetched
  error        TEXT,              -- why the layer is broken
  created_at   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
  id          TEXT PRIMARY KEY,
  image_id    TEXT NOT NULL REFERENCES images(id),
  mountpoint  TEXT NOT NULL UNIQUE,
  read_only   INTEGER NOT NULL,
  labels      TEXT NOT NULL,     -- JSON object
  created_at  INTEGER NOT NULL,
  server_pid  INTEGER,           -- the mount server process, while mounted
  layer_dir   TEXT               -- a live directory layer on top of the image (schema 2)
);
`;

export interface BlobRow { digest: Digest; size: number; media_type: string; created_at: number }
export interface LayerRow { diff_id: Digest; size: number; file_bytes: number; entries: number; created_at: number }
export interface ImageRow {
  id: Digest; media_type: string; config_digest: Digest; os: string; architecture: string;
  variant: string | null; index_digest: Digest | null; created: string | null; imported_at: number;
}
export interface ImageLayerRow { image_id: Digest; position: number; diff_id: Digest; blob_digest: Digest | null; media_type: string; blob_size: number }
export type LazyState = 'lazy' | 'filling' | 'broken';
export interface LazyLayerRow {
  diff_id: Digest; blob_digest: Digest; media_type: string; blob_size: number; format: string; state: LazyState;
  filled_bytes: number; error: string | null; created_at: number;
}
export interface TagRow { name: string; tag: string; image_id: Digest; created_at: number }

export interface ContainerRow {
  id: string; image_id: Digest; mountpoint: string; read_only: number; labels: string; created_at: number; server_pid: number | null;
  layer_dir: string | null;
}

export interface OpenOptions {
  /** Hold the database exclusively (the daemon): other processes get EBUSY. */
  exclusive?: boolean;
  /** How long to wait for another process's write transaction, in ms. */
  busyTimeoutMs?: number;
}

export class MetadataDb {
  readonly db: Db;

  constructor(path: string, options: OpenOptions = {}) {
    try {
      const envTimeout = Number(process.env['LAYERD_BUSY_TIMEOUT_MS']);
      this.db = new Database(path, { timeout: options.busyTimeoutMs ?? (envTimeout > 0 ? envTimeout : 10_000) });
      this.db.pragma('journal_mode = WAL');
      this.db.pragma('synchronous = FULL');
      this.db.pragma('foreign_keys = ON');
      if (options.exclusive) {
        this.db.pragma('locking_mode = EXCLUSIVE');
        // The lock is taken by the first write and then held until close.
        this.db.exec('BEGIN EXCLUSIVE; COMMIT;');
      }
      this.migrate();
    } catch (err) {
      if (err instanceof LayerdError) throw err;
      const code = (err as { code?: string }).code;
      if (code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED') {
        throw new LayerdError(ErrorCodes.EBUSY, `the store's database is locked by another process (a running layerd daemon?): ${path}`, { path }, { cause: err });
      }
      throw openError(err, path);
    }
  }

  private migrate(): void {
    const run = this.db.transaction(() => {
      this.db.exec(SCHEMA);
      const row = this.db.prepare(`SELECT value FROM meta WHERE key = 'schema_version'`).get() as { value: string } | undefined;
      if (!row) {
        this.db.prepare(`INSERT INTO meta (key, value) VALUES ('schema_version', ?)`).run(String(SCHEMA_VERSION));
      } else if (Number(row.value) > SCHEMA_VERSION) {
        throw new LayerdError(ErrorCodes.ECORRUPT, `the store was written by a newer layerd (schema ${row.value}, this one knows ${SCHEMA_VERSION})`);
      } else if (Number(row.value) < SCHEMA_VERSION) {
        // 1 → 2: containers may have a live directory layer. 2 → 3: lazy_layers (created by SCHEMA above).
        const columns = this.db.prepare(`PRAGMA table_info(containers)`).all() as Array<{ name: string }>;
        if (!columns.some((c) => c.name === 'layer_dir')) this.db.exec(`ALTER TABLE containers ADD COLUMN layer_dir TEXT`);
        this.db.prepare(`UPDATE meta SET value = ? WHERE key = 'schema_version'`).run(String(SCHEMA_VERSION));
      }
    });
    run.immediate();
  }

  /** Run `fn` in an immediate (write-locked) transaction. */
  write<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }

  /**
   * `write` without waiting for the disk (no fsync at commit, WAL's
   * synchronous=NORMAL): for records a power failure makes moot anyway (the
   * pid of a mount's server), on the path of every container start. Such a
   * commit survives a crash of the process; a power failure loses it only
   * until the next `write` or checkpoint, which syncs it with everything
   * before it (the log is never reordered).
   */
  writeUnsynced<T>(fn: () => T): T {
    this.db.pragma('synchronous = NORMAL');
    try {
      return this.write(fn);
    } finally {
      this.db.pragma('synchronous = FULL');
    }
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  // --- blobs -------------------------------------------------------------

  getBlob(digest: Digest): BlobRow | undefined {
    return this.db.prepare(`SELECT * FROM blobs WHERE digest = ?`).get(digest) as BlobRow | undefined;
  }

  putBlob(row: Omit<BlobRow, 'created_at'>): void {
    this.db.prepare(`INSERT OR IGNORE INTO blobs (digest, size, media_type, created_at) VALUES (?, ?, ?, ?)`)
      .run(row.digest, row.size, row.media_type, Date.now());
  }

  listBlobs(): BlobRow[] {
    return this.db.prepare(`SELECT * FROM blobs ORDER BY digest`).all() as BlobRow[];
  }

  deleteBlob(digest: Digest): void {
    this.db.prepare(`DELETE FROM blobs WHERE digest = ?`).run(digest);
  }

  // --- layers ------------------------------------------------------------

  getLayer(diffId: Digest): LayerRow | undefined {
    return this.db.prepare(`SELECT * FROM layers WHERE diff_id = ?`).get(diffId) as LayerRow | undefined;
  }

  putLayer(row: Omit<LayerRow, 'created_at'>): void {
    this.db.prepare(`INSERT OR IGNORE INTO layers (diff_id, size, file_bytes, entries, created_at) VALUES (?, ?, ?, ?, ?)`)
      .run(row.diff_id, row.size, row.file_bytes, row.entries, Date.now());
  }

  /** Set the sizes of a layer that has become complete (a lazy layer's row was written before they were known). */
  setLayerSizes(diffId: Digest, size: number, fileBytes: number, entries: number): void {
    this.db.prepare(`UPDATE layers SET size = ?, file_bytes = ?, entries = ? WHERE diff_id = ?`).run(size, fileBytes, entries, diffId);
  }

  // --- lazy layers ---------------------------------------------------------

  getLazyLayer(diffId: Digest): LazyLayerRow | undefined {
    return this.db.prepare(`SELECT * FROM lazy_layers WHERE diff_id = ?`).get(diffId) as LazyLayerRow | undefined;
  }

  listLazyLayers(): LazyLayerRow[] {
    return this.db.prepare(`SELECT * FROM lazy_layers ORDER BY created_at, diff_id`).all() as LazyLayerRow[];
  }

  putLazyLayer(row: Omit<LazyLayerRow, 'created_at'>): void {
    this.db.prepare(`INSERT OR IGNORE INTO lazy_layers (diff_id, blob_digest, media_type, blob_size, format, state, filled_bytes, error, created_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`)
      .run(row.diff_id, row.blob_digest, row.media_type, row.blob_size, row.format, row.state, row.filled_bytes, row.error, Date.now());
  }

  setLazyState(diffId: Digest, state: LazyState, filledBytes: number, error: string | null = null): void {
    this.db.prepare(`UPDATE lazy_layers SET state = ?, filled_bytes = ?, error = ? WHERE diff_id = ?`).run(state, filledBytes, error, diffId);
  }

  /**
   * The layer is complete: its blob is stored (a blobs row exists), the
   * image layers that waited for it name it, and it is lazy no more.
   */
  completeLazyLayer(diffId: Digest, blobDigest: Digest): void {
    this.db.prepare(`UPDATE image_layers SET blob_digest = ? WHERE diff_id = ? AND blob_digest IS NULL`).run(blobDigest, diffId);
    this.db.prepare(`DELETE FROM lazy_layers WHERE diff_id = ?`).run(diffId);
  }

  deleteLazyLayer(diffId: Digest): void {
    this.db.prepare(`DELETE FROM lazy_layers WHERE diff_id = ?`).run(diffId);
  }

  listLayers(): LayerRow[] {
    return this.db.prepare(`SELECT * FROM layers ORDER BY created_at, diff_id`).all() as LayerRow[];
  }

  deleteLayer(diffId: Digest): void {
    this.db.prepare(`DELETE FROM layers WHERE diff_id = ?`).run(diffId);
  }

  /** How many image records use each layer. */
  layerUseCounts(): Map<Digest, number> {
    const rows = this.db.prepare(`SELECT diff_id, COUNT(DISTINCT image_id) AS n FROM image_layers GROUP BY diff_id`).all() as { diff_id: Digest; n: number }[];
    return new Map(rows.map((r) => [r.diff_id, r.n]));
  }

  // --- images ------------------------------------------------------------

  getImage(id: Digest): ImageRow | undefined {
    return this.db.prepare(`SELECT * FROM images WHERE id = ?`).get(id) as ImageRow | undefined;
  }

  findImagesByPrefix(hexPrefix: string): ImageRow[] {
    return this.db.prepare(`SELECT * FROM images WHERE id >= ? AND id < ? ORDER BY id LIMIT 2`)
      .all(`sha256:${hexPrefix}`, `sha256:${hexPrefix}\uffff`) as ImageRow[];
  }

  putImage(row: Omit<ImageRow, 'imported_at'>, layers: Omit<ImageLayerRow, 'image_id'>[]): void {
    const existing = this.getImage(row.id);
    if (existing) return;
    this.db.prepare(`INSERT INTO images (id, media_type, config_digest, os, architecture, variant, index_digest, created, imported_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`)
      .run(row.id, row.media_type, row.config_digest, row.os, row.architecture, row.variant, row.index_digest, row.created, Date.now());
    const insert = this.db.prepare(`INSERT INTO image_layers (image_id, position, diff_id, blob_digest, media_type, blob_size) VALUES (?, ?, ?, ?, ?, ?)`);
    for (const l of layers) insert.run(row.id, l.position, l.diff_id, l.blob_digest, l.media_type, l.blob_size);
  }

  listImages(): ImageRow[] {
    return this.db.prepare(`SELECT * FROM images ORDER BY imported_at, id`).all() as ImageRow[];
  }

  imageLayers(id: Digest): ImageLayerRow[] {
    return this.db.prepare(`SELECT * FROM image_layers WHERE image_id = ? ORDER BY position`).all(id) as ImageLayerRow[];
  }

  deleteImage(id: Digest): void {
    this.db.prepare(`DELETE FROM tags WHERE image_id = ?`).run(id);
    this.db.prepare(`DELETE FROM images WHERE id = ?`).run(id);
  }

  // --- tags --------------------------------------------------------------

  getTag(name: string, tag: string): TagRow | undefined {
    return this.db.prepare(`SELECT * FROM tags WHERE name = ? AND tag = ?`).get(name, tag) as TagRow | undefined;
  }

  setTag(name: string, tag: string, imageId: Digest): void {
    this.db.prepare(`INSERT INTO tags (name, tag, image_id, created_at) VALUES (?, ?, ?, ?)
                     ON CONFLICT (name, tag) DO UPDATE SET image_id = excluded.image_id, created_at = excluded.created_at`)
      .run(name, tag, imageId, Date.now());
  }

  deleteTag(name: string, tag: string): void {
    this.db.prepare(`DELETE FROM tags WHERE name = ? AND tag = ?`).run(name, tag);
  }

  tagsOf(imageId: Digest): TagRow[] {
    return this.db.prepare(`SELECT * FROM tags WHERE image_id = ? ORDER BY name, tag`).all(imageId) as TagRow[];
  }

  listTags(): TagRow[] {
    return this.db.prepare(`SELECT * FROM tags ORDER BY name, tag`).all() as TagRow[];
  }

  // --- containers (a mount of an image with its own writable layer) ---------

  getContainer(id: string): ContainerRow | undefined {
    return this.db.prepare(`SELECT * FROM containers WHERE id = ?`).get(id) as ContainerRow | undefined;
  }

  listContainers(): ContainerRow[] {
    return this.db.prepare(`SELECT * FROM containers ORDER BY created_at, id`).all() as ContainerRow[];
  }

  putContainer(row: Omit<ContainerRow, 'created_at'>): void {
    this.db.prepare(`INSERT INTO containers (id, image_id, mountpoint, read_only, labels, created_at, server_pid, layer_dir) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`)
      .run(row.id, row.image_id, row.mountpoint, row.read_only, row.labels, Date.now(), row.server_pid, row.layer_dir);
  }

  setContainerServer(id: string, pid: number | null): void {
    this.db.prepare(`UPDATE containers SET server_pid = ? WHERE id = ?`).run(pid, id);
  }

  deleteContainer(id: string): void {
    this.db.prepare(`DELETE FROM containers WHERE id = ?`).run(id);
  }

  containersOfImage(imageId: Digest): ContainerRow[] {
    return this.db.prepare(`SELECT * FROM containers WHERE image_id = ?`).all(imageId) as ContainerRow[];
  }

  // --- reachability (GC) ---------------------------------------------------

  /** Blobs any image record refers to: manifests, configs, indexes, layer blobs. */
  referencedBlobs(): Set<Digest> {
    const rows = this.db.prepare(`
      SELECT id AS d FROM images
      UNION SELECT config_digest FROM images
      UNION SELECT index_digest FROM images WHERE index_digest IS NOT NULL
      UNION SELECT blob_digest FROM image_layers WHERE blob_digest IS NOT NULL`).all() as { d: Digest }[];
    return new Set(rows.map((r) => r.d));
  }

  referencedLayers(): Set<Digest> {
    const rows = this.db.prepare(`SELECT DISTINCT diff_id AS d FROM image_layers`).all() as { d: Digest }[];
    return new Set(rows.map((r) => r.d));
  }

  untaggedImages(): ImageRow[] {
    return this.db.prepare(`SELECT * FROM images WHERE id NOT IN (SELECT image_id FROM tags) AND id NOT IN (SELECT image_id FROM containers) ORDER BY id`).all() as ImageRow[];
  }
}

/**
 * Why the database did not open. ECORRUPT only for what SQLite calls
 * corruption; a full disk is ENOSPC, any other I/O failure EIO.
 */
function openError(err: unknown, path: string): LayerdError {
  const code = (err as { code?: string }).code ?? '';
  const message = `cannot open the store's database ${path}: ${(err as Error).message}`;
  if (code === 'SQLITE_CORRUPT' || code === 'SQLITE_NOTADB' || code.startsWith('SQLITE_CORRUPT_')) {
    return new LayerdError(ErrorCodes.ECORRUPT, message, { path }, { cause: err });
  }
  if (code === 'SQLITE_FULL' || (code.startsWith('SQLITE_IOERR') && diskFull(dirname(path)))) {
    return new LayerdError(ErrorCodes.ENOSPC, `${message} (the disk is full)`, { path }, { cause: err });
  }
  return new LayerdError(ErrorCodes.EIO, message, { path }, { cause: err });
}

/** SQLite reports a failed write of its shared-memory file as a plain I/O error: ask the filesystem. */
function diskFull(dir: string): boolean {
  try {
    const st = statfsSync(dir);
    return st.bavail * st.bsize < 1024 * 1024;
  } catch {
    return false;
  }
}
