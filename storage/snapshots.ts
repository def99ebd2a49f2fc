/**
 * Snapshot records for the containerd proxy snapshotter, in their own table
 * of the store's database, and the two store operations snapshots need:
 * ingesting a layer tar as a standalone layer (no image), and deleting such a
 * layer once nothing uses it.
 *
 *   <root>/snapshots/<id>/upper     the writable layer of an active snapshot
 *   <root>/snapshots/<id>/mnt       its FUSE mountpoint (active and view snapshots)
 *   <root>/snapshots/<id>/work      an unpack snapshot's overlayfs work dir (never mounted by layerd)
 *
 * An *unpack* snapshot (containerd prepares it only to apply one layer and
 * commit it as `unpack_target`, a chain ID) is a plain directory: containerd
 * writes into `upper` directly, at disk speed, and Commit turns it into a
 * store layer (or finds the layer the store already has for that chain).
 *
 * A committed snapshot is a layer of the store (`diff_id`) on top of its
 * parent's chain; it owns no files of its own — except one containerd
 * committed from an unpack directory whose layer is still being ingested
 * from it in the background (`pending_ingest`, stored as kind 'active' with
 * no layer yet, reported as committed). Its layer stays in the store
 * while any snapshot refers to it (`collectGarbage` asks `snapshotLayerRefs`).
 * The keys are containerd's (its metadata layer namespaces them, e.g.
 * `default/12/sha256:…`); `id` is layerd's own, used for directory names.
 */
import { renameSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough, type Readable, type Writable } from 'node:stream';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { layerMediaType } from './compression.js';
import { type Digest, digestOf } from './digest.js';
import { Transaction } from './importer.js';
import { type LayerIndex } from './layerIndex.js';
import { ingestLayer } from './layerIngest.js';
import { type MetadataDb } from './metadata.js';
import { MediaTypes } from './oci.js';
import { type Store } from './store.js';

export type SnapshotKind = 'active' | 'view' | 'committed';

export interface SnapshotRow {
  id: number;
  key: string;
  kind: SnapshotKind;
  /** Key of the parent (a committed snapshot), or null. */
  parent: string | null;
  /** JSON object of string labels. */
  labels: string;
  created_at: number;
  updated_at: number;
  /** Committed: the store layer holding its changes. */
  diff_id: Digest | null;
  /** Committed: the chain ID it is known to stand for (set by the remote path), else null. */
  chain_id: Digest | null;
  /** Active and view: the writable (view: empty) upper directory. */
  upper: string | null;
  /** Active and view: where it is mounted. */
  mountpoint: string | null;
  /** Active and view: the mount server, while one is known. */
  server_pid: number | null;
  /** Unpack snapshots: the chain ID containerd will commit it as (no FUSE mount, no server); else null. */
  unpack_target: Digest | null;
  /**
   * 1: committed by containerd, its layer still being ingested from its
   * directory (`upper`) in the background; `diff_id` is null until then.
   * Stored as kind 'active' (the table's CHECK: committed ⇔ has a layer),
   * reported by SnapshotTable as 'committed'.
   */
  pending_ingest: number;
  /** The containerd namespace that committed a pending snapshot (its content store holds the original layer blob), if known. */
  namespace: string | null;
  /**
   * Committed: the distribution digest of the original (compressed) blob its
   * layer was stored from, kept in the store's blobs (store GC keeps it while
   * the snapshot exists); null when the layer was built from a directory.
   */
  blob_digest: Digest | null;
  /**
   * Active and view: the ids of the pending snapshots whose directories its
   * mount reads as lower layers (it was mounted before their layers were
   * ingested), as a JSON array; null when it reads store layers only. Such a
   * directory stays until no mount reads it, even once its layer is stored.
   */
  lower_dirs: string | null;
}

/** One layer of a chain as a mount reads it: a store layer, or the directory of a pending snapshot (row id). */
export type ChainLayer = { diffId: Digest } | { pendingDir: number };

const SCHEMA = `
CREATE TABLE IF NOT EXISTS snapshots (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  key         TEXT NOT NULL UNIQUE,
  kind        TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
  parent      TEXT REFERENCES snapshots(key),
  labels      TEXT NOT NULL,
  created_at  INTEGER NOT NULL,
  updated_at  INTEGER NOT NULL,
  diff_id     TEXT REFERENCES layers(diff_id),
  chain_id    TEXT,
  upper       TEXT,
  mountpoint  TEXT,
  server_pid  INTEGER,
  CHECK ((kind = 'committed') = (diff_id IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE INDEX IF NOT EXISTS snapshots_diff_id ON snapshots(diff_id);
`;

/** Columns added after the first version of the table (added to older stores on open). */
const ADDED_COLUMNS: Record<string, string> = {
  unpack_target: 'TEXT', pending_ingest: 'INTEGER NOT NULL DEFAULT 0', namespace: 'TEXT', blob_digest: 'TEXT', lower_dirs: 'TEXT',
};

/** A stored row as callers see it: one whose layer is still being ingested is committed already. */
function reported(row: SnapshotRow): SnapshotRow {
  return row.pending_ingest === 1 ? { ...row, kind: 'committed' } : row;
}

export function snapshotsDir(store: Store): string {
  return join(store.layout.root, 'snapshots');
}

export function snapshotDir(store: Store, id: number): string {
  return join(snapshotsDir(store), String(id));
}

/** The snapshot table of one store (created on first use). */
export class SnapshotTable {
  constructor(private readonly db: MetadataDb) {
    db.write(() => {
      db.db.exec(SCHEMA);
      const have = new Set((db.db.prepare(`PRAGMA table_info(snapshots)`).all() as { name: string }[]).map((c) => c.name));
      for (const [column, type] of Object.entries(ADDED_COLUMNS)) {
        if (!have.has(column)) db.db.exec(`ALTER TABLE snapshots ADD COLUMN ${column} ${type}`);
      }
    });
  }

  get(key: string): SnapshotRow | undefined {
    const row = this.db.db.prepare(`SELECT * FROM snapshots WHERE key = ?`).get(key) as SnapshotRow | undefined;
    return row === undefined ? undefined : reported(row);
  }

  list(): SnapshotRow[] {
    return (this.db.db.prepare(`SELECT * FROM snapshots ORDER BY id`).all() as SnapshotRow[]).map(reported);
  }

  children(key: string): SnapshotRow[] {
    return (this.db.db.prepare(`SELECT * FROM snapshots WHERE parent = ? ORDER BY id`).all(key) as SnapshotRow[]).map(reported);
  }

  /** Unpack snapshots prepared and not committed yet (containerd is applying a layer into each). */
  unpacksInProgress(): number {
    return (this.db.db.prepare(`SELECT COUNT(*) AS n FROM snapshots WHERE unpack_target IS NOT NULL AND kind = 'active' AND pending_ingest = 0`).get() as { n: number }).n;
  }

  /** Committed snapshots whose layer is still being ingested. */
  pending(): SnapshotRow[] {
    return (this.db.db.prepare(`SELECT * FROM snapshots WHERE pending_ingest = 1 ORDER BY id`).all() as SnapshotRow[]).map(reported);
  }

  /**
   * Containerd committed unpack snapshot `key` as `name`: the row (same id, so
   * its directory stays its own) becomes committed, its layer to be ingested
   * from `upper` (call inside a write transaction).
   */
  markPending(key: string, name: string, labels: Record<string, string>, chainId: Digest, namespace: string | null = null): void {
    this.db.db.prepare(`UPDATE snapshots SET key = ?, labels = ?, chain_id = ?, pending_ingest = 1, namespace = ?, mountpoint = NULL, server_pid = NULL, updated_at = ? WHERE key = ?`)
      .run(name, JSON.stringify(labels), chainId, namespace, Date.now(), key);
  }

  /**
   * The layer of pending snapshot `key` is in the store now (call in the
   * transaction that stores it); `blobDigest`: the original blob it was
   * stored from, if it was.
   */
  finishPending(key: string, diffId: Digest, blobDigest: Digest | null = null): void {
    const changed = this.db.db.prepare(`UPDATE snapshots SET kind = 'committed', diff_id = ?, blob_digest = ?, pending_ingest = 0, upper = NULL, unpack_target = NULL WHERE key = ? AND pending_ingest = 1`)
      .run(diffId, blobDigest, key).changes;
    if (changed !== 1) throw new LayerdError(ErrorCodes.ENOTFOUND, `snapshot ${key} is not waiting for its layer`, { snapshot: key });
  }

  /** Committed snapshots carrying `label` = `value` on top of `parent`. */
  committedWithLabel(label: string, value: string, parent: string | null): SnapshotRow[] {
    return this.list().filter((r) => r.kind === 'committed' && r.parent === parent && parseLabels(r.labels)[label] === value);
  }

  /** Committed snapshots known to stand for chain ID `chainId` (in any containerd namespace). */
  committedWithChain(chainId: Digest): SnapshotRow[] {
    return (this.db.db.prepare(`SELECT * FROM snapshots WHERE (kind = 'committed' OR pending_ingest = 1) AND chain_id = ? ORDER BY id`).all(chainId) as SnapshotRow[]).map(reported);
  }

  /** Insert (call inside a write transaction); returns the new row. */
  insert(row: Omit<SnapshotRow, 'id' | 'created_at' | 'updated_at' | 'unpack_target' | 'pending_ingest' | 'namespace' | 'blob_digest' | 'lower_dirs'>
    & { created_at?: number; unpack_target?: Digest | null; blob_digest?: Digest | null }): SnapshotRow {
    const now = Date.now();
    // A committed snapshot of a layer that came from an original blob holds that blob too (whichever snapshot stored it goes first).
    const blob = row.blob_digest ?? (row.diff_id === null ? null : this.blobOfLayer(row.diff_id));
    const result = this.db.db.prepare(`INSERT INTO snapshots (key, kind, parent, labels, created_at, updated_at, diff_id, chain_id, upper, mountpoint, server_pid, unpack_target, blob_digest)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
      .run(row.key, row.kind, row.parent, row.labels, row.created_at ?? now, now, row.diff_id, row.chain_id, row.upper, row.mountpoint, row.server_pid, row.unpack_target ?? null, blob);
    return reported(this.db.db.prepare(`SELECT * FROM snapshots WHERE id = ?`).get(result.lastInsertRowid) as SnapshotRow);
  }

  /**
   * The stored original blob of layer `diffId`: the one another snapshot's
   * layer was stored from, else the one an image names for it; null if the
   * store has none.
   */
  blobOfLayer(diffId: Digest): Digest | null {
    const fromSnapshot = this.db.db.prepare(`SELECT blob_digest AS d FROM snapshots WHERE diff_id = ? AND blob_digest IS NOT NULL LIMIT 1`).get(diffId) as { d: Digest } | undefined;
    if (fromSnapshot !== undefined) return fromSnapshot.d;
    const fromImage = this.db.db.prepare(`SELECT l.blob_digest AS d FROM image_layers l JOIN blobs b ON b.digest = l.blob_digest WHERE l.diff_id = ? LIMIT 1`).get(diffId) as { d: Digest } | undefined;
    return fromImage?.d ?? null;
  }

  /** Set the directories of a new row (they are named after its id). */
  setPaths(key: string, upper: string, mountpoint: string): void {
    this.db.db.prepare(`UPDATE snapshots SET upper = ?, mountpoint = ? WHERE key = ?`).run(upper, mountpoint, key);
  }

  setServer(key: string, pid: number | null): void {
    this.db.db.prepare(`UPDATE snapshots SET server_pid = ? WHERE key = ?`).run(pid, key);
  }

  /** Which pending snapshots' directories the mount of `key` reads (empty: none). */
  setLowerDirs(key: string, ids: readonly number[]): void {
    this.db.db.prepare(`UPDATE snapshots SET lower_dirs = ? WHERE key = ?`).run(ids.length > 0 ? JSON.stringify(ids) : null, key);
  }

  /** The pending-snapshot directories (row ids) some mount reads, by every row's `lower_dirs`. */
  lowerDirsInUse(): Set<number> {
    const used = new Set<number>();
    for (const { lower_dirs: text } of this.db.db.prepare(`SELECT lower_dirs FROM snapshots WHERE lower_dirs IS NOT NULL`).all() as { lower_dirs: string }[]) {
      for (const id of lowerDirIds(text)) used.add(id);
    }
    return used;
  }

  setLabels(key: string, labels: Record<string, string>): void {
    this.db.db.prepare(`UPDATE snapshots SET labels = ?, updated_at = ? WHERE key = ?`).run(JSON.stringify(labels), Date.now(), key);
  }

  delete(key: string): void {
    this.db.db.prepare(`DELETE FROM snapshots WHERE key = ?`).run(key);
  }

  /** The layers of a committed snapshot's chain, base first (all of them in the store). */
  chain(key: string | null): Digest[] {
    return this.chainLayers(key).map((l) => {
      if ('diffId' in l) return l.diffId;
      throw new LayerdError(ErrorCodes.EBUSY, `snapshot ${this.byId(l.pendingDir)?.key ?? l.pendingDir}'s layer is still being ingested`, { snapshot: String(l.pendingDir) });
    });
  }

  /**
   * The layers of a committed snapshot's chain, base first, as a mount reads
   * them now: store layers, and the directories of pending snapshots whose
   * layers are still being ingested.
   */
  chainLayers(key: string | null): ChainLayer[] {
    const layers: ChainLayer[] = [];
    const seen = new Set<string>();
    for (let k = key; k !== null;) {
      if (seen.has(k)) throw new LayerdError(ErrorCodes.ECORRUPT, `snapshot parent chain loops at ${k}`, { snapshot: k });
      seen.add(k);
      const row = this.get(k);
      if (!row) throw new LayerdError(ErrorCodes.ECORRUPT, `snapshot ${k} is missing from its child's chain`, { snapshot: k });
      if (row.pending_ingest === 1) layers.push({ pendingDir: row.id });
      else if (row.diff_id === null) throw new LayerdError(ErrorCodes.ECORRUPT, `snapshot ${k} in a parent chain is not committed`, { snapshot: k });
      else layers.push({ diffId: row.diff_id });
      k = row.parent;
    }
    return layers.reverse();
  }

  byId(id: number): SnapshotRow | undefined {
    const row = this.db.db.prepare(`SELECT * FROM snapshots WHERE id = ?`).get(id) as SnapshotRow | undefined;
    return row === undefined ? undefined : reported(row);
  }
}

/** The row ids of a `lower_dirs` value (a JSON array; anything else reads as none). */
export function lowerDirIds(text: string | null): number[] {
  if (text === null) return [];
  try {
    const value = JSON.parse(text) as unknown;
    return Array.isArray(value) ? value.filter((v): v is number => Number.isSafeInteger(v)) : [];
  } catch {
    return [];
  }
}

export function parseLabels(text: string): Record<string, string> {
  try {
    const value = JSON.parse(text) as unknown;
    if (typeof value === 'object' && value !== null && !Array.isArray(value)) return value as Record<string, string>;
  } catch {
    // fall through
  }
  return {};
}

/**
 * Layers that committed snapshots use (store GC keeps them). Works on a
 * store whose snapshot table was never created.
 */
export function snapshotLayerRefs(db: MetadataDb): Set<Digest> {
  const exists = db.db.prepare(`SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'snapshots'`).get();
  if (!exists) return new Set();
  const rows = db.db.prepare(`SELECT DISTINCT diff_id AS d FROM snapshots WHERE diff_id IS NOT NULL`).all() as { d: Digest }[];
  return new Set(rows.map((r) => r.d));
}

/** Original layer blobs that committed snapshots were stored from (store GC keeps them, so a later pull or push of the image finds them). Works without the table. */
export function snapshotBlobRefs(db: MetadataDb): Set<Digest> {
  const exists = db.db.prepare(`SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'snapshots'`).get();
  if (!exists) return new Set();
  const have = (db.db.prepare(`PRAGMA table_info(snapshots)`).all() as { name: string }[]).some((c) => c.name === 'blob_digest');
  if (!have) return new Set();
  const rows = db.db.prepare(`SELECT DISTINCT blob_digest AS d FROM snapshots WHERE blob_digest IS NOT NULL`).all() as { d: Digest }[];
  return new Set(rows.map((r) => r.d));
}

/** Committed snapshots per layer (`layerctl layers` counts them as users). Works without the table. */
export function snapshotLayerUseCounts(db: MetadataDb): Map<Digest, number> {
  const exists = db.db.prepare(`SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'snapshots'`).get();
  if (!exists) return new Map();
  const rows = db.db.prepare(`SELECT diff_id AS d, COUNT(*) AS n FROM snapshots WHERE diff_id IS NOT NULL GROUP BY diff_id`).all() as { d: Digest; n: number }[];
  return new Map(rows.map((r) => [r.d, r.n]));
}

/** The chain ID of `diffId` on top of the chain `parentChain` (null: a base layer), as the OCI image spec defines it. */
export function chainIdOf(parentChain: Digest | null, diffId: Digest): Digest {
  return parentChain === null ? diffId : digestOf(`${parentChain} ${diffId}`);
}

/**
 * The store layer whose chain ID on top of `parentChain` is `target`, if the
 * store has one: a layer pulled or imported by layerd itself, which a
 * containerd unpack of the same image then shares instead of storing again.
 */
export function storeLayerForChain(db: MetadataDb, parentChain: Digest | null, target: Digest): Digest | undefined {
  if (parentChain === null) return db.getLayer(target) ? target : undefined;
  for (const { diff_id: d } of db.db.prepare(`SELECT diff_id FROM layers`).all() as { diff_id: Digest }[]) {
    if (chainIdOf(parentChain, d) === target) return d;
  }
  return undefined;
}

export interface IngestedLayerTar {
  diffId: Digest;
  /** Bytes of the uncompressed tar. */
  size: number;
  /** Bytes of regular-file content. */
  fileBytes: number;
  entries: number;
}

/**
 * Ingest an uncompressed OCI layer tar as a layer of the store with no image
 * (verified and indexed like any layer). `record` runs inside the write
 * transaction that makes the layer visible, so the rows that refer to it
 * appear in the same step. A layer the store already has is reused.
 */
export async function ingestLayerTar(
  store: Store, tarPath: string, record: (db: MetadataDb, layer: IngestedLayerTar) => void,
): Promise<IngestedLayerTar> {
  const workDir = await store.newWorkDir();
  try {
    const tx = new Transaction(store, workDir);
    const ingested = await tx.ingestLayerFile(tarPath, { storedBlob: true });
    if (ingested.compression !== 'none') {
      throw new LayerdError(ErrorCodes.EFORMAT, `${tarPath} is compressed; a plain layer tar was expected`, { path: tarPath });
    }
    const layer: IngestedLayerTar = {
      diffId: ingested.diffId, size: ingested.diffSize, fileBytes: ingested.fileBytes, entries: ingested.index?.entries.length ?? 0,
    };
    const existing = store.db.getLayer(ingested.diffId); // (then ingestLayerFile dropped the unpacked copy)
    if (existing) {
      layer.fileBytes = existing.file_bytes;
      layer.entries = existing.entries;
    }
    tx.stageLayer(ingested, MediaTypes.ociLayer);
    await commitStaged(store, workDir, tx, (db) => record(db, layer));
    return layer;
  } finally {
    await store.releaseWorkDir(workDir);
  }
}

/** Make the staged layers visible and record what uses them, in one database transaction. */
async function commitStaged(store: Store, workDir: string, tx: Transaction, record: (db: MetadataDb) => void): Promise<void> {
  await store.commit(workDir, tx.staged, (db) => {
    for (const [diffId, l] of tx.layers) db.putLayer({ diff_id: diffId, size: l.size, file_bytes: l.fileBytes, entries: l.entries });
    record(db);
  });
}

/**
 * Ingest a layer tar that `write` produces, as it is written: one pass that
 * hashes (the diffID), indexes and stores it, with no tar file in between
 * (a containerd snapshot's directory becomes a layer this way). Otherwise as
 * `ingestLayerTar`.
 */
export async function ingestLayerStream(
  store: Store, write: (out: Writable) => Promise<unknown>, record: (db: MetadataDb, layer: IngestedLayerTar) => void,
): Promise<IngestedLayerTar> {
  const workDir = await store.newWorkDir();
  try {
    const tx = new Transaction(store, workDir);
    const dir = tx.nextDir();
    const tar = new PassThrough({ highWaterMark: 1024 * 1024 });
    const written = write(tar).catch((err: unknown) => { tar.destroy(err as Error); throw err; });
    const ingesting = mkdir(dir).then(() => ingestLayer(async () => tar, {}, { workDir: dir, unpack: true, flushEarly: store.durable, disk: tx.disk }));
    const [w, i] = await Promise.allSettled([written, ingesting]);
    if (w.status === 'rejected') throw w.reason; // the writer's own error, not the broken stream it caused
    if (i.status === 'rejected') throw i.reason;
    const ingested = i.value;
    if (ingested.compression !== 'none') throw new LayerdError(ErrorCodes.EINTERNAL, 'a written layer tar read back as compressed');
    delete ingested.blobPath; // the layer keeps its tar as layer.tar; no separate blob
    const existing = store.db.getLayer(ingested.diffId);
    if (existing) {
      delete ingested.layerDir;
      delete ingested.index;
    }
    const layer: IngestedLayerTar = {
      diffId: ingested.diffId, size: ingested.diffSize,
      fileBytes: existing?.file_bytes ?? ingested.fileBytes, entries: existing?.entries ?? ingested.index?.entries.length ?? 0,
    };
    tx.stageLayer(ingested, MediaTypes.ociLayer);
    await commitStaged(store, workDir, tx, (db) => record(db, layer));
    return layer;
  } finally {
    await store.releaseWorkDir(workDir);
  }
}

/** A layer's original blob as its holder (containerd's content store) offers it: digest, size and diffID to verify it against. */
export interface OriginalBlob {
  digest: Digest;
  size: number;
  diffId: Digest;
  open(): Promise<Readable>;
}

export interface IngestedLayerBlob extends IngestedLayerTar {
  blobDigest: Digest;
}

/**
 * Ingest a layer from its original compressed blob, as a pull does: the
 * blob's digest and size and the layer's diffID are verified, the layer is
 * indexed, and the blob is kept in the store's blobs (a later pull of the
 * image then reads it from there, a push sends it as it is). `check` sees
 * the layer's index before anything is stored and may refuse it (throw).
 * `record` runs in the transaction that makes the layer visible.
 */
export async function ingestLayerBlob(
  store: Store, blob: OriginalBlob, check: (index: LayerIndex) => Promise<void>, record: (db: MetadataDb, layer: IngestedLayerBlob) => void,
): Promise<IngestedLayerBlob> {
  const workDir = await store.newWorkDir();
  try {
    const tx = new Transaction(store, workDir);
    const dir = tx.nextDir();
    await mkdir(dir);
    const stored = store.db.getBlob(blob.digest) !== undefined;
    const ingested = await ingestLayer(blob.open, { digest: blob.digest, size: blob.size, diffId: blob.diffId }, {
      workDir: dir, unpack: true, flushEarly: store.durable, disk: tx.disk,
      ...(stored ? { storedBlob: store.layout.blobPath(blob.digest) } : {}),
    });
    if (ingested.index === undefined) throw new LayerdError(ErrorCodes.EINTERNAL, `layer ${blob.digest} was not indexed`, { digest: blob.digest });
    await check(ingested.index);
    const entries = ingested.index.entries.length;
    const existing = store.db.getLayer(ingested.diffId);
    if (existing) {
      delete ingested.layerDir;
      delete ingested.index;
    }
    const layer: IngestedLayerBlob = {
      diffId: ingested.diffId, size: ingested.diffSize, blobDigest: ingested.digest,
      fileBytes: existing?.file_bytes ?? ingested.fileBytes, entries: existing?.entries ?? entries,
    };
    tx.stageLayer(ingested, layerMediaType(ingested.compression));
    await store.commit(workDir, tx.staged, (db) => {
      for (const [digest, b] of tx.blobs) if (!db.getBlob(digest)) db.putBlob({ digest, size: b.size, media_type: b.mediaType });
      for (const [diffId, l] of tx.layers) db.putLayer({ diff_id: diffId, size: l.size, file_bytes: l.fileBytes, entries: l.entries });
      record(db, layer);
    });
    return layer;
  } finally {
    await store.releaseWorkDir(workDir);
  }
}

/** Is this layer used by an image or a snapshot? (call inside a transaction) */
function layerInUse(db: MetadataDb, diffId: Digest): boolean {
  return db.db.prepare(`SELECT 1 FROM image_layers WHERE diff_id = ? LIMIT 1`).get(diffId) !== undefined
    || snapshotLayerRefs(db).has(diffId);
}

/**
 * Delete a layer that nothing uses any more (no image, no snapshot): the row
 * goes and the directory is moved aside in one write transaction, then
 * deleted. `blobDigest`, the original blob the layer was stored from, goes
 * with it when no image or snapshot refers to it. Returns whether the layer
 * was deleted.
 */
export async function removeLayerIfUnused(store: Store, diffId: Digest, blobDigest: Digest | null = null): Promise<boolean> {
  const workDir = await store.newWorkDir();
  try {
    return store.db.write(() => {
      if (blobDigest !== null && store.db.getBlob(blobDigest)
        && !store.db.referencedBlobs().has(blobDigest) && !snapshotBlobRefs(store.db).has(blobDigest)) {
        store.db.deleteBlob(blobDigest);
        renameSync(store.layout.blobPath(blobDigest), join(workDir, 'blob'));
      }
      if (!store.db.getLayer(diffId) || layerInUse(store.db, diffId)) return false;
      store.db.deleteLayer(diffId);
      renameSync(store.layout.layerDir(diffId), join(workDir, 'layer'));
      store.forgetLayerIndex(diffId);
      return true;
    });
  } finally {
    await store.releaseWorkDir(workDir);
  }
}
