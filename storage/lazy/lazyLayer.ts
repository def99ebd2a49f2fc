/**
 * A lazily pulled layer on disk, and serving it.
 *
 *   <root>/lazy/sha256/<diffID hex>/
 *     index.json   the layer index built from the eStargz TOC; a file's
 *                  `offset` is where its bytes go in `content`
 *     lazy.json    where the blob is (registry, repository, digest) and the
 *                  chunk table: which byte ranges of the blob inflate to
 *                  which bytes of which file, and their digests
 *     content      a sparse file: every regular file's bytes, one after the
 *                  other, filled in as they are fetched
 *     blob         a sparse file: the blob's compressed bytes of the chunks
 *                  fetched and verified, at their blob offsets, kept for
 *                  the background fill (fill.ts), which then asks the
 *                  registry only for the rest
 *     fetched      the ranges written to `blob`, a `start end` line each,
 *                  appended once their bytes are in (a hint: the fill
 *                  verifies the whole blob)
 *
 * Nothing records which chunks `content` holds: a process serving the layer
 * hashes a chunk's bytes the first time it needs them, and fetches them when
 * they do not match (a hole reads as zeros). So the cache is crash-safe with
 * no bookkeeping, shared by every process that serves the layer, and no byte
 * that was not verified against the TOC is ever handed to a reader.
 *
 * A read whose chunks cannot be fetched (registry down, bytes that do not
 * verify) is retried with backoff and then fails with EIO within
 * `readTimeoutMs`; a chunk that fails verification is fetched once more,
 * then EIO.
 */
import { createHash } from 'node:crypto';
import { close, constants as fsConstants, open, openSync, read, write } from 'node:fs';
import { access, mkdir, readFile, readdir, rename, writeFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { createGunzip } from 'node:zlib';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { fsError } from '../../common/sys/errors.js';
import { type Digest } from '../digest.js';
import { type ContentRef, LAYER_TAR, type LayerEntry, type LayerIndex, type LayerSource, PASSTHROUGH_MIN_LOWER_SIZE } from '../layerIndex.js';
import { ObjectStore, storeLayerSource } from '../objectStore.js';
import { repositoryScope } from '../registry/auth.js';
import { RegistryClient, headerValue, readLimited } from '../registry/client.js';
import { EMPTY_CONFIG, endpointsFor, loadRegistriesConfig } from '../registry/config.js';
import { readLayerIndex } from '../store.js';
import { type Chunk, type LazyFile } from './estargz.js';
import { inflateSpan } from './gzipIndex.js';
import { ReadDemandSignal, demandDirOf } from './readDemand.js';

export const LAZY_JSON = 'lazy.json';
export const LAZY_CONTENT = 'content';
export const LAZY_BLOB = 'blob';
export const LAZY_FETCHED = 'fetched';
export const LAZY_FORMAT_VERSION = 1 as const;

/** Default bound on one read of content that is not there yet (LAYERD_LAZY_READ_TIMEOUT_MS). */
export const DEFAULT_READ_TIMEOUT_MS = 30_000;
/** Range requests in flight at once for one layer. */
const MAX_FETCHES = 8;
/**
 * Compressed bytes a chunk's Range request also asks for past its chunk: the
 * chunks that follow it in the blob (mostly the next files of the same
 * directory, as a program's start reads them), verified and cached like any
 * other. One request instead of one per small file: a Python start reads
 * ~80 modules, and each request costs a round trip.
 */
const READAHEAD_BYTES = 512 * 1024;
/**
 * Background prefetch (see `prefetch`): requests in flight at once for one
 * layer. The on-demand reads keep the other MAX_FETCHES - PREFETCH_REQUESTS
 * slots, and a queued prefetch starts only once no read waits for a slot.
 */
const PREFETCH_REQUESTS = 2;
/** Compressed bytes one prefetch request asks for at most (its chunks, contiguous). */
const PREFETCH_REQUEST_BYTES = 512 * 1024;
/**
 * How far past an on-demand fetch (its read-ahead included) the background
 * read-ahead goes, in compressed bytes: while the program works on what it
 * just read, the next files of the directory are already coming.
 */
const PREFETCH_AHEAD_BYTES = 1024 * 1024;
/** At most this many compressed bytes before a `.prefetch.landmark` are prefetched when the layer is opened. */
const LANDMARK_PREFETCH_MAX_BYTES = 64 * 1024 * 1024;
/** The eStargz entries `ctr-remote image optimize` records: the files before the first were read by the workload (prefetch them); the second says there is nothing to prefetch. */
export const PREFETCH_LANDMARK = '.prefetch.landmark';
export const NO_PREFETCH_LANDMARK = '.no.prefetch.landmark';

/** Where a lazy layer's blob is, and how its bytes map onto its files. */
export interface LazyLayerInfo {
  version: typeof LAZY_FORMAT_VERSION;
  diffId: Digest;
  registry: string;
  repository: string;
  blobDigest: Digest;
  blobSize: number;
  mediaType: string;
  /** eStargz: the TOC's digest; a gzip-index layer: the index document's. */
  tocDigest: Digest;
  /** How `files` map onto the blob: eStargz members (the default) or gzip-index spans (one file: the whole tar). */
  format?: 'estargz' | 'gzip-index';
  /** The registries configuration (credentials, mirrors, CAs) to fetch with, if any. */
  registriesConfig?: string;
  contentSize: number;
  files: LazyFile[];
}

export async function readLazyInfo(dir: string): Promise<LazyLayerInfo> {
  const path = join(dir, LAZY_JSON);
  let info: LazyLayerInfo;
  try {
    info = JSON.parse(await readFile(path, 'utf8')) as LazyLayerInfo;
  } catch (err) {
    throw new LayerdError(ErrorCodes.ECORRUPT, `cannot read the lazy layer description ${path}: ${(err as Error).message}`, { path }, { cause: err });
  }
  if (info.version !== LAZY_FORMAT_VERSION || !Array.isArray(info.files)) {
    throw new LayerdError(ErrorCodes.ECORRUPT, `${path} is not a version-${LAZY_FORMAT_VERSION} lazy layer`, { path });
  }
  return info;
}

/** What a served lazy layer has done (for metrics and tests). */
export interface LazyStats {
  rangeRequests: number;
  fetchedBytes: number;
  /** Reads that had to wait for a fetch. */
  stalls: number;
  verifyFailures: number;
  /** Background prefetch requests (landmark and read-ahead; also counted in rangeRequests). */
  prefetchRequests: number;
  /** Chunks the background prefetch verified and cached. */
  prefetchedChunks: number;
}

export interface LazySourceOptions {
  readTimeoutMs?: number;
}

/** Where serving processes leave their LazyStats (one file per process and layer), for the daemon's /metrics. */
export function lazyStatsDir(lazyLayerDir: string): string {
  return join(lazyLayerDir, '..', '..', 'stats');
}

/** The sum of every LazyStats file under `statsDir`: counters that never go down, whoever wrote them. */
export async function sumLazyStats(statsDir: string): Promise<LazyStats> {
  const total: LazyStats = { rangeRequests: 0, fetchedBytes: 0, stalls: 0, verifyFailures: 0, prefetchRequests: 0, prefetchedChunks: 0 };
  for (const name of await readdir(statsDir).catch(() => [] as string[])) {
    if (!name.endsWith('.json')) continue;
    const stats = await readFile(join(statsDir, name), 'utf8').then((t) => JSON.parse(t) as Partial<LazyStats>, () => undefined);
    if (!stats) continue;
    for (const key of Object.keys(total) as (keyof LazyStats)[]) if (typeof stats[key] === 'number') total[key] += stats[key];
  }
  return total;
}

export function readTimeoutFromEnv(): number {
  const ms = Number(process.env['LAYERD_LAZY_READ_TIMEOUT_MS']);
  return Number.isFinite(ms) && ms > 0 ? ms : DEFAULT_READ_TIMEOUT_MS;
}

/** A lazy layer directory as a LayerSource whose reads fetch what is missing. */
export class LazyLayerSource implements LayerSource {
  readonly stats: LazyStats = { rangeRequests: 0, fetchedBytes: 0, stalls: 0, verifyFailures: 0, prefetchRequests: 0, prefetchedChunks: 0 };
  private readonly byOffset = new Map<number, LazyFile>();
  /** Chunks known to be in `content`, verified (key: content offset of the chunk). */
  private readonly present = new Set<number>();
  private readonly inFlight = new Map<number, Promise<void>>();
  private clients: Promise<RegistryClient[]> | undefined;
  private readonly readTimeoutMs: number;
  private readonly contentPath: string;
  private statsTimer: NodeJS.Timeout | undefined;
  private fetching = 0;
  private readonly waiting: (() => void)[] = [];
  /** Every chunk fetched from the blob, in blob order (key: its content offset), and each key's place in it: for read-ahead. */
  private readonly blobOrder: { key: number; chunk: Chunk; fileEnd: number }[];
  private readonly orderOf = new Map<number, number>();
  /** Regions of the blob to prefetch, in order: from a place in blobOrder up to a blob offset. */
  private readonly prefetchQueue: { from: number; until: number; marks: boolean }[] = [];
  private prefetching = 0;
  /** Of `fetching`, the prefetch requests. */
  private prefetchFetching = 0;
  private prefetchesDone: (() => void) | undefined;
  /**
   * Chunks cached by read-ahead or prefetch that no read used yet: the first
   * read of one moves the background read-ahead on past it (as the kernel's
   * asynchronous read-ahead marker does), so a program reading on through a
   * directory finds the next files coming.
   */
  private readonly unused = new Set<number>();
  private closed = false;
  /** The store's content-addressed objects (storage/objectStore.ts), when the layer is in a store's lazy directory. */
  private readonly objects: ObjectStore | undefined;

  /**
   * The content file, open for the source's life: the fill removes the lazy
   * directory when the layer is complete, and mounts of it go on reading
   * (and fetching into) this descriptor.
   */
  private readonly fd: number;
  /** `blob` and `fetched`, open for the source's life like `content` (undefined if they could not be opened: nothing is kept). */
  private readonly kept: { blob: number; fetched: number } | undefined;
  /** keepCompressed writes under way: the descriptors are closed once none is. */
  private readonly keeping = new Set<Promise<void>>();

  private constructor(readonly dir: string, readonly index: LayerIndex, readonly info: LazyLayerInfo, fd: number, options: LazySourceOptions,
    kept: { blob: number; fetched: number } | undefined) {
    this.fd = fd;
    this.kept = kept;
    for (const f of info.files) this.byOffset.set(f.offset, f);
    this.blobOrder = info.files.flatMap((f) => f.chunks.filter((c) => c.start >= 0).map((chunk) => ({ key: f.offset + chunk.fileOffset, chunk, fileEnd: f.offset + f.size })))
      .sort((a, b) => a.chunk.start - b.chunk.start);
    this.blobOrder.forEach((c, i) => this.orderOf.set(c.key, i));
    this.readTimeoutMs = options.readTimeoutMs ?? readTimeoutFromEnv();
    this.contentPath = join(dir, LAZY_CONTENT);
    const complete = completeDirOf(dir);
    this.objects = complete !== undefined ? ObjectStore.forRoot(dirname(dirname(dirname(complete)))) : undefined;
  }

  static async open(dir: string, options: LazySourceOptions = {}): Promise<LazyLayerSource> {
    const info = await readLazyInfo(dir);
    const index = await readLayerIndex(dir, info.diffId);
    const fd = await promisify(open)(join(dir, LAZY_CONTENT), fsConstants.O_RDWR);
    const source = new LazyLayerSource(dir, index, info, fd, options, await openKept(dir));
    // A layer is opened to be read (a mount host starting, a container about to run): the fill yields from now
    // (readDemand.ts), not only from the first read's request, whose first bytes would share the link with it.
    ReadDemandSignal.for(demandDirOf(dir)).begin()();
    source.prefetchLandmark();
    return source;
  }

  /**
   * An image `ctr-remote image optimize` made puts the files its workload
   * read first in each layer, then a `.prefetch.landmark` entry: the blob
   * before the landmark is fetched in the background as soon as the layer
   * is opened (as stargz-snapshotter does), up to LANDMARK_PREFETCH_MAX_BYTES.
   * `.no.prefetch.landmark` (the workload read nothing of the layer) or no
   * landmark: nothing.
   */
  private prefetchLandmark(): void {
    const landmark = this.index.entries.find((e) => e.kind === 'file' && e.path.replace(/^\/+/, '') === PREFETCH_LANDMARK);
    if (landmark?.offset === undefined) return;
    const start = (this.byOffset.get(landmark.offset) ?? this.containing(landmark.offset, Math.max(1, landmark.size)))?.chunks[0]?.start;
    if (start === undefined || start <= 0) return;
    // The workload's own reads: not a sequence to read on past (no read-ahead markers).
    this.prefetch(0, Math.min(start, LANDMARK_PREFETCH_MAX_BYTES), false);
  }

  content(entry: LayerEntry): ContentRef | undefined {
    if (entry.kind !== 'file' || entry.size === 0 || entry.offset === undefined) return undefined;
    const offset = entry.offset;
    const file = this.byOffset.get(offset) ?? this.containing(offset, entry.size);
    // Through this process's descriptor: the path is gone once the layer is complete.
    const open = (): number => openSync(`/proc/self/fd/${this.fd}`, fsConstants.O_RDONLY);
    const { digest } = entry;
    return {
      path: this.contentPath, offset, size: entry.size, open,
      ready: (from, length) => (file === undefined
        ? Promise.reject(fsError('EIO', entry.path, 'read'))
        : this.ready(file, offset - file.offset + from, length, entry.path)),
      ...(this.objects !== undefined && digest !== undefined && file !== undefined && entry.size >= PASSTHROUGH_MIN_LOWER_SIZE ? {
        // Its object, as a stored layer's file has one (FUSE passthrough): made once every chunk of the file is here and
        // verified (the object store hashes the bytes again against the digest before naming them).
        whole: () => this.objects!.open(digest, this.allPresent(file, offset - file.offset, entry.size)
          ? { size: entry.size, offset, openSource: open } : undefined),
      } : {}),
    };
  }

  /** Whether every chunk of bytes [from, from + length) of `file` is in `content`, verified by this process. */
  private allPresent(file: LazyFile, from: number, length: number): boolean {
    const end = from + length;
    return file.chunks.every((c) => c.fileOffset >= end || c.fileOffset + c.length <= from || this.present.has(file.offset + c.fileOffset));
  }

  /** The LazyFile whose bytes hold [offset, offset + size): a gzip-index layer has one, the whole tar. */
  private containing(offset: number, size: number): LazyFile | undefined {
    return this.info.files.find((f) => f.offset <= offset && offset + size <= f.offset + f.size);
  }

  /** Make bytes [from, from + length) of `file` present and verified. */
  async ready(file: LazyFile, from: number, length: number, path: string): Promise<void> {
    const end = Math.min(file.size, from + length);
    const covering = file.chunks.filter((c) => c.fileOffset < end && c.fileOffset + c.length > from);
    for (const c of covering) if (this.unused.delete(file.offset + c.fileOffset)) this.prefetchAfter(file.offset + c.fileOffset);
    const wanted = covering.filter((c) => !this.present.has(file.offset + c.fileOffset));
    if (wanted.length === 0) return;
    await Promise.all(wanted.map((c) => this.ensure(file, c, path)));
  }

  async close(): Promise<void> {
    this.closed = true;
    this.prefetchQueue.length = 0;
    // A prefetch still under way writes into the descriptor: it is closed once none is (never a reused number).
    if (this.prefetching > 0) await new Promise<void>((resolve) => { this.prefetchesDone = resolve; });
    await promisify(close)(this.fd).catch(() => undefined);
    while (this.keeping.size > 0) await Promise.all([...this.keeping]);
    if (this.kept) for (const fd of [this.kept.blob, this.kept.fetched]) await promisify(close)(fd).catch(() => undefined);
    if (this.clients) for (const c of await this.clients.catch(() => [])) c.close();
  }

  private ensure(file: LazyFile, chunk: Chunk, path: string, readaheadMisses = 0): Promise<void> {
    const key = file.offset + chunk.fileOffset;
    const work = this.inFlight.get(key);
    // Being read ahead by another chunk's request: if that did not bring it, fetch it (twice at most behind read-aheads that fail).
    if (work !== undefined && readaheadMisses < 2) {
      // The fill pauses while a read waits for a prefetch or read-ahead as for its own fetch.
      const waited = ReadDemandSignal.for(demandDirOf(this.dir)).begin();
      return work.finally(waited).then(() => (this.present.has(key) ? undefined : this.ensure(file, chunk, path, readaheadMisses + 1)));
    }
    const own = this.load(key, chunk, path).finally(() => { if (this.inFlight.get(key) === own) this.inFlight.delete(key); });
    this.inFlight.set(key, own);
    return own;
  }

  private async load(key: number, chunk: Chunk, path: string): Promise<void> {
    // Already in the cache (another process, an earlier run)?
    const have = Buffer.alloc(chunk.length);
    const bytesRead = await readAt(this.fd, have, key);
    if (bytesRead === chunk.length && sha256(have) === chunk.digest) {
      this.present.add(key);
      return;
    }
    if (chunk.start < 0) throw this.eio(path, chunk, 'a local chunk is missing from the cache');
    this.stats.stalls++;
    this.noteStats();
    // The daemon's background fill pauses while this read waits (readDemand.ts).
    const waited = ReadDemandSignal.for(demandDirOf(this.dir)).begin();
    try {
      await this.fetchVerified(key, chunk, path);
    } finally {
      waited();
    }
  }

  /** Fetch, verify and store one chunk: retried within the read bound, refetched once after bad bytes. */
  private async fetchVerified(key: number, chunk: Chunk, path: string): Promise<void> {
    const deadline = Date.now() + this.readTimeoutMs;
    let failures = 0;
    let badBytes = 0;
    let last: unknown;
    for (let attempt = 0; ; attempt++) {
      let member: Buffer | undefined;
      // The first request also asks for what follows the chunk (not when it is asked again), and the region after that comes in the background.
      const ahead = attempt === 0 ? this.claimReadahead(key) : [];
      if (attempt === 0) this.prefetchAfter(ahead.at(-1)?.key ?? key);
      let fetched: Buffer | undefined;
      try {
        fetched = await this.withDeadline(this.fetchRange(chunk.start, ahead.at(-1)?.chunk.end ?? chunk.end), deadline);
        member = fetched.subarray(0, chunk.end - chunk.start);
      } catch (err) {
        last = err;
      } finally {
        void this.keepReadahead(ahead, fetched, chunk.start);
      }
      if (member !== undefined) {
        const bytes = await inflateChunk(chunk, member).catch(() => undefined);
        if (bytes !== undefined && sha256(bytes) === chunk.digest) {
          await writeAt(this.fd, bytes, key);
          this.present.add(key);
          this.noteStats();
          void this.keepCompressed(chunk, member);
          return;
        }
        this.stats.verifyFailures++;
        this.noteStats();
        // Refetched once: bytes that fail twice are not a glitch of the network.
        if (++badBytes >= 2) throw this.eio(path, chunk, 'the fetched bytes do not match the TOC chunk digest');
        continue;
      }
      const wait = Math.min(2_000, 100 * 2 ** failures++);
      if (Date.now() + wait >= deadline) throw this.eio(path, chunk, `could not be fetched within ${this.readTimeoutMs} ms: ${(last as Error)?.message ?? last}`);
      await sleep(wait);
    }
  }

  /**
   * The chunks right after `key` in the blob, up to READAHEAD_BYTES past its
   * end and contiguous, that no one has or fetches; each is marked in flight
   * (a read of it waits for this request) until keepReadahead releases it.
   */
  private claimReadahead(key: number): { key: number; chunk: Chunk; release: () => void }[] {
    const at = this.orderOf.get(key);
    if (at === undefined) return [];
    const first = this.blobOrder[at]!.chunk;
    return this.claimRun(at + 1, first.end, first.end + READAHEAD_BYTES);
  }

  /**
   * Claim the chunks from blobOrder[at] on that start at `prevEnd` and go on
   * contiguously, end by `limit`, and that no one has or fetches: each is
   * marked in flight (a read of it waits for this request) until
   * keepReadahead releases it.
   */
  private claimRun(at: number, prevEnd: number, limit: number): { key: number; chunk: Chunk; release: () => void }[] {
    const claimed: { key: number; chunk: Chunk; release: () => void }[] = [];
    for (let i = at; i < this.blobOrder.length; i++) {
      const next = this.blobOrder[i]!;
      if (next.chunk.start !== prevEnd || next.chunk.end > limit) break;
      if (this.present.has(next.key) || this.inFlight.has(next.key)) break;
      let release: () => void = () => undefined;
      // Resolves (never rejects) once the read-ahead verified it or gave up: a reader waiting on it then fetches it itself (ensure).
      const work: Promise<void> = new Promise<void>((resolve) => { release = resolve; })
        .finally(() => { if (this.inFlight.get(next.key) === work) this.inFlight.delete(next.key); });
      this.inFlight.set(next.key, work);
      claimed.push({ ...next, release });
      prevEnd = next.chunk.end;
    }
    return claimed;
  }

  /**
   * Background read-ahead: the PREFETCH_AHEAD_BYTES of the blob after the
   * chunk at content offset `key`, and the next chunk of the same file
   * whatever its size (eStargz: a big file read from its start, such as a
   * program's binary, goes on being read) — unless that is had or coming
   * already, or half of the window is (then a read further on moves it:
   * requests of half a window at least, not one per small file as it slides).
   * Gzip-index layers: the next span, if it is neither had nor coming.
   */
  private prefetchAfter(key: number): void {
    const at = this.orderOf.get(key);
    if (at === undefined) return;
    const { chunk, fileEnd } = this.blobOrder[at]!;
    const next = this.blobOrder[at + 1];
    if (chunk.checkpoint !== undefined) {
      // A gzip-index span (~4 MiB of the tar's blob, a directory's files or more): the window is no
      // fraction of one, so the next span whole — the tar goes on with the files read next.
      if (next !== undefined && !this.present.has(next.key) && !this.inFlight.has(next.key)) this.prefetch(at + 1, next.chunk.end);
      return;
    }
    const sameFile = next !== undefined && key + chunk.length < fileEnd && next.key === key + chunk.length;
    const until = Math.max(chunk.end + PREFETCH_AHEAD_BYTES, sameFile ? next.chunk.end : 0);
    let i = at + 1;
    while (i < this.blobOrder.length && (this.present.has(this.blobOrder[i]!.key) || this.inFlight.has(this.blobOrder[i]!.key))) i++;
    const covered = i < this.blobOrder.length ? this.blobOrder[i]!.chunk.start : Infinity;
    if (covered >= until || covered - chunk.end >= PREFETCH_AHEAD_BYTES / 2) return;
    this.prefetch(i, until);
  }

  /**
   * Fetch in the background the chunks of blobOrder[from…] that end by blob
   * offset `until` and are neither had nor being fetched: at most
   * PREFETCH_REQUESTS requests at once, each of up to PREFETCH_REQUEST_BYTES,
   * started only while no on-demand fetch waits for a slot. Verified and
   * cached like read-ahead (a chunk that does not verify is left to the read
   * that needs it); failures are dropped: prefetching is only a guess.
   */
  private prefetch(from: number, until: number, marks = true): void {
    if (this.closed || from >= this.blobOrder.length) return;
    this.prefetchQueue.push({ from, until, marks });
    this.pumpPrefetch();
  }

  private pumpPrefetch(): void {
    // Only while no read's own request is under way: the relay or link shares its bandwidth by connection, and the reads' requests go first.
    while (!this.closed && this.prefetching < PREFETCH_REQUESTS && this.fetching === this.prefetchFetching) {
      const region = this.prefetchQueue[0];
      if (region === undefined) return;
      // The first chunk of the region still wanted; the region goes on after what this request claims.
      let i = region.from;
      while (i < this.blobOrder.length && this.blobOrder[i]!.chunk.end <= region.until
        && (this.present.has(this.blobOrder[i]!.key) || this.inFlight.has(this.blobOrder[i]!.key))) i++;
      const first = this.blobOrder[i];
      if (first === undefined || first.chunk.end > region.until) {
        this.prefetchQueue.shift();
        continue;
      }
      const claimed = this.claimRun(i, first.chunk.start, Math.min(region.until, first.chunk.start + Math.max(PREFETCH_REQUEST_BYTES, first.chunk.end - first.chunk.start)));
      region.from = i + claimed.length;
      if (claimed.length === 0) {
        this.prefetchQueue.shift();
        continue;
      }
      this.prefetching++;
      void this.prefetchRun(claimed, region.marks).finally(() => {
        if (--this.prefetching === 0 && this.closed) this.prefetchesDone?.();
        this.pumpPrefetch();
      });
    }
  }

  /** One prefetch request: what another process already cached is taken from `content`, the rest fetched, verified and cached. */
  private async prefetchRun(claimed: { key: number; chunk: Chunk; release: () => void }[], marks: boolean): Promise<void> {
    let wanted = claimed;
    try {
      const cached: typeof claimed = [];
      for (const c of claimed) {
        const have = Buffer.alloc(c.chunk.length);
        if (await readAt(this.fd, have, c.key) === c.chunk.length && sha256(have) === c.chunk.digest) cached.push(c);
        else break; // one request for a contiguous run: from the first chunk not cached on
      }
      for (const c of cached) {
        this.present.add(c.key);
        c.release();
      }
      wanted = claimed.slice(cached.length);
      if (wanted.length === 0 || this.closed) return;
      // Bounded like one request of a read (its idle timeout): a read waiting for a claimed chunk then fetches it itself.
      const deadline = Date.now() + Math.min(this.readTimeoutMs, 10_000);
      // A guess does not hold the fill back; a read that waits for it does (ensure).
      let fetched: Buffer | undefined;
      try {
        this.stats.prefetchRequests++;
        fetched = await this.withDeadline(this.fetchRange(wanted[0]!.chunk.start, wanted.at(-1)!.chunk.end, true), deadline);
      } catch {
        // a guess that failed: the reads fetch what they need themselves
      }
      // Awaited first: `+= await` would read the counter before the await, losing a concurrent prefetch's count.
      const kept = await this.keepReadahead(wanted, fetched, wanted[0]!.chunk.start, marks);
      this.stats.prefetchedChunks += kept;
      wanted = [];
      this.noteStats();
    } finally {
      for (const c of wanted) c.release();
    }
  }

  /** Verify and cache the read-ahead chunks of `fetched` (blob bytes from `base`), then release them; how many were kept. */
  private async keepReadahead(ahead: { key: number; chunk: Chunk; release: () => void }[], fetched: Buffer | undefined, base: number, marks = true): Promise<number> {
    let kept = 0;
    for (const a of ahead) {
      try {
        if (fetched === undefined || fetched.length < a.chunk.end - base) continue;
        const bytes = await inflateChunk(a.chunk, fetched.subarray(a.chunk.start - base, a.chunk.end - base)).catch(() => undefined);
        if (bytes === undefined || sha256(bytes) !== a.chunk.digest) continue;
        await writeAt(this.fd, bytes, a.key);
        this.present.add(a.key);
        void this.keepCompressed(a.chunk, fetched.subarray(a.chunk.start - base, a.chunk.end - base));
        kept++;
        if (marks) this.unused.add(a.key);
      } catch {
        // (a write that failed: the reader fetches it itself)
      } finally {
        a.release();
      }
    }
    return kept;
  }

  /**
   * Keep a verified chunk's compressed bytes (blob offsets [chunk.start,
   * chunk.end)) for the fill, then record the range. A failure loses only
   * that: the fill downloads what is not recorded.
   */
  private keepCompressed(chunk: Chunk, compressed: Buffer): Promise<void> {
    const kept = this.kept;
    if (kept === undefined || this.closed || chunk.start < 0 || compressed.length !== chunk.end - chunk.start) return Promise.resolve();
    const work = writeAt(kept.blob, compressed, chunk.start)
      .then(() => appendTo(kept.fetched, Buffer.from(`${chunk.start} ${chunk.end}\n`)))
      .catch(() => undefined) // (only the fill's shortcut is lost)
      .finally(() => this.keeping.delete(work));
    this.keeping.add(work);
    return work;
  }

  /** Write the counters for /metrics, at most once a second (the write may fail: only metrics are lost). */
  private noteStats(): void {
    if (this.statsTimer !== undefined) return;
    this.statsTimer = setTimeout(() => {
      this.statsTimer = undefined;
      const dir = lazyStatsDir(this.dir);
      const file = join(dir, `${this.info.diffId.slice(7, 19)}-${process.pid}.json`);
      void mkdir(dir, { recursive: true, mode: 0o700 })
        .then(() => writeFile(`${file}.tmp`, JSON.stringify(this.stats), { mode: 0o600 }))
        .then(() => rename(`${file}.tmp`, file))
        .catch(() => undefined);
    }, 1000);
    this.statsTimer.unref();
  }

  private eio(path: string, chunk: Chunk, why: string): Error {
    const err = fsError('EIO', path, 'read');
    err.message = `${this.info.blobDigest} (${path} at ${chunk.fileOffset}): ${why}`;
    return err;
  }

  private async withDeadline<T>(work: Promise<T>, deadline: number): Promise<T> {
    const left = deadline - Date.now();
    if (left <= 0) throw new LayerdError(ErrorCodes.EIO, 'read deadline passed');
    const controller = new AbortController();
    try {
      return await Promise.race([work, sleep(left, undefined, { signal: controller.signal }).then(() => {
        throw new LayerdError(ErrorCodes.EIO, 'read deadline passed');
      })]);
    } finally {
      controller.abort();
      work.catch(() => undefined);
    }
  }

  private registryClients(): Promise<RegistryClient[]> {
    this.clients ??= (async () => {
      const config = this.info.registriesConfig ? await loadRegistriesConfig(this.info.registriesConfig) : EMPTY_CONFIG;
      const idle = Math.min(10_000, this.readTimeoutMs);
      return (await endpointsFor(config, this.info.registry, true)).map((e) => new RegistryClient(
        e, { retries: 0, backoffMs: 0, maxBackoffMs: 0 }, { timeouts: { connectMs: idle, idleMs: idle, totalMs: 0 } },
      ));
    })();
    this.clients.catch(() => { this.clients = undefined; });
    return this.clients;
  }

  /** Blob bytes [start, end) (gzip members), by a Range request: at most MAX_FETCHES at once per layer (a copy-up of a big file asks for all its chunks). */
  private async fetchRange(start: number, end: number, prefetch = false): Promise<Buffer> {
    while (this.fetching >= MAX_FETCHES) await new Promise<void>((wake) => this.waiting.push(wake));
    this.fetching++;
    if (prefetch) this.prefetchFetching++;
    try {
      return await this.fetchMembers(start, end);
    } finally {
      this.fetching--;
      if (prefetch) this.prefetchFetching--;
      this.waiting.shift()?.();
      // After the woken read took its slot: the reads go first.
      if (this.prefetchQueue.length > 0) setImmediate(() => this.pumpPrefetch());
    }
  }

  private async fetchMembers(start: number, end: number): Promise<Buffer> {
    const clients = await this.registryClients();
    let last: unknown;
    for (const client of clients) {
      try {
        this.stats.rangeRequests++;
        const res = await client.request({
          method: 'GET', path: `/v2/${this.info.repository}/blobs/${this.info.blobDigest}`,
          headers: { range: `bytes=${start}-${end - 1}` }, scopes: [repositoryScope(this.info.repository, 'pull')],
          expect: [206], context: { repository: this.info.repository, digest: this.info.blobDigest },
        });
        const range = /^bytes (\d+)-(\d+)\//.exec(headerValue(res.headers['content-range']) ?? '');
        if (!range || Number(range[1]) !== start || Number(range[2]) !== end - 1) {
          res.body.destroy();
          throw new LayerdError(ErrorCodes.EFORMAT, `asked for bytes ${start}-${end - 1}, got Content-Range '${res.headers['content-range'] ?? ''}'`);
        }
        const member = await readLimited(res.body, end - start, client.registry);
        this.stats.fetchedBytes += member.length;
        return member;
      } catch (err) {
        last = err;
      }
    }
    throw last;
  }
}

/** The first `length` bytes a gzip member inflates to (it may go on with tar headers); rejects if it has fewer or is broken. */
function inflatePrefix(member: Buffer, length: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const inflater = createGunzip();
    const parts: Buffer[] = [];
    let have = 0;
    let settled = false;
    const settle = (fn: () => void): void => {
      if (settled) return;
      settled = true;
      fn();
    };
    inflater.on('data', (data: Buffer) => {
      parts.push(data);
      have += data.length;
      if (have >= length) settle(() => { inflater.destroy(); resolve(Buffer.concat(parts).subarray(0, length)); });
    });
    inflater.on('end', () => settle(() => reject(new LayerdError(ErrorCodes.EFORMAT, `chunk inflates to ${have} bytes, not ${length}`))));
    inflater.on('error', (err) => settle(() => reject(err)));
    inflater.end(member);
  });
}

/** A chunk's bytes from its compressed range: an eStargz gzip member, or a gzip-index span from its checkpoint. */
function inflateChunk(chunk: Chunk, compressed: Buffer): Promise<Buffer> {
  return chunk.checkpoint ? inflateFromCheckpoint(chunk, compressed) : inflatePrefix(compressed, chunk.length);
}

/** A gzip-index span: its bytes inflated from its checkpoint (gzipIndex.ts). */
async function inflateFromCheckpoint(chunk: Chunk, compressed: Buffer): Promise<Buffer> {
  return inflateSpan(chunk.checkpoint!, chunk.length, compressed, `span at ${chunk.start}`);
}

function readAt(fd: number, buffer: Buffer, position: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buffer, 0, buffer.length, position, (err, n) => (err ? reject(err) : resolve(n))));
}

/** `blob` (made sparse if missing) and `fetched` (appended to) of a lazy directory; undefined if they cannot be opened. */
async function openKept(dir: string): Promise<{ blob: number; fetched: number } | undefined> {
  const openFile = promisify(open);
  let blob: number | undefined;
  try {
    blob = await openFile(join(dir, LAZY_BLOB), fsConstants.O_WRONLY | fsConstants.O_CREAT, 0o600);
    return { blob, fetched: await openFile(join(dir, LAZY_FETCHED), fsConstants.O_WRONLY | fsConstants.O_APPEND | fsConstants.O_CREAT, 0o600) };
  } catch {
    if (blob !== undefined) await promisify(close)(blob).catch(() => undefined);
    return undefined;
  }
}

/** One write(2) at the end of an O_APPEND descriptor: a whole line, never interleaved with another process's. */
function appendTo(fd: number, buffer: Buffer): Promise<void> {
  return new Promise((resolve, reject) => write(fd, buffer, 0, buffer.length, null, (err) => (err ? reject(err) : resolve())));
}

function writeAt(fd: number, buffer: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => write(fd, buffer, 0, buffer.length, position, (err) => (err ? reject(err) : resolve())));
}

function sha256(bytes: Buffer): Digest {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

/** How the union filesystem reads a store layer: from its tar, or fetching what a lazy one lacks. */
export async function storedLayerSource(layer: { index: LayerIndex; tarPath: string; lazyDir?: string }, options: LazySourceOptions = {}): Promise<LayerSource> {
  return layer.lazyDir !== undefined ? layerDirSource(layer.lazyDir, options) : storeLayerSource(layer.index, layer.tarPath);
}

/**
 * A layer directory as a mount host is given it: a lazy one (`lazy/sha256/<hex>`) or a complete
 * one. A lazy directory may be gone by the time it is opened — its fill completed after the caller
 * chose it — and then the complete layer is there (the fill commits it before removing the lazy one).
 */
export async function layerDirSource(dir: string, options: LazySourceOptions = {}): Promise<LayerSource> {
  const complete = completeDirOf(dir);
  if (complete === undefined) return storeLayerSource(await readLayerIndex(dir), join(dir, LAYER_TAR));
  try {
    return await LazyLayerSource.open(dir, options);
  } catch (err) {
    if (!await access(join(complete, 'index.json')).then(() => true, () => false)) throw err;
    return storeLayerSource(await readLayerIndex(complete), join(complete, LAYER_TAR));
  }
}

/** `<root>/layers/sha256/<hex>` for a lazy layer directory `<root>/lazy/sha256/<hex>`, else undefined. */
function completeDirOf(dir: string): string | undefined {
  const algorithmDir = dirname(dir);
  if (basename(algorithmDir) !== 'sha256' || basename(dirname(algorithmDir)) !== 'lazy') return undefined;
  return join(dirname(dirname(algorithmDir)), 'layers', 'sha256', basename(dir));
}
