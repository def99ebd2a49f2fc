/**
 * Containers: a container is a mount of an image with its own writable
 * layer, and optionally a live host directory as its top read-only layer.
 * Mounts are served by detached mount hosts, one per image (mountServer.ts),
 * that outlive a daemon restart or upgrade; the daemon records the host's
 * PID and, on start, adopts mounts still served and mounts again those whose
 * server died (clearing their dead mountpoints first).
 */
import { access, mkdir, readFile, rename, rmdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { type Writable } from 'node:stream';
import { ErrorCodes, LayerdError, errnoCode } from '../common/errors.js';
import { processAlive } from '../common/process.js';
import { type Logger } from '../common/log.js';
import { LowerInoAllocator } from '../mount/inodes.js';
import { checkLayerDirectory, commitDirectory, writeDirectoryLayer } from '../mount/directoryLayer.js';
import { lowerDirSource, scanDirectory } from '../mount/lowerDir.js';
import { MergedTree } from '../mount/mergedTree.js';
import { convertOciUpper } from '../mount/upperMigration.js';
import { type OpStatsSnapshot, addSnapshot, readSnapshot } from '../mount/opStats.js';
import { type CommitResult } from '../storage/commit.js';
import { type Digest } from '../storage/digest.js';
import { tarLayerSource } from '../storage/layerIndex.js';
import { type ContainerRow } from '../storage/metadata.js';
import { formatRef, splitNameTag } from '../storage/references.js';
import { type Store } from '../storage/store.js';
import { HostMountsCache, isServing, prewarmMountHost, spareHostPid, startMount, stopMount, stopSpareHost } from './mountServer.js';

const SPARE_CHECK_MS = 5 * 60_000;
const SUPERVISE_MS = 2_000;
const ID_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$/;

export interface CreateRequest {
  id?: string;
  image: string;
  mountpoint?: string;
  readOnly?: boolean;
  labels?: Record<string, string>;
  /** A host directory served live as the top read-only layer (absolute path). */
  layerDir?: string;
}

export interface ContainerInfo {
  id: string;
  image: Digest;
  imageRefs: string[];
  mountpoint: string;
  readOnly: boolean;
  labels: Record<string, string>;
  created: string;
  state: 'mounted' | 'stopped';
  serverPid: number | null;
  layerDir: string | null;
}

export interface DiffLine {
  kind: 'A' | 'C' | 'D';
  path: string;
}

export class ContainerManager {
  /** Ids being created right now (so concurrent duplicates get 409 at once). */
  private readonly creating = new Set<string>();
  /** Ids being removed right now (the supervisor leaves them alone). */
  private readonly removing = new Set<string>();
  private supervisor: NodeJS.Timeout | undefined;
  private spareTimer: NodeJS.Timeout | undefined;
  /** FUSE statistics of the containers removed since this daemon started. */
  private readonly removedStats: OpStatsSnapshot = {};
  private reviving = false;

  constructor(
    private readonly store: Store,
    private readonly mountRoot: string,
    private readonly logger: Logger,
    private readonly mountOptions: { cacheSeconds?: number } = {},
  ) {}

  private dir(id: string): string { return this.store.layout.containerDir(id); }
  private upper(id: string): string { return join(this.dir(id), 'upper'); }
  /** Present once the upper is in the overlayfs format (mount/upperFormat.ts); older ones are converted at their next mount. */
  private upperFormatMark(id: string): string { return join(this.dir(id), 'upper-format'); }

  private async markUpperFormat(id: string): Promise<void> {
    await writeFile(this.upperFormatMark(id), 'overlay\n', { mode: 0o600 });
  }

  /** An upper written by a version before the overlayfs format is converted, with the meaning it had. */
  private async convertUpperIfOld(id: string): Promise<void> {
    if (await access(this.upperFormatMark(id)).then(() => true, () => false)) return;
    const converted = convertOciUpper(this.upper(id));
    await this.markUpperFormat(id);
    this.logger.info('writable layer converted to the overlayfs format', { container: id, ...converted });
  }
  statsFile(id: string): string { return join(this.dir(id), 'fuse-stats.json'); }

  /**
   * FUSE operation statistics of every container's mount, summed by
   * operation, plus those of the containers removed since the daemon
   * started: the sums are counters and must not go down when a container goes.
   */
  async fuseStats(): Promise<OpStatsSnapshot> {
    const total: OpStatsSnapshot = {};
    addSnapshot(total, this.removedStats);
    for (const row of this.store.db.listContainers()) {
      const snap = await readSnapshot(this.statsFile(row.id));
      if (snap) addSnapshot(total, snap);
    }
    return total;
  }

  /** How many mount hosts serve this store (the spare included) and their resident memory. */
  async hostMemory(): Promise<{ hosts: number; residentBytes: number }> {
    const pids = new Set<number>();
    for (const row of this.store.db.listContainers()) if (row.server_pid !== null) pids.add(row.server_pid);
    const spare = await spareHostPid(this.store.layout.hostsDir());
    if (spare !== undefined) pids.add(spare);
    let hosts = 0;
    let residentBytes = 0;
    for (const pid of pids) {
      const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => undefined);
      const kib = status === undefined ? undefined : /^VmRSS:\s+(\d+) kB/m.exec(status)?.[1];
      if (kib === undefined) continue; // gone since
      hosts++;
      residentBytes += Number(kib) * 1024;
    }
    return { hosts, residentBytes };
  }

  private row(id: string): ContainerRow {
    checkId(id);
    const row = this.store.db.getContainer(id);
    if (!row) throw new LayerdError(ErrorCodes.ENOTFOUND, `no such container: ${id}`, { container: id });
    return row;
  }

  async create(request: CreateRequest): Promise<{ id: string; mountpoint: string }> {
    const id = request.id ?? randomId();
    checkId(id);
    if (request.labels !== undefined) {
      for (const [k, v] of Object.entries(request.labels)) {
        if (typeof v !== 'string') throw new LayerdError(ErrorCodes.EINVAL, `label '${k}' must be a string`, { label: k });
      }
    }
    if (this.creating.has(id) || this.store.db.getContainer(id)) {
      throw new LayerdError(ErrorCodes.EEXIST, `container ${id} already exists`, { container: id });
    }
    const image = this.store.resolveImage(request.image);
    const mountpoint = resolve(request.mountpoint ?? join(this.mountRoot, id));
    if (request.mountpoint !== undefined && !request.mountpoint.startsWith('/')) {
      throw new LayerdError(ErrorCodes.EINVAL, 'mountpoint must be an absolute path', { mountpoint: request.mountpoint });
    }
    const layerDir = request.layerDir === undefined ? null : await checkLayerDirectory(request.layerDir, [mountpoint, this.store.layout.root]);
    this.creating.add(id);
    try {
      if (this.store.db.listContainers().some((c) => c.mountpoint === mountpoint)) {
        throw new LayerdError(ErrorCodes.EEXIST, `another container is mounted at ${mountpoint}`, { mountpoint });
      }
      await mkdir(this.upper(id), { recursive: true, mode: 0o755 });
      await this.markUpperFormat(id);
      await mkdir(mountpoint, { recursive: true });
      this.store.db.write(() => this.store.db.putContainer({
        id, image_id: image.id, mountpoint, read_only: request.readOnly ? 1 : 0,
        labels: JSON.stringify(request.labels ?? {}), server_pid: null, layer_dir: layerDir,
      }));
      try {
        await this.startServer(this.store.db.getContainer(id)!);
      } catch (err) {
        this.store.db.write(() => this.store.db.deleteContainer(id));
        await this.discardDir(id);
        await this.removeOwnMountpoint(id, mountpoint);
        throw err;
      }
      return { id, mountpoint };
    } finally {
      this.creating.delete(id);
    }
  }

  /** Have the container mounted by its image's mount host, and wait until it serves. */
  private async startServer(row: ContainerRow): Promise<void> {
    await this.convertUpperIfOld(row.id);
    const served = await startMount({
      // A lazy layer is served from its lazy directory until its fill completes (storage/lazy/).
      layers: this.store.db.imageLayers(row.image_id).map((l) => this.store.layerDirFor(l.diff_id)),
      ...(row.layer_dir !== null ? { liveLayer: row.layer_dir } : {}),
      upper: this.upper(row.id),
      mountpoint: row.mountpoint,
      readOnly: row.read_only === 1,
      hostsDir: this.store.layout.hostsDir(),
      ...(this.mountOptions.cacheSeconds !== undefined && row.layer_dir === null && row.read_only === 0 ? { cacheSeconds: this.mountOptions.cacheSeconds } : {}),
      statsFile: this.statsFile(row.id),
      context: { container: row.id },
    });
    this.store.db.write(() => this.store.db.setContainerServer(row.id, served.pid));
    this.logger.info('container mounted', { container: row.id, mountpoint: row.mountpoint, pid: served.pid });
  }

  /**
   * On daemon start: keep mounts whose server still runs, mount again those
   * whose server died (clearing the dead mountpoint first).
   */
  async adoptAll(): Promise<{ adopted: string[]; remounted: string[] }> {
    const adopted: string[] = [];
    const remounted: string[] = [];
    for (const row of this.store.db.listContainers()) {
      if (row.server_pid !== null && await isServing({ pid: row.server_pid, mountpoint: row.mountpoint })) {
        adopted.push(row.id);
        continue;
      }
      // Alive but not serving this mount (hung, or a host that lost it): stop it for this mount only.
      await stopMount(row.server_pid, row.mountpoint);
      try {
        await this.startServer(row);
        remounted.push(row.id);
      } catch (err) {
        this.logger.error('could not mount a container again', { container: row.id, error: (err as Error).message });
        this.store.db.write(() => this.store.db.setContainerServer(row.id, null));
      }
    }
    if (adopted.length + remounted.length > 0) this.logger.info('containers restored', { adopted: adopted.length, remounted: remounted.length });
    this.keepSpareHost();
    return { adopted, remounted };
  }

  /**
   * While the daemon runs, notice mount hosts that died (a crash, an OOM
   * kill) and mount their containers again, instead of leaving them dead
   * until the next daemon start. Processes that had files open on the old
   * mount see ENOTCONN for those; new accesses work again.
   */
  superviseHosts(intervalMs = SUPERVISE_MS): void {
    this.supervisor ??= setInterval(() => { void this.reviveDead(); }, intervalMs);
    this.supervisor.unref();
  }

  /** Stop the timers of superviseHosts and the spare host check, and the spare host itself (daemon stop). */
  async stopSupervising(): Promise<void> {
    clearInterval(this.supervisor);
    clearInterval(this.spareTimer);
    this.supervisor = this.spareTimer = undefined;
    await stopSpareHost(this.store.layout.hostsDir());
  }

  private async reviveDead(): Promise<void> {
    if (this.reviving) return;
    this.reviving = true;
    try {
      const served = new HostMountsCache();
      for (const row of this.store.db.listContainers()) {
        if (row.server_pid === null || this.removing.has(row.id) || this.creating.has(row.id)) continue;
        if (processAlive(row.server_pid)) {
          // The host lives, but the mount may not: its FUSE connection aborted, or unmounted from outside.
          if (await served.serves(row.server_pid, row.mountpoint)) continue;
          if (this.removing.has(row.id) || this.creating.has(row.id) || !this.store.db.getContainer(row.id)) continue;
          this.logger.warn('a container lost its mount while its host runs; mounting it again', { container: row.id, pid: row.server_pid });
        } else {
          this.logger.warn('the mount host of a container died; mounting it again', { container: row.id, pid: row.server_pid });
        }
        await stopMount(null, row.mountpoint); // clears the dead mount
        try {
          await this.startServer(row);
        } catch (err) {
          this.logger.error('could not mount a container again', { container: row.id, error: (err as Error).message });
          this.store.db.write(() => this.store.db.setContainerServer(row.id, null));
        }
        // Removed while it was being mounted again: take the new mount down too.
        if (this.removing.has(row.id) || !this.store.db.getContainer(row.id)) await stopMount(null, row.mountpoint);
      }
    } finally {
      this.reviving = false;
    }
  }

  /** Keep a spare mount host ready (checked now and every few minutes), so first mounts are fast too. */
  private keepSpareHost(): void {
    const prewarm = (): void => {
      prewarmMountHost(this.store.layout.hostsDir()).catch((err: unknown) => {
        this.logger.warn('could not start a spare mount host', { error: (err as Error).message });
      });
    };
    prewarm();
    this.spareTimer ??= setInterval(prewarm, SPARE_CHECK_MS);
    this.spareTimer.unref();
  }

  list(): ContainerInfo[] {
    return this.store.db.listContainers().map((r) => this.info(r));
  }

  inspect(id: string): ContainerInfo {
    return this.info(this.row(id));
  }

  private info(row: ContainerRow): ContainerInfo {
    const serving = row.server_pid !== null && processAlive(row.server_pid);
    return {
      id: row.id,
      image: row.image_id,
      imageRefs: this.store.db.tagsOf(row.image_id).map((t) => formatRef(t.name, t.tag)),
      mountpoint: row.mountpoint,
      readOnly: row.read_only === 1,
      labels: JSON.parse(row.labels) as Record<string, string>,
      created: new Date(row.created_at).toISOString(),
      state: serving ? 'mounted' : 'stopped',
      serverPid: serving ? row.server_pid : null,
      layerDir: row.layer_dir,
    };
  }

  /** Unmount, and delete the writable layer unless `keep`. */
  async remove(id: string, keep: boolean): Promise<{ id: string; kept: boolean }> {
    const row = this.row(id);
    this.removing.add(id);
    try {
      await this.stopServer(row);
      // The host wrote its last stats when it unmounted: keep them in the sums.
      const last = await readSnapshot(this.statsFile(id));
      this.store.db.write(() => this.store.db.deleteContainer(id));
      if (last) addSnapshot(this.removedStats, last);
    } finally {
      this.removing.delete(id);
    }
    if (!keep) await this.discardDir(id);
    await this.removeOwnMountpoint(id, row.mountpoint);
    return { id, kept: keep };
  }

  /**
   * Delete a container's directory. It is first moved into a private ingest
   * directory in one rename: its mount host may still be finishing a stats
   * write (fuse-stats.json) there, which then finds no directory instead of
   * making the delete fail with ENOTEMPTY.
   */
  private async discardDir(id: string): Promise<void> {
    const trash = await this.store.newWorkDir();
    try {
      await rename(this.dir(id), join(trash, 'container')).catch((err: unknown) => {
        if (errnoCode(err) !== 'ENOENT') throw err;
      });
    } finally {
      // What cannot be deleted now goes with the next start's recovery of tmp/.
      await this.store.releaseWorkDir(trash).catch((err: unknown) => {
        this.logger.warn('could not delete a removed container\'s directory', { container: id, path: trash, error: (err as Error).message });
      });
    }
  }

  /** Remove the mountpoint directory if `create` made it (the default one under the mount root) and it is empty. */
  private async removeOwnMountpoint(id: string, mountpoint: string): Promise<void> {
    if (mountpoint !== resolve(join(this.mountRoot, id))) return;
    await rmdir(mountpoint).catch((err: unknown) => {
      if (errnoCode(err) !== 'ENOENT') this.logger.warn('could not remove a container\'s mountpoint', { container: id, mountpoint, error: (err as Error).message });
    });
  }

  private async stopServer(row: ContainerRow): Promise<void> {
    await stopMount(row.server_pid, row.mountpoint);
  }

  /** Stop serving every mount (daemon stop with --unmount). */
  async unmountAll(): Promise<void> {
    for (const row of this.store.db.listContainers()) {
      await this.stopServer(row);
      this.store.db.write(() => this.store.db.setContainerServer(row.id, null));
    }
  }

  /** What the container changed, like `docker diff`: A added, C changed, D deleted. */
  async diff(id: string): Promise<DiffLine[]> {
    const row = this.row(id);
    const lower = new MergedTree();
    const inos = new LowerInoAllocator();
    for (const l of await this.store.imageLayers(row.image_id)) lower.addLayer(tarLayerSource(l.index, l.tarPath), inos);
    if (row.layer_dir !== null) lower.addLayer(await lowerDirSource(row.layer_dir, undefined, 'layer-dir'), inos);
    const upper = await scanDirectory(this.upper(id), `container:${id}`);
    const lines: DiffLine[] = [];
    for (const w of upper.index.whiteouts) if (lower.get(w)) lines.push({ kind: 'D', path: `/${w}` });
    for (const d of upper.index.opaques) {
      const dir = lower.get(d);
      for (const name of dir?.children ?? []) {
        const child = d === '' ? name : `${d}/${name}`;
        if (!upper.index.entries.some((e) => e.path === child)) lines.push({ kind: 'D', path: `/${child}` });
      }
    }
    for (const e of upper.index.entries) {
      if (e.path === '') continue;
      lines.push({ kind: lower.get(e.path) ? 'C' : 'A', path: `/${e.path}` });
    }
    return lines.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  }

  /** The writable layer as an OCI layer tar (whiteouts included). */
  async export(id: string, out: Writable): Promise<void> {
    this.row(id);
    await writeDirectoryLayer(this.upper(id), out, `container:${id}`, 'overlay');
  }

  /**
   * Turn the writable layer into a layer of the store and a new image on the
   * container's image. A container with a live layer directory gets two new
   * layers, the directory's and then the writable one, so that the new image
   * shows what the container shows.
   */
  async commit(id: string, options: { ref?: string; comment?: string }): Promise<CommitResult> {
    const row = this.row(id);
    const ref = options.ref !== undefined ? splitNameTag(options.ref) : undefined;
    const createdBy = `layerd commit ${id}`;
    let base: string = row.image_id;
    if (row.layer_dir !== null) {
      base = (await commitDirectory(this.store, base, row.layer_dir, { dialect: 'layer-dir', createdBy: `${createdBy} (layer dir ${row.layer_dir})` })).image;
    }
    return commitDirectory(this.store, base, this.upper(id), {
      dialect: 'overlay', createdBy, ...(ref ? { ref } : {}), ...(options.comment ? { comment: options.comment } : {}),
    });
  }
}

function checkId(id: string): void {
  if (!ID_RE.test(id)) {
    throw new LayerdError(ErrorCodes.EINVAL, `invalid container id '${id.replace(/\0/g, '\\0')}': letters, digits, '_', '.', '-'; up to 128; no '/'`, { container: id.replace(/\0/g, '\\0') });
  }
}

function randomId(): string {
  return [...crypto.getRandomValues(new Uint8Array(6))].map((b) => b.toString(16).padStart(2, '0')).join('');
}
