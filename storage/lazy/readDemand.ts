/**
 * The background fill yields to on-demand reads (issue 16: a fill that
 * competes with a container's reads for the link kept the first output at
 * 0.27× of a full pull).
 *
 * The two sides live in different processes: chunks are fetched by the
 * processes serving lazy layers (mount hosts, `layerd mount`), the fill runs
 * in the daemon. They meet in one directory of the store,
 * `<root>/lazy/demand/`:
 *
 * - `ReadDemandSignal` (serving side): while a read waits for the registry,
 *   the process rewrites its file `demand/<pid>` every HEARTBEAT_MS, and once
 *   more when the last waiting read is answered.
 * - `ReadDemandGate` (daemon side): watches the directory (inotify) and is
 *   closed from the first write until QUIET_MS passed without one. The fill's
 *   blob downloads (registry/download.ts) stop at once when it closes — the
 *   connection is dropped, so the link is free at once, not after the socket
 *   buffers drained — and go on with a Range request from the byte they had
 *   when it opens again.
 *
 * A heartbeat, not a count: a serving process that dies mid-read stops
 * writing, and the fill goes on QUIET_MS later. Against starvation (a
 * container that reads lazily without pause), the gate stays closed at most
 * MAX_PAUSE_MS at a time and then open at least MIN_RUN_MS.
 */
import { type FSWatcher, watch } from 'node:fs';
import { mkdir, readdir, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { type Logger, silentLogger } from '../../common/log.js';
import { type FetchGate } from '../registry/download.js';
import { processAlive } from '../../common/process.js';

/** How often a process rewrites its demand file while reads wait. */
export const HEARTBEAT_MS = 250;

export interface GateTiming {
  /** The gate opens once no demand was seen for this long. */
  quietMs: number;
  /** It stays closed at most this long at a time… */
  maxPauseMs: number;
  /** …and then open at least this long, whatever is read. */
  minRunMs: number;
}

export const DEFAULT_GATE_TIMING: GateTiming = { quietMs: 1_000, maxPauseMs: 10_000, minRunMs: 2_000 };

/** `<root>/lazy/demand` for a lazy layer directory `<root>/lazy/sha256/<hex>`. */
export function demandDirOf(lazyLayerDir: string): string {
  return join(lazyLayerDir, '..', '..', 'demand');
}

/** The serving side: one per process and demand directory. */
export class ReadDemandSignal {
  private static readonly byDir = new Map<string, ReadDemandSignal>();
  private waiting = 0;
  private timer: NodeJS.Timeout | undefined;
  private writing = false;
  private readonly file: string;

  private constructor(private readonly dir: string) {
    this.file = join(dir, String(process.pid));
  }

  static for(dir: string): ReadDemandSignal {
    let signal = ReadDemandSignal.byDir.get(dir);
    if (signal === undefined) {
      signal = new ReadDemandSignal(dir);
      ReadDemandSignal.byDir.set(dir, signal);
    }
    return signal;
  }

  /** A read starts waiting for the registry; call the returned function when it no longer does. */
  begin(): () => void {
    if (this.waiting++ === 0) {
      this.touch();
      this.timer = setInterval(() => this.touch(), HEARTBEAT_MS);
      this.timer.unref();
    }
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      if (--this.waiting === 0) {
        clearInterval(this.timer);
        this.timer = undefined;
        this.touch(); // "recent" counts from the last answer
      }
    };
  }

  /** Rewrite the file (a write that fails loses only the yielding, never a read). */
  private touch(): void {
    if (this.writing) return; // the write in flight makes the event
    this.writing = true;
    void mkdir(this.dir, { recursive: true, mode: 0o700 })
      .then(() => writeFile(this.file, `${Date.now()}\n`, { mode: 0o600 }))
      .catch(() => undefined)
      .finally(() => { this.writing = false; });
  }
}

/** The daemon side: a FetchGate closed while serving processes report waiting reads. */
export class ReadDemandGate implements FetchGate {
  private closed = false;
  private lastDemand = 0;
  private pausedAt = 0;
  /** Until when demand does not close the gate (after a pause of MAX_PAUSE_MS). */
  private runUntil = 0;
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly closeListeners = new Set<() => void>();
  private openWaiters: (() => void)[] = [];
  /** Pauses so far and their total length, for the log and tests. */
  readonly stats = { pauses: 0, pausedMs: 0 };

  constructor(private readonly dir: string, private readonly timing: GateTiming = DEFAULT_GATE_TIMING, private readonly logger: Logger = silentLogger()) {}

  get open(): boolean {
    return !this.closed;
  }

  /** Watch the directory (made if missing); the files of processes that are gone are removed first. */
  async start(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    for (const name of await readdir(this.dir)) {
      const pid = Number(name);
      if (!Number.isSafeInteger(pid) || !processAlive(pid)) await unlink(join(this.dir, name)).catch(() => undefined);
    }
    try {
      this.watcher = watch(this.dir, { persistent: false }, () => this.demand());
      this.watcher.on('error', (err) => this.stopWatching(err));
    } catch (err) {
      this.stopWatching(err);
    }
  }

  stop(): void {
    this.watcher?.close();
    this.watcher = undefined;
    clearTimeout(this.timer);
    this.reopen();
  }

  whenOpen(signal?: AbortSignal): Promise<void> {
    if (!this.closed || signal?.aborted) return Promise.resolve();
    return new Promise((resolve) => {
      const done = (): void => { signal?.removeEventListener('abort', done); resolve(); };
      signal?.addEventListener('abort', done, { once: true });
      this.openWaiters.push(done);
    });
  }

  onClose(listener: () => void): () => void {
    this.closeListeners.add(listener);
    return () => this.closeListeners.delete(listener);
  }

  /**
   * Reads are about to come (the daemon creates a container while layers are
   * lazy): closed now, as by a demand file's write — the mount host's own
   * signal follows only once it started.
   */
  expectReads(): void {
    this.demand();
  }

  /** A serving process wrote its demand file. */
  private demand(): void {
    const now = Date.now();
    this.lastDemand = now;
    if (this.closed || now < this.runUntil) return;
    this.closed = true;
    this.pausedAt = now;
    this.stats.pauses++;
    this.logger.debug('lazy fill yields to reads');
    for (const listener of [...this.closeListeners]) listener();
    this.schedule();
  }

  private schedule(): void {
    clearTimeout(this.timer);
    const now = Date.now();
    const at = Math.min(this.lastDemand + this.timing.quietMs, this.pausedAt + this.timing.maxPauseMs);
    this.timer = setTimeout(() => {
      const later = Date.now();
      if (later - this.pausedAt >= this.timing.maxPauseMs) {
        this.runUntil = later + this.timing.minRunMs;
        this.reopen();
      } else if (later - this.lastDemand >= this.timing.quietMs) this.reopen();
      else this.schedule();
    }, Math.max(0, at - now));
    this.timer.unref();
  }

  private reopen(): void {
    if (!this.closed) return;
    this.closed = false;
    this.stats.pausedMs += Date.now() - this.pausedAt;
    const waiters = this.openWaiters;
    this.openWaiters = [];
    for (const wake of waiters) wake();
  }

  private stopWatching(err: unknown): void {
    this.logger.warn('lazy fills cannot watch for on-demand reads: they will not yield to them', { dir: this.dir, error: String(err) });
    this.watcher?.close();
    this.watcher = undefined;
  }
}
