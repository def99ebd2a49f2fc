/**
 * containerd snapshots on layerd: what the proxy snapshotter's gRPC calls do
 * (the gRPC glue is in server.ts; errors here are LayerdErrors, mapped to
 * gRPC codes there).
 *
 * - An active snapshot is a FUSE union mount of its parent chain's layers
 *   plus its own writable upper dir; a view is the same mount read-only.
 *   Both are served by detached `layerd mount` processes (mountServer.ts), so
 *   they outlive daemon restarts; Prepare/View/Mounts answer a `bind` mount
 *   of the mountpoint.
 * - Commit stops the mount, writes the upper dir as an OCI layer tar and
 *   ingests it as a store layer; the committed snapshot is that layer on top
 *   of the parent's chain.
 * - The remote path: a Prepare carrying `containerd.io/snapshot.ref` (the
 *   chain ID containerd's unpacker is about to create) and a label naming a
 *   layer the store already has registers that layer as a committed
 *   snapshot and answers ALREADY_EXISTS, so containerd does not unpack it.
 * - Only snapshots containerd created (or the remote path registered for
 *   it) are listed: containerd's GC removes what it does not know.
 */
import { createWriteStream } from 'node:fs';
import { lstat, mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Logger } from '../../common/log.js';
import { processAlive } from '../../common/process.js';
import { findMount } from '../../mount/deadMount.js';
import { directorySource, scanDirectory } from '../../mount/lowerDir.js';
import { type Digest, digestOf, isDigest } from '../../storage/digest.js';
import { LAYER_TAR } from '../../storage/layerIndex.js';
import { writeLayerTar } from '../../storage/layerWriter.js';
import {
  type SnapshotKind, type SnapshotRow, SnapshotTable, ingestLayerTar, parseLabels, removeLayerIfUnused, snapshotDir, snapshotsDir,
} from '../../storage/snapshots.js';
import { type Store } from '../../storage/store.js';
import { isServing, startMount, stopMount } from '../mountServer.js';
import { type Filter, matchAny, parseFilters } from './filters.js';

/** The label containerd's unpacker sets to the chain ID a Prepare is meant to produce. */
export const LABEL_SNAPSHOT_REF = 'containerd.io/snapshot.ref';
/** The remote path's layer labels, in the order they are tried: an uncompressed diffID… */
export const LABEL_LAYER_DIFFID = 'containerd.io/snapshot/layer.diffid';
/** …or the layer's distribution (compressed) digest, as CRI sets it. */
export const LABEL_CRI_LAYER_DIGEST = 'containerd.io/snapshot/cri.layer-digest';
/** Set by layerd on snapshots the remote path registered. */
export const LABEL_LAYERD_REMOTE = 'containerd.io/snapshot/layerd.remote';

export interface Mount {
  type: string;
  source: string;
  target: string;
  options: string[];
}

export interface SnapshotInfo {
  name: string;
  parent: string;
  kind: SnapshotKind;
  created: Date;
  updated: Date;
  labels: Record<string, string>;
}

export interface Usage {
  size: number;
  inodes: number;
}

export class SnapshotService {
  readonly table: SnapshotTable;
  /** Keys being created, committed or removed right now (a second change gets FAILED_PRECONDITION / ALREADY_EXISTS). */
  private readonly busy = new Set<string>();

  constructor(private readonly store: Store, private readonly logger: Logger) {
    this.table = new SnapshotTable(store.db);
  }

  // --- creating ----------------------------------------------------------------

  async prepare(key: string, parent: string, labels: Record<string, string>): Promise<Mount[]> {
    checkKey(key);
    if (labels[LABEL_SNAPSHOT_REF]) {
      const registered = await this.tryRemote(key, parent, labels);
      if (registered !== undefined) {
        throw new LayerdError(ErrorCodes.EEXIST, `target snapshot ${labels[LABEL_SNAPSHOT_REF]} already exists (${registered})`, { snapshot: key, target: registered });
      }
    }
    return this.create(key, parent, labels, 'active');
  }

  async view(key: string, parent: string, labels: Record<string, string>): Promise<Mount[]> {
    checkKey(key);
    return this.create(key, parent, labels, 'view');
  }

  private async create(key: string, parent: string, labels: Record<string, string>, kind: 'active' | 'view'): Promise<Mount[]> {
    if (this.busy.has(key) || this.table.get(key)) throw new LayerdError(ErrorCodes.EEXIST, `snapshot ${key} already exists`, { snapshot: key });
    const parentRow = this.committedParent(parent);
    const layers = this.table.chain(parentRow?.key ?? null);
    this.busy.add(key);
    let row: SnapshotRow | undefined;
    try {
      row = this.store.db.write(() => {
        const inserted = this.table.insert({
          key, kind, parent: parentRow?.key ?? null, labels: JSON.stringify(labels),
          diff_id: null, chain_id: null, upper: null, mountpoint: null, server_pid: null,
        });
        const dir = snapshotDir(this.store, inserted.id);
        this.table.setPaths(key, join(dir, 'upper'), join(dir, 'mnt'));
        return this.table.get(key)!;
      });
      await mkdir(row.upper!, { recursive: true, mode: 0o755 });
      await mkdir(row.mountpoint!, { recursive: true, mode: 0o755 });
      await this.startServer(row, layers);
      this.logger.info('snapshot prepared', { snapshot: key, kind, parent: parentRow?.key, layers: layers.length, mountpoint: row.mountpoint });
      return mountsOf(this.table.get(key)!);
    } catch (err) {
      if (row !== undefined) {
        const failed = row;
        this.store.db.write(() => this.table.delete(key));
        await rm(snapshotDir(this.store, failed.id), { recursive: true, force: true }).catch(() => undefined);
      }
      throw err;
    } finally {
      this.busy.delete(key);
    }
  }

  /** The parent named by a Prepare/View: '' = none; it must exist and be committed. */
  private committedParent(parent: string): SnapshotRow | undefined {
    if (parent === '') return undefined;
    const row = this.table.get(parent);
    if (!row) throw new LayerdError(ErrorCodes.ENOTFOUND, `parent snapshot ${parent} does not exist`, { snapshot: parent });
    if (row.kind !== 'committed') throw new LayerdError(ErrorCodes.EINVAL, `parent snapshot ${parent} is not committed`, { snapshot: parent });
    return row;
  }

  private async startServer(row: SnapshotRow, layers?: Digest[]): Promise<void> {
    const chain = layers ?? this.table.chain(row.parent);
    const served = await startMount({
      layers: chain.map((d) => this.store.layout.layerDir(d)),
      upper: row.upper!,
      mountpoint: row.mountpoint!,
      readOnly: row.kind === 'view',
      hostsDir: this.store.layout.hostsDir(),
      context: { snapshot: row.key },
    });
    this.store.db.write(() => this.table.setServer(row.key, served.pid));
  }

  /**
   * The remote path. Returns the name of the committed snapshot standing for
   * the target (registered now or earlier), or undefined when the layer is
   * not in the store (then containerd unpacks as usual).
   */
  private async tryRemote(key: string, parent: string, labels: Record<string, string>): Promise<string | undefined> {
    const target = labels[LABEL_SNAPSHOT_REF]!;
    const diffId = this.layerFromLabels(labels);
    if (diffId === undefined) return undefined;
    const parentRow = parent === '' ? undefined : this.table.get(parent);
    if (parent !== '' && (parentRow === undefined || parentRow.kind !== 'committed')) return undefined; // the normal path reports it
    // When both are known, the target must be the chain ID of parent + layer:
    // a label naming the wrong layer must not become a snapshot.
    const parentChain = parentRow === undefined ? null : parentRow.chain_id;
    const expected = parentRow === undefined ? diffId : parentChain === null ? undefined : digestOf(`${parentChain} ${diffId}`);
    if (isDigest(target) && expected !== undefined && expected !== target) {
      this.logger.warn('remote snapshot label does not match its chain; unpacking instead', { snapshot: key, target, expected, diffId });
      return undefined;
    }
    const chainId = expected !== undefined && expected === target ? expected : null;
    const existing = this.table.committedWithLabel(LABEL_SNAPSHOT_REF, target, parentRow?.key ?? null).find((r) => r.diff_id === diffId);
    if (existing) return existing.key;
    const name = this.table.get(target) === undefined && !this.busy.has(target) ? target : `layerd-remote/${randomHex()}/${target}`;
    this.store.db.write(() => {
      if (!this.store.db.getLayer(diffId)) throw new LayerdError(ErrorCodes.ENOTFOUND, `layer ${diffId} left the store`, { diffId });
      this.table.insert({
        key: name, kind: 'committed', parent: parentRow?.key ?? null,
        labels: JSON.stringify({ ...labels, [LABEL_LAYERD_REMOTE]: diffId }),
        diff_id: diffId, chain_id: chainId, upper: null, mountpoint: null, server_pid: null,
      });
    });
    this.logger.info('remote snapshot registered: no unpack needed', { snapshot: name, target, diffId, parent: parentRow?.key });
    return name;
  }

  /** The store layer a Prepare's labels name, if the store has it. */
  private layerFromLabels(labels: Record<string, string>): Digest | undefined {
    const diffId = labels[LABEL_LAYER_DIFFID];
    if (isDigest(diffId) && this.store.db.getLayer(diffId)) return diffId;
    const digest = labels[LABEL_CRI_LAYER_DIGEST];
    if (isDigest(digest)) {
      const row = this.store.db.db.prepare(`SELECT diff_id FROM image_layers WHERE blob_digest = ? LIMIT 1`).get(digest) as { diff_id: Digest } | undefined;
      if (row && this.store.db.getLayer(row.diff_id)) return row.diff_id;
      // An uncompressed layer's distribution digest is its diffID.
      if (this.store.db.getLayer(digest)) return digest;
    }
    return undefined;
  }

  // --- using -------------------------------------------------------------------

  async mounts(key: string): Promise<Mount[]> {
    const row = this.row(key);
    if (row.kind === 'committed') throw new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} is committed: it has no mounts`, { snapshot: key });
    if (!this.busy.has(key) && (row.server_pid === null || !processAlive(row.server_pid))) {
      // Its server died (and no restart has noticed yet): serve it again.
      await stopMount(null, row.mountpoint!);
      await this.startServer(row);
      this.logger.warn('snapshot mount served again', { snapshot: key });
    }
    return mountsOf(row);
  }

  stat(key: string): SnapshotInfo {
    return infoOf(this.row(key));
  }

  /** Change the labels (the only mutable field); `paths` as containerd's field mask. */
  update(info: { name: string; labels: Record<string, string> }, paths: readonly string[]): SnapshotInfo {
    const row = this.row(info.name);
    let labels = parseLabels(row.labels);
    if (paths.length === 0) {
      labels = { ...info.labels };
    } else {
      for (const path of paths) {
        if (path === 'labels') { labels = { ...info.labels }; continue; }
        if (path.startsWith('labels.')) {
          const k = path.slice('labels.'.length);
          const v = info.labels[k];
          if (v === undefined || v === '') delete labels[k];
          else labels[k] = v;
          continue;
        }
        throw new LayerdError(ErrorCodes.EINVAL, `cannot update ${JSON.stringify(path)} field on snapshot ${info.name}`, { snapshot: info.name, field: path });
      }
    }
    for (const [k, v] of Object.entries(labels)) if (v === '') delete labels[k];
    this.store.db.write(() => this.table.setLabels(row.key, labels));
    return infoOf(this.table.get(row.key)!);
  }

  list(filterTexts: readonly string[]): SnapshotInfo[] {
    const filters: Filter[] = parseFilters(filterTexts);
    return this.table.list().map(infoOf).filter((info) => matchAny(filters, (path) => fieldOf(info, path)));
  }

  async usage(key: string): Promise<Usage> {
    const row = this.row(key);
    if (row.kind === 'committed') {
      const layer = this.store.db.getLayer(row.diff_id!);
      return { size: layer?.file_bytes ?? 0, inodes: layer?.entries ?? 0 };
    }
    return diskUsage(row.upper!);
  }

  // --- committing and removing -------------------------------------------------

  async commit(name: string, key: string, labels: Record<string, string>): Promise<void> {
    checkKey(name);
    const row = this.row(key);
    if (row.kind !== 'active') throw new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} is not active`, { snapshot: key });
    if (this.busy.has(key)) throw new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} is busy`, { snapshot: key });
    if (this.busy.has(name) || this.table.get(name)) throw new LayerdError(ErrorCodes.EEXIST, `snapshot ${name} already exists`, { snapshot: name });
    this.busy.add(key);
    this.busy.add(name);
    const dir = snapshotDir(this.store, row.id);
    try {
      // The mount stops first: everything written through it is in the upper dir.
      await stopMount(row.server_pid, row.mountpoint!);
      this.store.db.write(() => this.table.setServer(key, null));
      try {
        const workDir = await this.store.newWorkDir();
        try {
          const tar = join(workDir, LAYER_TAR);
          const scanned = await scanDirectory(row.upper!, `snapshot:${key}`);
          await writeLayerTar(directorySource(scanned), createWriteStream(tar, { mode: 0o600 }));
          // The committed row appears, and the active one goes, in the transaction that adds the layer.
          await ingestLayerTar(this.store, tar, (_db, layer) => {
            if (this.table.get(name)) throw new LayerdError(ErrorCodes.EEXIST, `snapshot ${name} already exists`, { snapshot: name });
            this.table.insert({
              key: name, kind: 'committed', parent: row.parent, labels: JSON.stringify(labels),
              diff_id: layer.diffId, chain_id: null, upper: null, mountpoint: null, server_pid: null,
            });
            this.table.delete(key);
          });
        } finally {
          await this.store.releaseWorkDir(workDir);
        }
      } catch (err) {
        // Still active: serve it again so the caller can go on using it.
        const still = this.table.get(key);
        if (still) {
          await this.startServer(still).catch((e: unknown) => this.logger.error('could not serve a snapshot again after a failed commit', { snapshot: key, error: String(e) }));
        }
        throw err;
      }
      await rm(dir, { recursive: true, force: true });
      this.logger.info('snapshot committed', { snapshot: name, from: key });
    } finally {
      this.busy.delete(key);
      this.busy.delete(name);
    }
  }

  async remove(key: string): Promise<void> {
    const row = this.row(key);
    if (this.busy.has(key)) throw new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} is busy`, { snapshot: key });
    const children = this.table.children(key);
    if (children.length > 0) {
      throw new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} has ${children.length} child snapshot(s), e.g. ${children[0]!.key}`, { snapshot: key });
    }
    this.busy.add(key);
    try {
      if (row.kind === 'committed') {
        this.store.db.write(() => this.table.delete(key));
        const deleted = await removeLayerIfUnused(this.store, row.diff_id!);
        this.logger.info('snapshot removed', { snapshot: key, kind: row.kind, layerDeleted: deleted });
        return;
      }
      await stopMount(row.server_pid, row.mountpoint!);
      this.store.db.write(() => this.table.delete(key));
      await rm(snapshotDir(this.store, row.id), { recursive: true, force: true });
      this.logger.info('snapshot removed', { snapshot: key, kind: row.kind });
    } finally {
      this.busy.delete(key);
    }
  }

  /** Remove what no snapshot owns: directories under snapshots/ without a row (and their mounts). */
  async cleanup(): Promise<string[]> {
    const owned = new Set(this.table.list().map((r) => String(r.id)));
    const removed: string[] = [];
    const names = await readdir(snapshotsDir(this.store)).catch(() => [] as string[]);
    for (const name of names) {
      if (owned.has(name) || !/^\d+$/.test(name)) continue;
      // A row being created right now already has its id; its directory is not an orphan.
      if ([...this.busy].some((k) => String(this.table.get(k)?.id) === name)) continue;
      const dir = join(snapshotsDir(this.store), name);
      if (await findMount(join(dir, 'mnt'))) await stopMount(null, join(dir, 'mnt'));
      await rm(dir, { recursive: true, force: true });
      removed.push(dir);
    }
    if (removed.length > 0) this.logger.info('snapshot cleanup', { removed: removed.length });
    return removed;
  }

  // --- daemon start and stop ---------------------------------------------------

  /** On daemon start: keep mounts whose server still runs, serve again those whose server died. */
  async adoptAll(): Promise<{ adopted: string[]; remounted: string[] }> {
    const adopted: string[] = [];
    const remounted: string[] = [];
    for (const row of this.table.list()) {
      if (row.kind === 'committed') continue;
      if (row.server_pid !== null && await isServing({ pid: row.server_pid, mountpoint: row.mountpoint! })) {
        adopted.push(row.key);
        continue;
      }
      try {
        // (a mount host serves other mounts too: it is asked to let go of this one, never killed)
        await stopMount(row.server_pid, row.mountpoint!);
        await mkdir(row.upper!, { recursive: true, mode: 0o755 });
        await mkdir(row.mountpoint!, { recursive: true });
        await this.startServer(row);
        remounted.push(row.key);
      } catch (err) {
        this.logger.error('could not serve a snapshot again', { snapshot: row.key, error: (err as Error).message });
        this.store.db.write(() => this.table.setServer(row.key, null));
      }
    }
    if (adopted.length + remounted.length > 0) this.logger.info('snapshots restored', { adopted: adopted.length, remounted: remounted.length });
    // what an interrupted Commit or Remove left behind
    await this.cleanup().catch((err: unknown) => this.logger.warn('snapshot cleanup failed', { error: String(err) }));
    return { adopted, remounted };
  }

  /** Stop serving every snapshot mount (daemon stop with --unmount-on-stop). */
  async unmountAll(): Promise<void> {
    for (const row of this.table.list()) {
      if (row.kind === 'committed') continue;
      await stopMount(row.server_pid, row.mountpoint!);
      this.store.db.write(() => this.table.setServer(row.key, null));
    }
  }

  private row(key: string): SnapshotRow {
    const row = this.table.get(key);
    if (!row) throw new LayerdError(ErrorCodes.ENOTFOUND, `snapshot ${key} does not exist`, { snapshot: key });
    return row;
  }
}

function checkKey(key: string): void {
  if (typeof key !== 'string' || key === '') throw new LayerdError(ErrorCodes.EINVAL, 'a snapshot key must not be empty');
  if (key.includes('\0')) throw new LayerdError(ErrorCodes.EINVAL, 'a snapshot key must not contain NUL', { snapshot: key.replace(/\0/g, '\\0') });
}

function mountsOf(row: SnapshotRow): Mount[] {
  return [{ type: 'bind', source: row.mountpoint!, target: '', options: ['rbind', row.kind === 'view' ? 'ro' : 'rw'] }];
}

function infoOf(row: SnapshotRow): SnapshotInfo {
  return {
    name: row.key, parent: row.parent ?? '', kind: row.kind,
    created: new Date(row.created_at), updated: new Date(row.updated_at), labels: parseLabels(row.labels),
  };
}

/** The fields containerd's snapshot filters know: kind, name, parent, labels.<key>. */
function fieldOf(info: SnapshotInfo, path: string[]): { value: string; present: boolean } {
  switch (path[0]) {
    case 'kind': return { value: info.kind, present: true };
    case 'name': return { value: info.name, present: true };
    case 'parent': return { value: info.parent, present: true };
    case 'labels': {
      const v = info.labels[path.slice(1).join('.')];
      return v === undefined ? { value: '', present: false } : { value: v, present: true };
    }
    default: return { value: '', present: false };
  }
}

/** Disk usage of a directory tree as containerd counts it: allocated bytes and inodes, each inode once. */
async function diskUsage(dir: string): Promise<Usage> {
  const seen = new Set<string>();
  let size = 0;
  const walk = async (path: string): Promise<void> => {
    const st = await lstat(path, { bigint: false });
    const id = `${st.dev}:${st.ino}`;
    if (!seen.has(id)) {
      seen.add(id);
      size += st.blocks * 512;
    }
    if (st.isDirectory()) {
      for (const name of await readdir(path)) await walk(join(path, name));
    }
  };
  await walk(dir).catch((err: unknown) => {
    throw new LayerdError(ErrorCodes.EIO, `cannot measure ${dir}: ${(err as Error).message}`, { path: dir }, { cause: err });
  });
  return { size, inodes: seen.size };
}

function randomHex(): string {
  return [...crypto.getRandomValues(new Uint8Array(4))].map((b) => b.toString(16).padStart(2, '0')).join('');
}
