/**
 * Warming a container's new mount with what the last container of the same
 * image read at its start (issue 15: later runs).
 *
 * Every container gets a new FUSE mount, and the kernel caches names,
 * attributes and pages per mount: a start-up on it (runc, a shell, python3)
 * costs ~230 round trips to the mount host that a mount already used would
 * answer from the kernel's caches — each one a wake-up of another process,
 * which on a busy small machine is most of the gap to kernel overlayfs. So
 * the mount host records the accesses of a mount's first seconds
 * (mount/accessRecord.ts: lookups, negative ones too, listings, reads,
 * readlinks; paths only), the daemon keeps the last record per image chain,
 * and when it mounts the next container of that chain it repeats them in
 * the background (mountWarmerWorker.ts), while containerd and runc set the
 * container up, so that the container's own accesses find the kernel's
 * caches filled. Nothing waits for the warm-up: Prepare answers as before,
 * and Remove (or Commit) stops a warm-up still running first.
 *
 * The warm-up only reads (no open for writing, no copy-up, nothing in the
 * upper dir), through the mount, as the container would: what it finds is
 * what the container would find at that moment. A file it has open
 * (read-only, served by the mount host) is not passed through to a lower
 * object, so a concurrent open of it for writing is not refused (ETXTBSY is
 * only for opens of a lower object's backing, which reads of small files
 * never take: passthrough starts at 256 KiB, and such reads never reach the
 * host to be recorded).
 */
import { Worker } from 'node:worker_threads';
import type { Logger } from '../../common/log.js';
import type { AccessOp } from '../../mount/accessRecord.js';
import type { WarmJob, WarmResult } from './mountWarmerWorker.js';

/** Records kept (image chains), the most recently used last. */
const RECORDS_KEPT = 16;

interface Running { cancel: Int32Array; done: Promise<WarmResult | undefined> }

export class MountWarmer {
  private readonly records = new Map<string, AccessOp[]>();
  private worker: Worker | undefined;
  private nextId = 1;
  private readonly waiting = new Map<number, (result: WarmResult | undefined) => void>();
  private readonly running = new Map<string, Running>();
  private stopped = false;

  constructor(private readonly logger: Logger) {}

  /** Keep `ops` (a stopped mount's record) as what the next mount of `chain` repeats. */
  remember(chain: string, ops: AccessOp[] | undefined): void {
    if (ops === undefined || ops.length === 0) return;
    this.records.delete(chain);
    this.records.set(chain, ops);
    if (this.records.size > RECORDS_KEPT) this.records.delete(this.records.keys().next().value!);
  }

  /**
   * Start warming `mountpoint` (snapshot `key`, chain `chain`) in the
   * background, if a record of the chain is kept; the promise (for tests)
   * tells how it went (undefined: the thread was lost).
   */
  start(key: string, chain: string, mountpoint: string): Promise<WarmResult | undefined> | undefined {
    const ops = this.records.get(chain);
    if (ops === undefined || this.stopped || this.running.has(key)) return undefined;
    const cancel = new Int32Array(new SharedArrayBuffer(4));
    const id = this.nextId++;
    const done = new Promise<WarmResult | undefined>((resolve) => this.waiting.set(id, resolve));
    this.running.set(key, { cancel, done });
    const job: WarmJob = { id, mountpoint, ops, cancel: cancel.buffer as SharedArrayBuffer };
    this.workerThread().postMessage(job);
    void done.then((result) => {
      this.running.delete(key);
      if (result === undefined) return;
      const { done: repeated, failed, ms, stopped } = result;
      this.logger.info('snapshot mount warmed', { snapshot: key, ops: ops.length, repeated, failed, ms, ...(stopped !== undefined ? { stopped } : {}) });
    });
    return done;
  }

  /** Stop the warm-up of `key` (if one runs) and wait until it no longer touches the mount. */
  async stop(key: string): Promise<void> {
    const running = this.running.get(key);
    if (running === undefined) return;
    Atomics.store(running.cancel, 0, 1);
    await running.done;
  }

  /** Stop everything (the daemon is stopping). */
  async close(): Promise<void> {
    this.stopped = true;
    await Promise.all([...this.running.keys()].map((key) => this.stop(key)));
    await this.worker?.terminate();
    this.worker = undefined;
  }

  private workerThread(): Worker {
    if (this.worker !== undefined) return this.worker;
    const worker = new Worker(new URL('./mountWarmerWorker.js', import.meta.url));
    worker.unref(); // never what keeps the daemon running
    worker.on('message', (result: WarmResult) => {
      this.waiting.get(result.id)?.(result);
      this.waiting.delete(result.id);
    });
    const lost = (why: string): void => {
      this.logger.warn('mount warm-up thread ended', { why });
      if (this.worker === worker) this.worker = undefined;
      for (const resolve of this.waiting.values()) resolve(undefined);
      this.waiting.clear();
    };
    worker.on('error', (err) => lost(String(err)));
    worker.on('exit', (code) => { if (!this.stopped) lost(`exit ${code}`); });
    this.worker = worker;
    return worker;
  }
}
