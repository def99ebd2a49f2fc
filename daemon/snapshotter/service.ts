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
 * - Commit stops the mount and turns the upper dir into a store layer in one
 *   pass (written as a layer tar straight into the ingest); the committed
 *   snapshot is that layer on top of the parent's chain.
 * - An unpack snapshot (containerd prepares it only to apply a layer, see
 *   unpack.ts) is not mounted at all: containerd writes the layer into its
 *   directory itself, and Commit keeps the layer the store already has for
 *   its chain ID (pulled by layerd, or committed in another containerd
 *   namespace) or else answers at once and turns the directory into a layer
 *   in the background (a daemon killed meanwhile does it at its next start).
 *   A FUSE mount on top does not wait for it: it reads the directory itself
 *   as a lower layer, and the directory stays until no mount reads it.
 * - The remote path: a Prepare carrying `containerd.io/snapshot.ref` (the
 *   chain ID containerd's unpacker is about to create) and a label naming a
 *   layer the store already has — or one a layer source fetches from the
 *   registry (registryLayers.ts) — registers that layer as a committed
 *   snapshot and answers ALREADY_EXISTS, so containerd does not unpack it.
 * - Only snapshots containerd created (or the remote path registered for
 *   it) are listed: containerd's GC removes what it does not know.
 */
import { access, lstat, mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Logger } from '../../common/log.js';
import { processAlive, sleep } from '../../common/process.js';
import { findMount } from '../../mount/deadMount.js';
import { writeDirectoryScan } from '../../mount/directoryScan.js';
import { scanDirectory, type ScannedDirectory } from '../../mount/lowerDir.js';
import { convertOciUpper } from '../../mount/upperMigration.js';
import { type Digest, isDigest } from '../../storage/digest.js';
import {
  type SnapshotKind, type SnapshotRow, SnapshotTable, chainIdOf, ingestLayerBlob, lowerDirIds, parseLabels, removeLayerIfUnused, snapshotDir, snapshotsDir, storeLayerForChain,
} from '../../storage/snapshots.js';
import { type Store } from '../../storage/store.js';
import { HostMountsCache, isServing, preloadLayers, startMount, stopMount } from '../mountServer.js';
import { type OriginalLayerSource } from './containerdContent.js';
import { fileTableDifference } from './fileTable.js';
import { type Filter, matchAny, parseFilters } from './filters.js';
import { MountWarmer } from './mountWarmer.js';
import { LABEL_SNAPSHOT_REF, directoryToLayer, namespaceOf, unpackMounts, unpackTargetOf } from './unpack.js';

export { LABEL_SNAPSHOT_REF } from './unpack.js';
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

/** What a layer source is asked for: the layer that gives chain ID `target` on top of `parentChain`. */
export interface LayerRequest {
  target: Digest;
  parentChain: Digest | null;
  namespace: string | undefined;
  /** The Prepare's labels (containerd passes those under `containerd.io/snapshot/`). */
  labels: Readonly<Record<string, string>>;
}

/**
 * Where the layer of a chain ID may come from when the store does not have
 * it yet: a source that fetches it itself (registryLayers.ts) puts it into
 * the store and returns its diffID, which must give `target` on top of
 * `parentChain` (the caller checks). Undefined: not this source's.
 */
export interface ChainLayerSource {
  layerFor(request: LayerRequest): Promise<Digest | undefined>;
}

export interface SnapshotServiceOptions {
  /**
   * Consulted in order by a labelled Prepare (the remote path) when the store
   * has no layer for its chain: a layer one provides is registered as the
   * committed snapshot, and containerd downloads and unpacks nothing.
   */
  layerSources?: ChainLayerSource[];
  /**
   * Where the original blob of a layer containerd unpacked may be found
   * (containerd's content store): a committed unpack snapshot's layer is
   * stored from it, with the image's own diffID, instead of from its
   * directory.
   */
  originalLayers?: OriginalLayerSource;
  /**
   * Test hook: while this file exists, background ingests wait before they
   * start (default $LAYERD_TEST_INGEST_GATE), so a test can hold layers
   * pending for as long as it needs, not for as long as it is lucky.
   */
  ingestGate?: string;
  /**
   * Bench hook: where each snapshot mount's FUSE operation statistics are
   * written (`<dir>/<snapshot id>.json`, by its mount host; default
   * $LAYERD_SNAPSHOT_STATS_DIR, else none), so a benchmark can tell what a
   * container's reads cost (bench/containerdPhases.ts).
   */
  statsDir?: string;
}

/** Background ingests of unpacked layers at once: one, so containerd applying the next layer keeps the other core (2 measured no better, docs/performance.md). */
const INGEST_CONCURRENCY = 1;
/** How often dead snapshot mount hosts are looked for while the daemon runs. */
const SUPERVISE_MS = 2_000;
/** A snapshot directory holds this mark once its upper is in the overlayfs format (older ones are converted at their next mount). */
const UPPER_FORMAT_MARK = 'upper-format';
/** A pending snapshot's directory holds the daemon's walk of its unpack directory here (mount/directoryScan.ts). */
const SCAN_FILE = 'upper.scan.json';
/** How often a held ingest looks at its gate again (test hook only). */
const GATE_POLL_MS = 50;
/**
 * A background ingest starts once containerd has left layerd alone this long
 * (no Prepare, View or Commit) and no unpack is in progress: on a small
 * machine it would otherwise take a core from the unpack of the next layer
 * and from the containers started right after a pull, which read the pending
 * directories meanwhile and need no layer. It starts anyway INGEST_MAX_DEFER_MS
 * after its commit, and at once when something waits for the layer.
 */
const INGEST_QUIET_MS = 1_000;
/** Parents of recent containers whose chains are preloaded once ingested (SnapshotService.recentParents). */
const RECENT_PARENTS_KEPT = 8;
const INGEST_MAX_DEFER_MS = 30_000;
const INGEST_QUIET_POLL_MS = 100;

export class SnapshotService {
  readonly table: SnapshotTable;
  /** Keys being created, committed or removed right now (a second change gets FAILED_PRECONDITION / ALREADY_EXISTS). */
  private readonly busy = new Set<string>();
  private supervisor: NodeJS.Timeout | undefined;
  private reviving: Promise<void> | undefined;
  /** Background ingests of committed unpack snapshots, by row id; at most INGEST_CONCURRENCY run at once, in commit order. */
  private readonly ingests = new Map<number, Promise<Digest>>();
  /**
   * The walk of each pending snapshot's unpack directory, made at its Commit
   * (the directory is final then), by row id: the mount of a first container
   * on the pending layers reads it from the scan file instead of walking the
   * directory on its critical path, and the ingest reuses it. Undefined: the
   * walk failed (the host and the ingest then walk themselves).
   */
  private readonly scans = new Map<number, Promise<ScannedDirectory | undefined>>();
  private ingestsRunning = 0;
  private readonly ingestsWaiting: (() => void)[] = [];
  private stopping = false;
  /** When containerd last asked for a snapshot to be made or committed (Date.now()). */
  private lastActivity = 0;
  /** Callers waiting for a background ingest right now (then none is deferred). */
  private waitingForIngest = 0;
  /** Snapshot directories being deleted in the background (Cleanup leaves them to that). */
  private readonly removing = new Set<string>();
  private readonly ingestGate: string | undefined;
  private readonly statsDir: string | undefined;
  /** Warms a container's new mount with what the last one of its image read at start (mountWarmer.ts). */
  private readonly warmer: MountWarmer;
  /**
   * On by default: on a quiet machine it takes later runs from 1.30–1.37× of
   * overlayfs to 1.20–1.27× (on 2 busy cores it only moved the round trips
   * into the container's start; docs/performance.md). LAYERD_SNAPSHOT_WARMUP=0
   * turns it off.
   */
  private readonly warmUp = process.env['LAYERD_SNAPSHOT_WARMUP'] !== '0';
  /**
   * Parents of the last containers mounted (most recent last), and the layers
   * each was last preloaded with: when the ingest of a chain's last pending
   * layer ends, its host loads the stored layers before the next container
   * asks for them (`preloadChains`).
   */
  private readonly recentParents = new Map<string, string>();

  constructor(private readonly store: Store, private readonly logger: Logger, private readonly options: SnapshotServiceOptions = {}) {
    this.table = new SnapshotTable(store.db);
    this.warmer = new MountWarmer(logger);
    this.ingestGate = options.ingestGate ?? (process.env['LAYERD_TEST_INGEST_GATE'] || undefined);
    this.statsDir = options.statsDir ?? (process.env['LAYERD_SNAPSHOT_STATS_DIR'] || undefined);
  }

  // --- creating ----------------------------------------------------------------

  async prepare(key: string, parent: string, labels: Record<string, string>): Promise<Mount[]> {
    checkKey(key);
    // Only a labelled Prepare may be answered ALREADY_EXISTS: containerd then
    // looks the target up by that label. (image.Unpack sends no label and on
    // ALREADY_EXISTS would try new keys for ever.)
    if (labels[LABEL_SNAPSHOT_REF]) {
      const registered = await this.tryRemote(key, parent, labels);
      if (registered !== undefined) {
        throw new LayerdError(ErrorCodes.EEXIST, `target snapshot ${labels[LABEL_SNAPSHOT_REF]} already exists (${registered})`, { snapshot: key, target: registered });
      }
    }
    const target = unpackTargetOf(key, labels);
    return this.create(key, parent, labels, 'active', target);
  }

  async view(key: string, parent: string, labels: Record<string, string>): Promise<Mount[]> {
    checkKey(key);
    return this.create(key, parent, labels, 'view');
  }

  private async create(key: string, parent: string, labels: Record<string, string>, kind: 'active' | 'view', unpackTarget?: Digest): Promise<Mount[]> {
    if (this.busy.has(key) || this.table.get(key)) throw new LayerdError(ErrorCodes.EEXIST, `snapshot ${key} already exists`, { snapshot: key });
    // (A FUSE mount does not wait for layers still being ingested: it reads their directories, startServer.)
    const parentRow = this.committedParent(parent);
    const started = performance.now();
    this.lastActivity = Date.now();
    this.busy.add(key);
    let row: SnapshotRow | undefined;
    try {
      row = this.store.db.write(() => {
        const inserted = this.table.insert({
          key, kind, parent: parentRow?.key ?? null, labels: JSON.stringify(labels),
          diff_id: null, chain_id: null, upper: null, mountpoint: null, server_pid: null, unpack_target: unpackTarget ?? null,
        });
        const dir = snapshotDir(this.store, inserted.id);
        this.table.setPaths(key, join(dir, 'upper'), join(dir, 'mnt'));
        return this.table.get(key)!;
      });
      const dir = snapshotDir(this.store, row.id);
      await mkdir(row.upper!, { recursive: true, mode: 0o755 });
      await writeFile(join(dir, UPPER_FORMAT_MARK), 'overlay\n', { mode: 0o600 });
      if (unpackTarget !== undefined) {
        // No mount: containerd writes the layer into the directory itself.
        await mkdir(join(dir, 'work'), { mode: 0o700 });
        await mkdir(join(dir, 'lower'), { mode: 0o755 });
        this.logger.info('unpack snapshot prepared', { snapshot: key, target: unpackTarget, parent: parentRow?.key, upper: row.upper });
        return this.mountsOf(row);
      }
      await mkdir(row.mountpoint!, { recursive: true, mode: 0o755 });
      if (parentRow !== undefined) {
        const preloaded = this.recentParents.get(parentRow.key) ?? '';
        this.recentParents.delete(parentRow.key);
        this.recentParents.set(parentRow.key, preloaded);
        if (this.recentParents.size > RECENT_PARENTS_KEPT) this.recentParents.delete(this.recentParents.keys().next().value!);
      }
      const layers = await this.startServer(row);
      if (this.warmUp) void this.warmer.start(key, this.warmChainOf(row), row.mountpoint!);
      this.logger.info('snapshot prepared', { snapshot: key, kind, parent: parentRow?.key, ...layers, mountpoint: row.mountpoint, ms: Math.round(performance.now() - started) });
      return this.mountsOf(this.table.get(key)!);
    } catch (err) {
      if (row !== undefined) {
        const failed = row;
        const readDirs = lowerDirIds(this.table.get(key)?.lower_dirs ?? null);
        this.store.db.write(() => this.table.delete(key));
        this.releaseLowerDirs(readDirs);
        await rm(snapshotDir(this.store, failed.id), { recursive: true, force: true }).catch(() => undefined);
      }
      throw err;
    } finally {
      this.busy.delete(key);
    }
  }

  /**
   * What a mount's accesses are recorded and repeated under (mountWarmer.ts):
   * its parent's chain ID where known — the same image in every containerd
   * namespace, and before and after its layers are ingested —, else the parent.
   */
  private warmChainOf(row: SnapshotRow): string {
    if (row.parent === null) return '';
    return this.mountChainId(row) ?? row.parent;
  }

  /** The chain ID of the layers a snapshot mounts (its parent's), where known. */
  private mountChainId(row: SnapshotRow): string | undefined {
    return row.parent === null ? undefined : this.table.get(row.parent)?.chain_id ?? undefined;
  }

  /** Stop a mount (after its warm-up), keeping what its start-up read for the next mount of its image. */
  private async stopServed(row: SnapshotRow): Promise<void> {
    await this.warmer.stop(row.key);
    this.warmer.remember(this.warmChainOf(row), await stopMount(row.server_pid, row.mountpoint!));
  }

  /** The parent named by a Prepare/View: '' = none; it must exist and be committed. */
  private committedParent(parent: string): SnapshotRow | undefined {
    if (parent === '') return undefined;
    const row = this.table.get(parent);
    if (!row) throw new LayerdError(ErrorCodes.ENOTFOUND, `parent snapshot ${parent} does not exist`, { snapshot: parent });
    if (row.kind !== 'committed') throw new LayerdError(ErrorCodes.EINVAL, `parent snapshot ${parent} is not committed`, { snapshot: parent });
    return row;
  }

  /**
   * Serve `row`'s mount over its parent chain as it is now: store layers,
   * and — for the layers still being ingested (the first `ctr run` right
   * after a pull) — the unpack directories containerd wrote, read as plain
   * lower directories (whiteouts as 0/0 devices, opaque xattrs), so the
   * mount waits for no ingest. The row records which directories it reads
   * (`lower_dirs`) before the mount starts, so an ingest ending meanwhile
   * keeps them; directories it read before and reads no more are released.
   */
  private async startServer(row: SnapshotRow): Promise<{ layers: number; pendingDirs: number; walkedDirs?: number; mountMs: number }> {
    await this.convertUpperIfOld(row);
    const previous = lowerDirIds(this.table.get(row.key)?.lower_dirs ?? null);
    const chain = this.table.chainLayers(row.parent);
    const dirIds = chain.flatMap((l) => ('pendingDir' in l ? [l.pendingDir] : []));
    // (one database commit, an fsync, fewer on the path of every `ctr run` when nothing changes)
    if (dirIds.length + previous.length > 0) this.store.db.write(() => this.table.setLowerDirs(row.key, dirIds));
    const mounting = performance.now();
    const directoryScans = await this.scanFilesOf(dirIds);
    const served = await startMount({
      // A layer layerd pulled lazily is served lazily here too (storage/lazy/).
      layers: chain.map((l) => ('diffId' in l ? this.store.layerDirFor(l.diffId) : this.pendingDirOf(l.pendingDir))),
      directories: dirIds.map((id) => this.pendingDirOf(id)),
      directoryScans,
      upper: row.upper!,
      mountpoint: row.mountpoint!,
      readOnly: row.kind === 'view',
      ...(this.statsDir !== undefined ? { statsFile: join(this.statsDir, `${row.id}.json`) } : {}),
      hostsDir: this.store.layout.hostsDir(),
      context: { snapshot: row.key },
      ...(this.warmUp ? { record: true } : {}),
      // One host per image chain, before and after its layers are ingested (its JIT, indexes and merges stay warm).
      ...(this.mountChainId(row) !== undefined ? { hostKey: `chain:${this.mountChainId(row)!}` } : {}),
    });
    const mountMs = Math.round(performance.now() - mounting);
    // (no fsync: after a power failure no server runs, and restore finds mounts by mountpoint)
    this.store.db.writeUnsynced(() => this.table.setServer(row.key, served.pid));
    this.releaseLowerDirs(previous.filter((id) => !dirIds.includes(id)));
    return { layers: chain.length, pendingDirs: dirIds.length, ...(dirIds.length > 0 ? { walkedDirs: served.walkedDirectories ?? dirIds.length } : {}), mountMs };
  }

  /** The directory containerd unpacked a pending snapshot's layer into (by row id). */
  private pendingDirOf(id: number): string {
    return join(snapshotDir(this.store, id), 'upper');
  }

  /**
   * Delete the directories of these committed snapshots (row ids) that are
   * needed no more: layer stored (or the row gone) and no mount reading them.
   */
  private releaseLowerDirs(ids: readonly number[]): void {
    if (ids.length === 0) return;
    const inUse = this.table.lowerDirsInUse();
    for (const id of ids) {
      if (this.table.byId(id)?.pending_ingest === 1 || inUse.has(id)) continue; // its ingest or its last reader releases it
      this.removeDir(snapshotDir(this.store, id));
    }
  }

  /** An upper written before the overlayfs format (`.wh.` files) is converted, with the meaning it had, before it is mounted. */
  private async convertUpperIfOld(row: SnapshotRow): Promise<void> {
    const mark = join(snapshotDir(this.store, row.id), UPPER_FORMAT_MARK);
    if (await access(mark).then(() => true, () => false)) return;
    await mkdir(row.upper!, { recursive: true, mode: 0o755 });
    const converted = convertOciUpper(row.upper!);
    await writeFile(mark, 'overlay\n', { mode: 0o600 });
    this.logger.info('snapshot upper converted to the overlayfs format', { snapshot: row.key, ...converted });
  }

  /** The mounts containerd gets for an active or view snapshot. */
  private mountsOf(row: SnapshotRow): Mount[] {
    if (row.unpack_target !== null) {
      const dir = snapshotDir(this.store, row.id);
      return unpackMounts({ upper: row.upper!, work: join(dir, 'work'), lower: join(dir, 'lower') });
    }
    return [{ type: 'bind', source: row.mountpoint!, target: '', options: ['rbind', row.kind === 'view' ? 'ro' : 'rw'] }];
  }

  /**
   * The layer the store already has for chain ID `target` on top of
   * `parentRow`: a store layer (pulled or imported by layerd) whose chain on
   * the parent's chain is `target` — it has the very diffID the image names —,
   * else the one a committed snapshot of that chain holds (committed in any
   * containerd namespace).
   */
  private knownLayerForChain(target: Digest, parentRow: SnapshotRow | undefined): Digest | undefined {
    const parentKnown = parentRow === undefined || parentRow.chain_id !== null;
    const stored = parentKnown ? storeLayerForChain(this.store.db, parentRow?.chain_id ?? null, target) : undefined;
    return stored ?? this.table.committedWithChain(target).find((r) => r.diff_id !== null)?.diff_id ?? undefined;
  }

  /**
   * The remote path. Returns the name of the committed snapshot standing for
   * the target (registered now or earlier), or undefined when the layer is
   * not in the store (then containerd unpacks as usual).
   */
  private async tryRemote(key: string, parent: string, labels: Record<string, string>): Promise<string | undefined> {
    const target = labels[LABEL_SNAPSHOT_REF]!;
    const parentRow = parent === '' ? undefined : this.table.get(parent);
    if (parent !== '' && (parentRow === undefined || parentRow.kind !== 'committed')) return undefined; // the normal path reports it
    let diffId = this.layerFromLabels(labels);
    let chainId: Digest | null;
    if (diffId !== undefined) {
      // When both are known, the target must be the chain ID of parent + layer:
      // a label naming the wrong layer must not become a snapshot.
      const parentChain = parentRow === undefined ? null : parentRow.chain_id;
      const expected = parentRow === undefined ? diffId : parentChain === null ? undefined : chainIdOf(parentChain, diffId);
      if (isDigest(target) && expected !== undefined && expected !== target) {
        this.logger.warn('remote snapshot label does not match its chain; unpacking instead', { snapshot: key, target, expected, diffId });
        return undefined;
      }
      chainId = expected !== undefined && expected === target ? expected : null;
    } else {
      // No label naming a stored layer: a layer the store already holds for exactly this
      // chain, else one a layer source fetches (containerd then downloads nothing).
      if (!isDigest(target)) return undefined;
      diffId = this.knownLayerForChain(target, parentRow) ?? await this.layerFromSources(key, target, parentRow, labels);
      if (diffId === undefined) return undefined;
      chainId = target;
    }
    const existing = this.table.committedWithLabel(LABEL_SNAPSHOT_REF, target, parentRow?.key ?? null).find((r) => r.diff_id === diffId);
    if (existing) return existing.key;
    const name = this.table.get(target) === undefined && !this.busy.has(target) ? target : `layerd-remote/${randomHex()}/${target}`;
    this.store.db.write(() => {
      if (!this.store.db.getLayer(diffId)) throw new LayerdError(ErrorCodes.ENOTFOUND, `layer ${diffId} left the store`, { diffId });
      this.table.insert({
        key: name, kind: 'committed', parent: parentRow?.key ?? null,
        labels: JSON.stringify({ ...labels, [LABEL_LAYERD_REMOTE]: diffId }),
        diff_id: diffId!, chain_id: chainId, upper: null, mountpoint: null, server_pid: null,
      });
    });
    this.logger.info('remote snapshot registered: no unpack needed', { snapshot: name, target, diffId, parent: parentRow?.key });
    return name;
  }

  /**
   * Ask the layer sources for the layer of chain `target` on `parentRow`; a
   * layer is taken only if its diffID gives `target` (a source whose labels
   * lied, or a registry serving another layer under a tag, gives nothing).
   */
  private async layerFromSources(key: string, target: Digest, parentRow: SnapshotRow | undefined, labels: Record<string, string>): Promise<Digest | undefined> {
    const parentChain = parentRow === undefined ? null : parentRow.chain_id;
    if (parentRow !== undefined && parentChain === null) return undefined; // a layer could not be checked against an unknown chain
    for (const source of this.options.layerSources ?? []) {
      const found = await source.layerFor({ target, parentChain, namespace: namespaceOf(key), labels }).catch((err: unknown) => {
        this.logger.warn('a layer source failed; containerd unpacks the layer itself', { snapshot: key, target, error: String(err) });
        return undefined;
      });
      if (found === undefined) continue;
      if (chainIdOf(parentChain, found) !== target) {
        this.logger.warn('a layer source gave a layer of another chain; containerd unpacks the layer itself', { snapshot: key, target, diffId: found, parentChain });
        continue;
      }
      if (this.store.db.getLayer(found)) return found;
    }
    return undefined;
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
    if (row.unpack_target === null && !this.busy.has(key) && (row.server_pid === null || !processAlive(row.server_pid))) {
      // Its server died (and the supervisor has not served it again yet): serve it again now.
      await this.serveAgain(row);
    }
    return this.mountsOf(row);
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
    if (row.kind === 'committed' && row.pending_ingest === 1) return diskUsage(row.upper!);
    if (row.kind === 'committed') {
      const layer = this.store.db.getLayer(row.diff_id!);
      return { size: layer?.file_bytes ?? 0, inodes: layer?.entries ?? 0 };
    }
    return diskUsage(row.upper!);
  }

  // --- committing and removing -------------------------------------------------

  /** `namespace`: the containerd namespace of the call (its gRPC metadata), if it named one. */
  async commit(name: string, key: string, labels: Record<string, string>, namespace?: string): Promise<void> {
    checkKey(name);
    const row = this.row(key);
    if (row.kind !== 'active') throw new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} is not active`, { snapshot: key });
    if (this.busy.has(key)) throw new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} is busy`, { snapshot: key });
    if (this.busy.has(name) || this.table.get(name)) throw new LayerdError(ErrorCodes.EEXIST, `snapshot ${name} already exists`, { snapshot: name });
    this.busy.add(key);
    this.busy.add(name);
    this.lastActivity = Date.now();
    const dir = snapshotDir(this.store, row.id);
    try {
      if (row.unpack_target !== null) {
        const pending = await this.commitUnpacked(name, row, labels, namespace ?? namespaceOf(name) ?? namespaceOf(key));
        // The unpacked tree is not needed any more (unless its layer is still to be ingested from it);
        // containerd need not wait for its deletion (no row owns the directory now: a stop before it
        // is gone leaves it to Cleanup / the next start).
        if (!pending) this.removeDir(dir);
      } else {
        await this.commitMounted(name, row, labels);
        await rm(dir, { recursive: true, force: true });
      }
    } finally {
      this.busy.delete(key);
      this.busy.delete(name);
    }
  }

  /** In the transaction that makes the layer visible (or on its own): the committed row appears and the active one goes. */
  private recordCommit(name: string, row: SnapshotRow, labels: Record<string, string>, diffId: Digest, chainId: Digest | null): void {
    if (this.table.get(name)) throw new LayerdError(ErrorCodes.EEXIST, `snapshot ${name} already exists`, { snapshot: name });
    if (!this.store.db.getLayer(diffId)) throw new LayerdError(ErrorCodes.ENOTFOUND, `layer ${diffId} left the store`, { diffId });
    this.table.insert({
      key: name, kind: 'committed', parent: row.parent, labels: JSON.stringify(labels),
      diff_id: diffId, chain_id: chainId, upper: null, mountpoint: null, server_pid: null,
    });
    this.table.delete(row.key);
  }

  /** A snapshot served through FUSE: the mount stops first (everything written through it is in the upper dir). */
  private async commitMounted(name: string, row: SnapshotRow, labels: Record<string, string>): Promise<void> {
    const key = row.key;
    await this.stopServed(row);
    this.store.db.write(() => this.table.setServer(key, null));
    try {
      const layer = await directoryToLayer(this.store, row.upper!, `snapshot:${key}`, (_db, l) => this.recordCommit(name, row, labels, l.diffId, null));
      this.logger.info('snapshot committed', { snapshot: name, from: key, diffId: layer.diffId });
      this.releaseLowerDirs(lowerDirIds(this.table.get(key)?.lower_dirs ?? row.lower_dirs));
    } catch (err) {
      // Still active: serve it again so the caller can go on using it.
      const still = this.table.get(key);
      if (still) {
        await this.startServer(still).catch((e: unknown) => this.logger.error('could not serve a snapshot again after a failed commit', { snapshot: key, error: String(e) }));
      }
      throw err;
    }
  }

  /**
   * An unpack snapshot: the layer the store already has for its chain is
   * kept (the directory containerd wrote is dropped); else the snapshot is
   * committed at once and its directory becomes the layer in the background
   * (`ingestPending`): containerd goes on with the next layer meanwhile. The
   * committed snapshot stands for the chain ID containerd named in either
   * case. Returns whether the directory is still needed (pending).
   */
  private async commitUnpacked(name: string, row: SnapshotRow, labels: Record<string, string>, namespace: string | undefined): Promise<boolean> {
    const target = row.unpack_target!;
    const parentRow = row.parent === null ? undefined : this.table.get(row.parent);
    // (Layer sources are asked at Prepare, before containerd downloads anything: once it has
    // unpacked the layer, fetching it again would only add a download to the Commit.)
    let diffId = this.knownLayerForChain(target, parentRow);
    if (diffId === undefined) {
      // The same chain committed in another namespace, its layer still being ingested: share it.
      const pendingTwin = this.table.committedWithChain(target).find((r) => r.pending_ingest === 1);
      if (pendingTwin !== undefined) diffId = await this.waitIngested(pendingTwin.key).catch(() => undefined);
    }
    if (diffId !== undefined) {
      const known = diffId;
      this.store.db.write(() => this.recordCommit(name, row, labels, known, target));
      this.logger.info('unpack snapshot committed', { snapshot: name, from: row.key, target, diffId, how: 'kept the stored layer' });
      return false;
    }
    this.store.db.write(() => {
      if (this.table.get(name)) throw new LayerdError(ErrorCodes.EEXIST, `snapshot ${name} already exists`, { snapshot: name });
      this.table.markPending(row.key, name, labels, target, namespace ?? null);
    });
    this.logger.info('unpack snapshot committed; its layer is ingested in the background', { snapshot: name, from: row.key, target });
    this.scanPending(row.id, name);
    void this.ingested(name).catch(() => undefined); // logged there; waiters see the error
    return true;
  }

  /**
   * The layer of committed snapshot `key` once it is in the store: at once
   * for most, after its background ingest for one containerd just committed
   * from an unpack directory. Ingests run INGEST_CONCURRENCY at a time, in commit order; a
   * failed one is logged and tried again by the next caller (or the next
   * daemon start), the snapshot staying committed meanwhile.
   */
  private ingested(key: string): Promise<Digest> {
    const row = this.table.get(key);
    if (row === undefined) return Promise.reject(new LayerdError(ErrorCodes.ENOTFOUND, `snapshot ${key} does not exist`, { snapshot: key }));
    if (row.pending_ingest !== 1) {
      if (row.diff_id !== null) return Promise.resolve(row.diff_id);
      return Promise.reject(new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} is not committed`, { snapshot: key }));
    }
    const running = this.ingests.get(row.id);
    if (running !== undefined) return running;
    const job = this.ingestSlot(() => this.ingestPending(row.id, key));
    this.ingests.set(row.id, job);
    const forget = (): void => { if (this.ingests.get(row.id) === job) this.ingests.delete(row.id); };
    job.then(forget, forget);
    return job;
  }

  /** `ingested` for a caller that waits for the layer: no background ingest is deferred meanwhile. */
  private async waitIngested(key: string): Promise<Digest> {
    this.waitingForIngest++;
    try {
      return await this.ingested(key);
    } finally {
      this.waitingForIngest--;
    }
  }

  /**
   * Walk a just-committed unpack directory now, in the background, and keep
   * the walk in memory and in its scan file (see `scans`). It costs ~15 µs
   * an entry (yielding to the event loop), against the seconds its ingest
   * takes, which waits until containerd is quiet.
   */
  private scanPending(id: number, key: string): void {
    const dir = this.pendingDirOf(id);
    const started = performance.now();
    const scan = (async (): Promise<ScannedDirectory | undefined> => {
      try {
        const scanned = await scanDirectory(dir, `snapshot:${key}`, 'overlay');
        await writeDirectoryScan(scanned, join(snapshotDir(this.store, id), SCAN_FILE));
        this.logger.debug('unpack directory walked', { snapshot: key, entries: scanned.index.entries.length, ms: Math.round(performance.now() - started) });
        return scanned;
      } catch (err) {
        this.logger.warn('could not walk an unpack directory at its commit (walked again where needed)', { snapshot: key, error: (err as Error).message });
        return undefined;
      }
    })();
    this.scans.set(id, scan);
  }

  /** The walk of pending snapshot `id`'s unpack directory: the one made at its Commit, else a new one. */
  private async pendingScan(id: number, dir: string, key: string): Promise<ScannedDirectory> {
    return (await this.scans.get(id)) ?? scanDirectory(dir, `snapshot:${key}`, 'overlay');
  }

  /**
   * The scan files of these pending directories (row ids) that can be read
   * instead of walking them: after the walks at their Commit end; from an
   * earlier daemon's run, if the file is there (a host checks it names the
   * directory and walks it otherwise).
   */
  private async scanFilesOf(ids: readonly number[]): Promise<Record<string, string>> {
    const files: Record<string, string> = {};
    await Promise.all(ids.map(async (id) => {
      const running = this.scans.get(id);
      if (running !== undefined && (await running) === undefined) return;
      const file = join(snapshotDir(this.store, id), SCAN_FILE);
      if (running !== undefined || await access(file).then(() => true, () => false)) files[this.pendingDirOf(id)] = file;
    }));
    return files;
  }

  /** Hold a background ingest until containerd is quiet (INGEST_QUIET_MS), someone waits for a layer, or its deferral is up. */
  private async quietEnough(key: string, committedAt: number): Promise<void> {
    const deadline = committedAt + INGEST_MAX_DEFER_MS;
    for (let first = true; ; first = false) {
      if (this.stopping) throw new LayerdError(ErrorCodes.EBUSY, 'the daemon is stopping; the layer is ingested at its next start', { snapshot: key });
      const now = Date.now();
      if (this.waitingForIngest > 0 || now >= deadline) return;
      if (now - this.lastActivity >= INGEST_QUIET_MS && this.table.unpacksInProgress() === 0) return;
      if (first) this.logger.debug('background ingest deferred while containerd is busy', { snapshot: key });
      await sleep(Math.min(INGEST_QUIET_POLL_MS, deadline - now));
    }
  }

  /** Run `job` when fewer than INGEST_CONCURRENCY ingests run (a finished one hands its slot to the next in line). */
  private async ingestSlot<T>(job: () => Promise<T>): Promise<T> {
    if (this.ingestsRunning >= INGEST_CONCURRENCY) await new Promise<void>((resolve) => this.ingestsWaiting.push(resolve));
    else this.ingestsRunning++;
    try {
      return await job();
    } finally {
      const next = this.ingestsWaiting.shift();
      if (next) next();
      else this.ingestsRunning--;
    }
  }

  private async ingestPending(id: number, key: string): Promise<Digest> {
    if (this.stopping) throw new LayerdError(ErrorCodes.EBUSY, 'the daemon is stopping; the layer is ingested at its next start', { snapshot: key });
    const row = this.table.get(key);
    if (row === undefined || row.id !== id || row.pending_ingest !== 1) {
      throw new LayerdError(ErrorCodes.ENOTFOUND, `snapshot ${key} is no longer waiting for its layer`, { snapshot: key });
    }
    await this.passIngestGate(key);
    await this.quietEnough(key, row.updated_at);
    const started = Date.now();
    try {
      let diffId = await this.ingestOriginal(row);
      if (diffId === undefined) {
        const layer = await directoryToLayer(this.store, row.upper!, `snapshot:${key}`, (_db, l) => this.table.finishPending(key, l.diffId), await this.pendingScan(id, row.upper!, key));
        this.logger.info('unpack snapshot layer ingested', { snapshot: key, diffId: layer.diffId, ms: Date.now() - started, from: 'directory' });
        diffId = layer.diffId;
      }
      // A container mounted before the layer was stored reads the directory until it is released.
      if (this.table.lowerDirsInUse().has(id)) this.logger.info('unpack directory kept while a mount reads it', { snapshot: key });
      this.scans.delete(id);
      this.releaseLowerDirs([id]);
      void this.preloadChains().catch(() => undefined);
      return diffId;
    } catch (err) {
      this.logger.error('could not ingest a committed snapshot\'s layer (tried again when it is needed)', { snapshot: key, error: (err as Error).message });
      throw err;
    }
  }

  /**
   * For each recent parent whose chain is now stored in full (its last
   * pending layer just ingested) and not preloaded with these layers yet:
   * have its host load and merge them now. Else the next container's Prepare
   * does that (tens of ms, more on a busy machine: the first later run).
   */
  private async preloadChains(): Promise<void> {
    for (const [parent, preloaded] of [...this.recentParents]) {
      if (this.stopping) return; // (a host started now would outlive the daemon for nothing)
      const row = this.table.get(parent);
      let chain: ReturnType<SnapshotTable['chainLayers']>;
      try {
        chain = this.table.chainLayers(parent);
      } catch {
        this.recentParents.delete(parent);
        continue;
      }
      const diffIds = chain.flatMap((l) => ('diffId' in l ? [l.diffId] : []));
      if (row?.chain_id == null || diffIds.length < chain.length || diffIds.join(',') === preloaded) continue;
      this.recentParents.set(parent, diffIds.join(','));
      const started = performance.now();
      try {
        await preloadLayers({
          layers: diffIds.map((d) => this.store.layerDirFor(d)), hostKey: `chain:${row.chain_id}`, hostsDir: this.store.layout.hostsDir(), context: { snapshot: parent },
        });
        this.logger.info('snapshot chain preloaded', { parent, layers: diffIds.length, ms: Math.round(performance.now() - started) });
      } catch (err) {
        this.logger.warn('could not preload a snapshot chain', { parent, error: (err as Error).message });
      }
    }
  }

  /** Test hook (options.ingestGate): hold the ingest while the gate file exists; a stopping daemon leaves it to its next start. */
  private async passIngestGate(key: string): Promise<void> {
    const gate = this.ingestGate;
    if (gate === undefined) return;
    const closed = (): Promise<boolean> => access(gate).then(() => true, () => false);
    if (!(await closed())) return;
    this.logger.info('background ingest held by the test gate', { snapshot: key, gate });
    while (!this.stopping && await closed()) await sleep(GATE_POLL_MS);
    if (this.stopping) throw new LayerdError(ErrorCodes.EBUSY, 'the daemon is stopping; the layer is ingested at its next start', { snapshot: key });
  }

  /**
   * A pending snapshot's layer stored from its original blob in containerd's
   * content store, so that it has the diffID the image names (shared with
   * `layerctl pull` of the image, pushed as the very blob): the blob whose
   * diffID gives the snapshot's chain ID on its parent's, digest and diffID
   * verified, and only if the directory containerd unpacked holds the same
   * file table. Undefined (logged why) when that cannot be had: then the
   * directory becomes the layer, with layerd's own diffID.
   */
  private async ingestOriginal(row: SnapshotRow): Promise<Digest | undefined> {
    const source = this.options.originalLayers;
    if (source === undefined) return undefined;
    const key = row.key;
    const target = row.chain_id ?? row.unpack_target;
    const namespace = row.namespace ?? namespaceOf(key);
    const fallback = (why: string, context: Record<string, unknown> = {}): undefined => {
      this.logger.warn('unpack snapshot layer stored from its directory (layerd\'s own diffID), not from containerd\'s original blob', { snapshot: key, target, why, ...context });
      return undefined;
    };
    if (target === null) return fallback('the snapshot names no chain ID');
    if (namespace === undefined) return fallback('the containerd namespace of the snapshot is not known');
    const parentRow = row.parent === null ? undefined : this.table.get(row.parent);
    if (parentRow !== undefined && parentRow.chain_id === null) return fallback('the chain ID of the parent snapshot is not known');
    const parentChain = parentRow?.chain_id ?? null;
    const started = Date.now();
    let blob;
    try {
      blob = await source.find({ namespace, parentChain, target });
    } catch (err) {
      return fallback('containerd\'s content store could not be asked', { error: (err as Error).message });
    }
    if (blob === undefined) return fallback('containerd\'s content store has no layer blob of this chain', { namespace });
    const found = blob;
    try {
      const layer = await ingestLayerBlob(this.store, found, async (index) => {
        const unpacked = await this.pendingScan(row.id, row.upper!, key);
        const difference = fileTableDifference(unpacked.index, index);
        if (difference !== undefined) {
          throw new LayerdError(ErrorCodes.ECONFLICT, `the directory containerd unpacked does not hold layer ${found.diffId}: ${difference}`, { diffId: found.diffId });
        }
      }, (_db, l) => this.table.finishPending(key, l.diffId, l.blobDigest));
      this.logger.info('unpack snapshot layer ingested', {
        snapshot: key, diffId: layer.diffId, ms: Date.now() - started, from: 'containerd content', blob: layer.blobDigest, found: found.how,
      });
      return layer.diffId;
    } catch (err) {
      return fallback('containerd\'s original blob could not be stored', { blob: found.digest, diffId: found.diffId, error: (err as Error).message });
    }
  }

  /** Delete a snapshot directory nothing needs any more, without making the caller wait. */
  private removeDir(dir: string): void {
    if (this.removing.has(dir)) return;
    this.removing.add(dir);
    void rm(dir, { recursive: true, force: true })
      .catch((err: unknown) => this.logger.warn('could not delete a snapshot directory', { path: dir, error: String(err) }))
      .finally(() => this.removing.delete(dir));
  }

  async remove(key: string): Promise<void> {
    const started = performance.now();
    let row = this.row(key);
    if (row.pending_ingest === 1) {
      // Its layer first (or the ingest's failure): then it goes as any committed snapshot.
      await this.waitIngested(key).catch(() => undefined);
      row = this.row(key);
    }
    if (this.busy.has(key)) throw new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} is busy`, { snapshot: key });
    const children = this.table.children(key);
    if (children.length > 0) {
      throw new LayerdError(ErrorCodes.ECONFLICT, `snapshot ${key} has ${children.length} child snapshot(s), e.g. ${children[0]!.key}`, { snapshot: key });
    }
    this.busy.add(key);
    try {
      if (row.kind === 'committed' && row.diff_id === null) {
        // its layer could not be ingested: only the directory goes
        this.store.db.write(() => this.table.delete(key));
        await rm(snapshotDir(this.store, row.id), { recursive: true, force: true });
        this.logger.info('snapshot removed', { snapshot: key, kind: row.kind, ingested: false });
        return;
      }
      if (row.kind === 'committed') {
        this.store.db.write(() => this.table.delete(key));
        const deleted = await removeLayerIfUnused(this.store, row.diff_id!, row.blob_digest);
        this.logger.info('snapshot removed', { snapshot: key, kind: row.kind, layerDeleted: deleted });
        return;
      }
      if (row.unpack_target === null) await this.stopServed(row);
      // No fsync for a container's snapshot (containerd's GC holds its lock through Remove, before the next
      // `ctr run`): a row a power failure brings back is unknown to containerd, whose GC removes it again.
      // One that holds pending directories is synced: those are deleted next.
      if (row.lower_dirs === null) this.store.db.writeUnsynced(() => this.table.delete(key));
      else this.store.db.write(() => this.table.delete(key));
      this.releaseLowerDirs(lowerDirIds(row.lower_dirs));
      // Unmounted and unrecorded: containerd need not wait for the files (a stop before they are gone leaves them to Cleanup).
      this.removeDir(snapshotDir(this.store, row.id));
      this.logger.info('snapshot removed', { snapshot: key, kind: row.kind, ms: Math.round(performance.now() - started) });
    } finally {
      this.busy.delete(key);
    }
  }

  /** Remove what no snapshot owns: directories under snapshots/ without a row (and their mounts). */
  async cleanup(): Promise<string[]> {
    // (a committed snapshot owns no files, except one whose layer is still to be ingested from its directory)
    // (nor one whose layer is stored while a mount still reads its directory)
    const owned = new Set(this.table.list().filter((r) => r.kind !== 'committed' || r.pending_ingest === 1).map((r) => String(r.id)));
    for (const id of this.table.lowerDirsInUse()) owned.add(String(id));
    const removed: string[] = [];
    const names = await readdir(snapshotsDir(this.store)).catch(() => [] as string[]);
    for (const name of names) {
      if (owned.has(name) || !/^\d+$/.test(name)) continue;
      // A row being created right now already has its id; its directory is not an orphan.
      if ([...this.busy].some((k) => String(this.table.get(k)?.id) === name)) continue;
      const dir = join(snapshotsDir(this.store), name);
      if (this.removing.has(dir)) continue; // being deleted already
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
      if (row.kind === 'committed' || row.unpack_target !== null) continue;
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
    // committed snapshots whose layer the previous daemon had not ingested yet (stopped or killed meanwhile)
    const pending = this.table.pending();
    if (pending.length > 0) this.logger.info('resuming the ingest of committed snapshots\' layers', { snapshots: pending.length });
    for (const row of pending) void this.ingested(row.key).catch(() => undefined);
    // what an interrupted Commit or Remove left behind
    await this.cleanup().catch((err: unknown) => this.logger.warn('snapshot cleanup failed', { error: String(err) }));
    return { adopted, remounted };
  }

  /**
   * While the daemon runs, notice snapshot mount hosts that died (a crash,
   * an OOM kill) and serve their snapshots again within seconds, as
   * containers are (daemon/containers.ts); containerd's shims keep using
   * the same mountpoints.
   */
  superviseMounts(intervalMs = SUPERVISE_MS): void {
    this.supervisor ??= setInterval(() => { void this.reviveDead(); }, intervalMs);
    this.supervisor.unref();
  }

  /** Stop the supervisor and the background ingests; wait for a round or an ingest in progress (daemon stop). */
  async stopSupervising(): Promise<void> {
    clearInterval(this.supervisor);
    this.supervisor = undefined;
    this.stopping = true; // queued ingests are left to the next start
    await this.reviving;
    await this.warmer.close();
    await Promise.allSettled([...this.ingests.values()]);
  }

  private reviveDead(): Promise<void> {
    if (this.reviving !== undefined) return this.reviving;
    const round = (async () => {
      const served = new HostMountsCache();
      for (const row of this.table.list()) {
        if (row.kind === 'committed' || row.unpack_target !== null || row.server_pid === null || this.busy.has(row.key)) continue;
        if (processAlive(row.server_pid)) {
          // The host lives, but the mount may not: its FUSE connection aborted, or unmounted from outside.
          if (await served.serves(row.server_pid, row.mountpoint!)) continue;
          if (this.busy.has(row.key) || !this.table.get(row.key)) continue;
          this.logger.warn('a snapshot lost its mount while its host runs; serving it again', { snapshot: row.key, pid: row.server_pid });
        } else {
          this.logger.warn('the mount host of a snapshot died; serving it again', { snapshot: row.key, pid: row.server_pid });
        }
        await this.serveAgain(row).catch(() => undefined); // logged; the next round or a Mounts call tries again
      }
    })();
    this.reviving = round.finally(() => { this.reviving = undefined; });
    return this.reviving;
  }

  /** Clear a dead mount and serve the snapshot again (a failure is logged; its server is then unknown). */
  private async serveAgain(row: SnapshotRow): Promise<void> {
    this.busy.add(row.key);
    try {
      await stopMount(null, row.mountpoint!); // clears the dead mount
      if (!this.table.get(row.key)) return; // removed meanwhile
      await this.startServer(row);
      this.logger.warn('snapshot mount served again', { snapshot: row.key });
    } catch (err) {
      this.logger.error('could not serve a snapshot again', { snapshot: row.key, error: (err as Error).message });
      this.store.db.write(() => this.table.setServer(row.key, null));
      throw err;
    } finally {
      this.busy.delete(row.key);
    }
  }

  /** Stop serving every snapshot mount (daemon stop with --unmount-on-stop). */
  async unmountAll(): Promise<void> {
    for (const row of this.table.list()) {
      if (row.kind === 'committed' || row.unpack_target !== null) continue;
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
