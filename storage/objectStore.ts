/**
 * Regular files' bytes as content-addressed objects, for FUSE passthrough
 * of lower files (a backing file must be a whole file, and a layer's files
 * live inside its `layer.tar`):
 *
 *   <root>/objects/sha256/<xx>/<hex>     the bytes whose sha256 is <hex> (xx: its first two digits)
 *   <root>/objects/tmp/<pid>-<random>/   objects being made by one process
 *
 * An object is made from a file of a verified layer the first time a mount
 * that passes data through opens it (in the background: that open is served
 * from the tar, later ones pass through), so only files that are used take
 * space twice, and a file that is the same in many layers and images is one
 * object. Its bytes are hashed while they are copied and must match the
 * digest the layer's index records for the file (computed at import from
 * the verified tar) before the object gets its name; a mismatch is logged
 * and never retried. Objects of one batch are flushed with one syncfs and
 * only then renamed into place (RENAME_NOREPLACE), so after a crash a named
 * object is complete; what a dead process left in `objects/tmp/` is removed
 * on the store's next open (and reported by fsck meanwhile). An object needs
 * no metadata row: its name is its content. GC removes objects no layer's
 * index names (storage/gc.ts); fsck re-hashes them (storage/fsck.ts).
 *
 * Every path beneath the store root is opened through the system-call layer
 * (openat2 RESOLVE_BENEATH | NO_SYMLINKS), one component at a time.
 */
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, createReadStream, read, write } from 'node:fs';
import { rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { ErrorCodes, LayerdError, errnoCode } from '../common/errors.js';
import { type Logger, createLogger, silentLogger } from '../common/log.js';
import { processAlive } from '../common/process.js';
import { errnoNameOf } from '../common/sys/errors.js';
import {
  O_CREAT, O_DIRECTORY, O_EXCL, O_PATH, O_RDONLY, O_WRONLY, RENAME_NOREPLACE, close, mkdirAt, openBeneath, openRoot, fstat, readDirFd, renameAt,
  syncFilesystemOf, unlinkAt,
} from '../common/sys/fs.js';
import { isDigest } from './digest.js';
import { LAYER_TAR, type LayerIndex, type LayerSource, PASSTHROUGH_MIN_LOWER_SIZE, skeletonContent, tarLayerSource } from './layerIndex.js';

/** Where objects live, relative to the store root. */
export const OBJECTS_DIR = 'objects';
const ALGORITHM_DIR = 'sha256';
const STAGING_DIR = 'tmp';

/** Most files, and bytes, staged before one flush makes them durable and they are named. */
const BATCH_FILES = 256;
const BATCH_BYTES = 256 * 1024 * 1024;
const COPY_CHUNK = 1024 * 1024;

/** Where to take an object's bytes from: `size` bytes at `offset` of what `openSource` opens. */
export interface ObjectSource {
  size: number;
  offset: number;
  /** A readable descriptor (the caller closes it). */
  openSource: () => number;
}

/** `objects/sha256/<xx>/<hex>` for a digest, or undefined when it is no sha256 digest. */
export function objectRelPath(digest: string): string | undefined {
  if (!isDigest(digest)) return undefined;
  const hex = digest.slice('sha256:'.length);
  return `${OBJECTS_DIR}/${ALGORITHM_DIR}/${hex.slice(0, 2)}/${hex}`;
}

interface Staged { digest: string; name: string }

export class ObjectStore {
  private static readonly byRoot = new Map<string, ObjectStore>();

  /** The object store of a store root, one per root in a process. */
  static forRoot(root: string, logger?: Logger): ObjectStore {
    let store = ObjectStore.byRoot.get(root);
    if (store === undefined) ObjectStore.byRoot.set(root, store = new ObjectStore(root, logger ?? createLogger({ component: 'objects' })));
    return store;
  }

  private rootFd: number | undefined;
  private staging: { fd: number; name: string } | undefined;
  private readonly queue: { digest: string; source: ObjectSource }[] = [];
  /** Digests queued or being made. */
  private readonly pending = new Set<string>();
  /** Digests whose source bytes did not hash to them: never tried again by this process. */
  private readonly refused = new Set<string>();
  private worker: Promise<void> | undefined;
  private nextName = 0;
  /** Objects this process made (tests and logs). */
  made = 0;

  constructor(readonly root: string, private readonly logger: Logger = silentLogger()) {}

  /**
   * A read-only descriptor of the object holding `digest`'s bytes, or
   * undefined when there is none; then, with a source, it is made in the
   * background for a later open.
   */
  open(digest: string, source?: ObjectSource): number | undefined {
    const rel = objectRelPath(digest);
    if (rel === undefined) return undefined;
    try {
      return openBeneath(this.rootDescriptor(), rel, O_RDONLY);
    } catch (err) {
      if (errnoNameOf(err) !== 'ENOENT') {
        this.logger.debug('cannot open an object', { digest, error: String(err) });
        return undefined;
      }
    }
    if (source !== undefined) this.request(digest, source);
    return undefined;
  }

  /** A read-only descriptor of `rel` beneath the store root (the caller closes it). */
  openInStore(rel: string): number {
    return openBeneath(this.rootDescriptor(), rel, O_RDONLY);
  }

  /** Whether an object of `digest` exists. */
  has(digest: string): boolean {
    const rel = objectRelPath(digest);
    if (rel === undefined) return false;
    try {
      close(openBeneath(this.rootDescriptor(), rel, O_PATH));
      return true;
    } catch {
      return false;
    }
  }

  /** Queue the making of an object (once; never one whose bytes did not match before). */
  request(digest: string, source: ObjectSource): void {
    if (objectRelPath(digest) === undefined || this.pending.has(digest) || this.refused.has(digest)) return;
    this.pending.add(digest);
    this.queue.push({ digest, source });
    this.worker ??= this.drain().finally(() => { this.worker = undefined; });
  }

  /** Resolves when every object requested so far is made (or refused). */
  async idle(): Promise<void> {
    while (this.worker !== undefined) await this.worker;
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) {
      const batch: { digest: string; source: ObjectSource }[] = [];
      let bytes = 0;
      while (this.queue.length > 0 && batch.length < BATCH_FILES && bytes < BATCH_BYTES) {
        const item = this.queue.shift()!;
        batch.push(item);
        bytes += item.source.size;
      }
      const staged: Staged[] = [];
      for (const { digest, source } of batch) {
        try {
          if (this.has(digest)) continue; // another process made it meanwhile
          const name = await this.stage(digest, source);
          if (name !== undefined) staged.push({ digest, name });
        } catch (err) {
          this.logger.debug('could not make an object', { digest, error: String(err) });
        }
      }
      try {
        if (staged.length > 0) {
          // One flush for the batch: a named object is complete even after a crash.
          await syncFilesystemOf(this.staging!.fd);
          for (const s of staged) this.publish(s);
        }
      } catch (err) {
        this.logger.warn('could not store objects', { count: staged.length, error: String(err) });
        for (const s of staged) this.unlinkStaged(s.name);
      } finally {
        for (const { digest } of batch) this.pending.delete(digest);
      }
    }
  }

  /** Copy the source bytes into a new staging file while hashing them; its name if they hash to `digest`. */
  private async stage(digest: string, source: ObjectSource): Promise<string | undefined> {
    const staging = this.stagingDir();
    const name = String(this.nextName++);
    const out = openBeneath(staging.fd, name, O_WRONLY | O_CREAT | O_EXCL, 0o444);
    let ok = false;
    try {
      const input = source.openSource();
      const hash = createHash('sha256');
      let done = 0;
      try {
        const buffer = Buffer.allocUnsafe(Math.min(COPY_CHUNK, Math.max(source.size, 1)));
        while (done < source.size) {
          const n = await readAt(input, buffer, Math.min(buffer.length, source.size - done), source.offset + done);
          if (n === 0) break;
          const chunk = buffer.subarray(0, n);
          hash.update(chunk);
          await writeAt(out, chunk, done);
          done += n;
        }
      } finally {
        closeSync(input);
      }
      const got = `sha256:${hash.digest('hex')}`;
      if (done !== source.size || got !== digest) {
        this.refused.add(digest);
        this.logger.warn('a file does not hash to the digest its layer index records: no object made of it', { digest, got, bytes: done, size: source.size });
        return undefined;
      }
      ok = true;
      return name;
    } finally {
      closeSync(out);
      if (!ok) this.unlinkStaged(name);
    }
  }

  /** Give a verified, flushed staging file its object name (kept as it is if one already has it). */
  private publish(s: Staged): void {
    const rel = objectRelPath(s.digest)!;
    const algorithmDir = this.ensureDir(`${OBJECTS_DIR}/${ALGORITHM_DIR}`);
    let fanout: number;
    try {
      fanout = this.ensureDir(dirname(rel), algorithmDir);
    } finally {
      close(algorithmDir);
    }
    try {
      renameAt(this.staging!.fd, s.name, fanout, basename(rel), RENAME_NOREPLACE, rel);
      this.made++;
    } catch (err) {
      if (errnoNameOf(err) !== 'EEXIST') throw err;
      this.unlinkStaged(s.name);
    } finally {
      close(fanout);
    }
  }

  /**
   * An O_PATH descriptor of directory `rel` (made if missing), beneath the
   * root, or beneath `parentFd` for its last component.
   */
  private ensureDir(rel: string, parentFd?: number): number {
    const base = parentFd ?? this.rootDescriptor();
    const parts = parentFd === undefined ? rel.split('/') : [basename(rel)];
    let fd = base;
    for (const part of parts) {
      try {
        mkdirAt(fd, part, 0o700);
      } catch (err) {
        if (errnoNameOf(err) !== 'EEXIST') throw err;
      }
      const next = openBeneath(fd, part, O_PATH | O_DIRECTORY);
      if (fd !== base) close(fd);
      fd = next;
    }
    return fd;
  }

  private stagingDir(): { fd: number; name: string } {
    if (this.staging !== undefined) return this.staging;
    const tmp = this.ensureDir(`${OBJECTS_DIR}/${STAGING_DIR}`);
    try {
      const name = `${process.pid}-${randomBytes(6).toString('hex')}`;
      mkdirAt(tmp, name, 0o700);
      this.staging = { fd: openBeneath(tmp, name, O_RDONLY | O_DIRECTORY), name };
      // A process that ends normally (a mount host leaving when idle) takes its staging
      // directory with it: left behind, fsck reports it until the daemon next opens the store.
      removeAtExit(this);
    } finally {
      close(tmp);
    }
    return this.staging;
  }

  /** Remove this process's staging directory and what is still staged in it (synchronous: runs at exit). */
  removeStaging(): void {
    const staging = this.staging;
    if (staging === undefined) return;
    this.staging = undefined;
    try {
      for (const e of readDirFd(staging.fd)) {
        if (e.name !== '.' && e.name !== '..') this.unlinkQuietly(staging.fd, e.name);
      }
      const tmp = openBeneath(this.rootDescriptor(), `${OBJECTS_DIR}/${STAGING_DIR}`, O_RDONLY | O_DIRECTORY);
      try {
        unlinkAt(tmp, staging.name, true);
      } finally {
        close(tmp);
      }
    } catch {
      // Left for the next store open (removeDeadStaging) to remove.
    } finally {
      close(staging.fd);
    }
  }

  private unlinkQuietly(dirFd: number, name: string): void {
    try {
      unlinkAt(dirFd, name);
    } catch { /* left for removeDeadStaging */ }
  }

  private unlinkStaged(name: string): void {
    try {
      unlinkAt(this.staging!.fd, name);
    } catch { /* removed with the staging directory at the latest */ }
  }

  private rootDescriptor(): number {
    this.rootFd ??= openRoot(this.root);
    return this.rootFd;
  }

  /** Close the root's descriptor (a store's own instance, when the store closes; opened again if used). */
  close(): void {
    if (this.rootFd !== undefined) close(this.rootFd);
    this.rootFd = undefined;
  }
}

/**
 * A store layer (`<root>/layers/sha256/<hex>/layer.tar` + its index) as a
 * LayerSource whose files can stand as their objects (ContentRef.whole).
 * Any other tar path: tarLayerSource.
 */
export function storeLayerSource(index: LayerIndex, tarPath: string, logger?: Logger): LayerSource {
  const layerDir = dirname(tarPath);
  const algorithmDir = dirname(layerDir);
  const root = dirname(dirname(algorithmDir));
  if (basename(tarPath) !== LAYER_TAR || basename(algorithmDir) !== 'sha256' || basename(dirname(algorithmDir)) !== 'layers' || !isDigest(`sha256:${basename(layerDir)}`)) {
    return tarLayerSource(index, tarPath);
  }
  const objects = ObjectStore.forRoot(root, logger);
  if (index.storage === 'skeleton') return skeletonLayerSource(index, layerDir, objects);
  const tarRel = `layers/sha256/${basename(layerDir)}/${LAYER_TAR}`;
  const plain = tarLayerSource(index, tarPath);
  return {
    index,
    content: (entry) => {
      const content = plain.content(entry);
      const digest = entry.digest;
      if (content === undefined || digest === undefined) return content;
      const source: ObjectSource = {
        size: content.size, offset: content.offset, openSource: () => objects.openInStore(tarRel),
      };
      return { ...content, whole: () => objects.open(digest, source) };
    },
  };
}

/**
 * A layer kept as skeleton + objects (storage/tarSkeleton.ts): a file's
 * bytes are its object (read with pread, like the tar's ranges; those of
 * PASSTHROUGH_MIN_LOWER_SIZE or more also stand behind opens as a FUSE
 * passthrough backing file), or a range of the layer's `inline` file.
 */
function skeletonLayerSource(index: LayerIndex, layerDir: string, objects: ObjectStore): LayerSource {
  return {
    index,
    content: (entry) => {
      const content = skeletonContent(entry, layerDir, objects.root);
      const digest = entry.digest;
      if (content === undefined || digest === undefined) return content;
      // Opened beneath the store root through the system-call layer (openat2), per open file.
      const rel = objectRelPath(digest)!;
      const open = (): number => objects.openInStore(rel);
      return entry.size < PASSTHROUGH_MIN_LOWER_SIZE ? { ...content, open } : { ...content, open, whole: () => objects.open(digest) };
    },
  };
}

/**
 * Make the objects of every file of a store layer now, as first opens
 * through a mount would one by one (benchmarks: the steady state); resolves
 * when they are made. Returns how many files it asked for.
 */
export async function makeLayerObjects(index: LayerIndex, tarPath: string): Promise<number> {
  const source = storeLayerSource(index, tarPath);
  let files = 0;
  for (const entry of index.entries) {
    if (entry.digest === undefined || entry.size < PASSTHROUGH_MIN_LOWER_SIZE) continue;
    const fd = source.content(entry)?.whole?.();
    if (fd !== undefined) closeSync(fd);
    files++;
  }
  const root = dirname(dirname(dirname(dirname(tarPath))));
  await ObjectStore.forRoot(root).idle();
  return files;
}

/** The digests of the objects present (GC, fsck). */
export function listObjects(root: string): string[] {
  const rootFd = openRoot(root);
  try {
    let algorithmDir: number;
    try {
      algorithmDir = openBeneath(rootFd, `${OBJECTS_DIR}/${ALGORITHM_DIR}`, O_RDONLY | O_DIRECTORY);
    } catch (err) {
      if (errnoNameOf(err) === 'ENOENT') return [];
      throw err;
    }
    const out: string[] = [];
    try {
      for (const fan of readDirFd(algorithmDir)) {
        if (!/^[0-9a-f]{2}$/.test(fan.name)) continue;
        const fanFd = openBeneath(algorithmDir, fan.name, O_RDONLY | O_DIRECTORY);
        try {
          for (const e of readDirFd(fanFd)) if (/^[0-9a-f]{64}$/.test(e.name) && e.name.startsWith(fan.name)) out.push(`sha256:${e.name}`);
        } finally {
          close(fanFd);
        }
      }
    } finally {
      close(algorithmDir);
    }
    return out;
  } finally {
    close(rootFd);
  }
}

/** What the object named `digest` hashes to (fsck). */
export async function hashObject(root: string, digest: string): Promise<string> {
  const rel = objectRelPath(digest);
  if (rel === undefined) throw new LayerdError(ErrorCodes.EINVAL, `not an object name: ${digest}`, { digest });
  const rootFd = openRoot(root);
  let fd: number;
  try {
    fd = openBeneath(rootFd, rel, O_RDONLY);
  } finally {
    close(rootFd);
  }
  const hash = createHash('sha256');
  // The stream closes the descriptor.
  for await (const chunk of createReadStream('', { fd, highWaterMark: COPY_CHUNK })) hash.update(chunk as Buffer);
  return `sha256:${hash.digest('hex')}`;
}

/** The size in bytes of the object of `digest`, 0 when there is none. */
export function objectSize(root: string, digest: string): number {
  const rel = objectRelPath(digest);
  if (rel === undefined) return 0;
  const rootFd = openRoot(root);
  try {
    const fd = openBeneath(rootFd, rel, O_PATH);
    try {
      return fstat(fd).size;
    } finally {
      close(fd);
    }
  } catch {
    return 0;
  } finally {
    close(rootFd);
  }
}

/** Remove the object of `digest` (GC); true if there was one. */
export function removeObject(root: string, digest: string): boolean {
  const rel = objectRelPath(digest);
  if (rel === undefined) return false;
  const rootFd = openRoot(root);
  try {
    const dir = openBeneath(rootFd, dirname(rel), O_PATH | O_DIRECTORY);
    try {
      unlinkAt(dir, basename(rel));
      return true;
    } finally {
      close(dir);
    }
  } catch (err) {
    if (errnoNameOf(err) === 'ENOENT') return false;
    throw err;
  } finally {
    close(rootFd);
  }
}

/** Object stores of this process with a staging directory, emptied and removed at exit (one listener for all). */
const stagingAtExit = new Set<ObjectStore>();

function removeAtExit(store: ObjectStore): void {
  if (stagingAtExit.size === 0) process.once('exit', () => { for (const s of stagingAtExit) s.removeStaging(); });
  stagingAtExit.add(store);
}

/** The staging directories in `objects/tmp/` (`<pid>-<random>`), for recovery and fsck. */
export function stagingDirs(root: string): { name: string; pid: number }[] {
  const rootFd = openRoot(root);
  try {
    const fd = openBeneath(rootFd, `${OBJECTS_DIR}/${STAGING_DIR}`, O_RDONLY | O_DIRECTORY);
    try {
      return readDirFd(fd).filter((e) => e.name !== '.' && e.name !== '..').map((e) => ({ name: e.name, pid: Number(e.name.split('-')[0]) }));
    } finally {
      close(fd);
    }
  } catch (err) {
    if (errnoNameOf(err) === 'ENOENT' || errnoCode(err) === 'ENOENT') return [];
    throw err;
  } finally {
    close(rootFd);
  }
}

/** `objects/tmp/<name>` relative to the root. */
export function stagingRelPath(name: string): string {
  return `${OBJECTS_DIR}/${STAGING_DIR}/${name}`;
}

/** Remove the staging directories of processes that are gone (what a crash mid-way left); returns how many. */
export async function removeDeadStaging(root: string): Promise<number> {
  let removed = 0;
  for (const { name, pid } of stagingDirs(root)) {
    if (pid === process.pid || (Number.isInteger(pid) && pid > 0 && processAlive(pid))) continue;
    await rm(join(root, stagingRelPath(name)), { recursive: true, force: true });
    removed++;
  }
  return removed;
}

function readAt(fd: number, buffer: Buffer, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buffer, 0, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function writeAt(fd: number, buffer: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => write(fd, buffer, 0, buffer.length, position, (err, n) => {
    if (err) reject(err);
    else if (n !== buffer.length) writeAt(fd, buffer.subarray(n), position + n).then(resolve, reject);
    else resolve();
  }));
}

/**
 * Give files an import staged (storage/tarSplit.ts: each hashed while it
 * was written) their object names, inside the commit's transaction: renamed
 * with RENAME_NOREPLACE, one that is there already kept as it is. Files are
 * in the import's ingest area, which the store synced before the commit.
 */
export function publishObjects(root: string, files: readonly { digest: string; path: string }[]): void {
  const rootFd = openRoot(root);
  const dirs = new Map<string, number>();
  const fanouts = new Map<string, number>();
  try {
    const algorithmDir = ensureDirBeneath(rootFd, `${OBJECTS_DIR}/${ALGORITHM_DIR}`);
    fanouts.set('', algorithmDir);
    for (const { digest, path } of files) {
      const rel = objectRelPath(digest);
      if (rel === undefined) throw new LayerdError(ErrorCodes.EINVAL, `not an object name: ${digest}`, { digest });
      const fanName = basename(dirname(rel));
      let fanout = fanouts.get(fanName);
      if (fanout === undefined) fanouts.set(fanName, fanout = ensureDirBeneath(algorithmDir, fanName));
      let from = dirs.get(dirname(path));
      if (from === undefined) dirs.set(dirname(path), from = openRoot(dirname(path)));
      try {
        renameAt(from, basename(path), fanout, basename(rel), RENAME_NOREPLACE, rel);
      } catch (err) {
        if (errnoNameOf(err) !== 'EEXIST') throw err;
      }
    }
  } finally {
    for (const fd of [...dirs.values(), ...fanouts.values()]) close(fd);
    close(rootFd);
  }
}

/** An O_PATH descriptor of directory `rel` beneath `dirFd`, made (0700) where missing. */
function ensureDirBeneath(dirFd: number, rel: string): number {
  let fd = dirFd;
  for (const part of rel.split('/')) {
    try {
      mkdirAt(fd, part, 0o700);
    } catch (err) {
      if (errnoNameOf(err) !== 'EEXIST') throw err;
    }
    const next = openBeneath(fd, part, O_PATH | O_DIRECTORY);
    if (fd !== dirFd) close(fd);
    fd = next;
  }
  return fd;
}
