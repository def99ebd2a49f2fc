/**
 * A blob download that survives a dropped connection: when the answer ends
 * early (a reset, a registry restart), the rest is asked for with
 * `Range: bytes=<received>-` and appended; what was received is kept. A
 * registry that ignores Range (200 instead of 206) is handled by skipping
 * the bytes already passed on. The bytes are not trusted here: the reader
 * (storage/layerIngest.ts) hashes the whole stream and checks it against the
 * manifest's digest and size. Timeouts and cancellation (client.ts) end the
 * stream with their error at once; they are not resumed.
 *
 * A download may be given a FetchGate (a lazy layer's background fill yields
 * so to on-demand reads, storage/lazy/readDemand.ts): when the gate closes,
 * the answer in progress is dropped (the link is free at once) and the rest
 * is asked for, with Range, once it opens again.
 *
 * It may also be given bytes of the blob that are here already (a lazy
 * layer's fill: what the processes serving it fetched, storage/lazy/fill.ts):
 * those ranges are read locally and only the gaps between them are asked
 * for, each with a bounded Range request. Not trusted either: the reader
 * hashes them with the rest.
 */
import { type IncomingMessage } from 'node:http';
import { Readable } from 'node:stream';
import { type Digest } from '../digest.js';
import { type RegistryClient, backoffDelay, headerValue, isRetryableNetworkError } from './client.js';
import { registryError } from './errors.js';

/** Whether a download may go on now (see ReadDemandGate). */
export interface FetchGate {
  readonly open: boolean;
  /** Resolves once the gate is open (at once if it is, or `signal` aborted). */
  whenOpen(signal?: AbortSignal): Promise<void>;
  /** Call `listener` whenever the gate closes; returns the unsubscribe. */
  onClose(listener: () => void): () => void;
}

/** Bytes of the blob that are here already: read locally instead of downloaded. */
export interface LocalBlobBytes {
  /** The blob's size. */
  readonly size: number;
  /** Sorted, disjoint, non-adjacent [start, end) ranges within [0, size). */
  readonly ranges: readonly (readonly [number, number])[];
  /** Exactly `length` bytes from `position` (rejects otherwise). */
  read(position: number, length: number): Promise<Buffer>;
}

/** Bytes read locally at a time. */
const LOCAL_READ_BYTES = 1024 * 1024;

/** The answer in progress was dropped because the gate closed: not a failure. */
class Yielded extends Error {}

export class ResumableBlobStream extends Readable {
  private received = 0;
  private current: IncomingMessage | undefined;
  private started = false;

  /** Which of `clients` (mirrors first, then the registry) is being read from. */
  private which = 0;
  /** Wakes the local reading once the consumer wants more. */
  private wantMore: (() => void) | undefined;

  constructor(
    /** Endpoints to try in order until one serves the blob. */
    private readonly clients: readonly RegistryClient[],
    private readonly repository: string,
    private readonly digest: Digest,
    private readonly scopes: readonly string[],
    private readonly gate?: FetchGate,
    private local?: LocalBlobBytes,
  ) {
    super({ highWaterMark: 1024 * 1024 });
  }

  override _read(): void {
    const wake = this.wantMore;
    this.wantMore = undefined;
    if (wake) wake();
    else if (this.current) this.current.resume();
    else if (!this.started) {
      this.started = true;
      this.fetchAll().then(() => this.push(null), (err: unknown) => this.destroy(err as Error));
    }
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.current?.destroy();
    this.wantMore?.();
    callback(error);
  }

  private get client(): RegistryClient {
    return this.clients[this.which]!;
  }

  private async fetchAll(): Promise<void> {
    const context = { registry: this.client.registry, repository: this.repository, digest: this.digest };
    // Failures in a row without a single new byte; any progress resets it.
    let failures = 0;
    for (;;) {
      const before = this.received;
      if (this.local !== undefined) {
        if (this.received >= this.local.size) return;
        const here = this.local.ranges.find(([start, end]) => start <= this.received && this.received < end);
        if (here !== undefined) {
          await this.pushLocal(here[1]);
          if (this.destroyed) return;
          continue;
        }
      }
      // Up to the next range that is here, if any.
      const until = this.local?.ranges.find(([start]) => start > this.received)?.[0] ?? Infinity;
      if (this.gate && !this.gate.open) await this.gate.whenOpen(this.client.signal);
      if (this.destroyed) return;
      try {
        const done = await this.fetchOnce(until);
        if (done && until === Infinity) return;
        if (done) continue;
        throw registryError('network', `registry ${this.client.registry}: blob ${this.digest} ended early after ${this.received} bytes`, context);
      } catch (err) {
        if (this.destroyed) return;
        if (err instanceof Yielded && !this.client.signal?.aborted) continue;
        if (this.client.signal?.aborted) throw err; // cancelled or past the deadline: no other endpoint either
        const retryable = isRetryableNetworkError(err) || (err as { context?: { reason?: string } }).context?.reason === 'network';
        if (this.received > before) failures = 0;
        if (this.received === 0 && this.which < this.clients.length - 1) {
          // Nothing read yet from this mirror: fall back to the next endpoint.
          this.which++;
          failures = 0;
          continue;
        }
        if (!retryable || failures >= this.client.retry.retries) throw err;
        await this.client.pause(backoffDelay(this.client.retry, failures++), 'GET', `/v2/${this.repository}/blobs/${this.digest}`, context);
      }
    }
  }

  /**
   * Blob bytes [received, end) read from the local copy, paced by the
   * consumer and, like a download, held while the gate is closed (the fill's
   * inflating and hashing yield the CPU to reads too). A local read that
   * fails drops the local copy: the rest is downloaded.
   */
  private async pushLocal(end: number): Promise<void> {
    while (this.received < end && !this.destroyed) {
      if (this.gate && !this.gate.open) await this.gate.whenOpen(this.client.signal);
      if (this.destroyed) return;
      let bytes: Buffer;
      try {
        bytes = await this.local!.read(this.received, Math.min(LOCAL_READ_BYTES, end - this.received));
      } catch {
        this.local = undefined;
        return;
      }
      this.received += bytes.length;
      if (!this.push(bytes)) await new Promise<void>((resolve) => { this.wantMore = resolve; });
    }
  }

  /** One GET (from `received` on, up to `until` if finite); true if the blob was read to its end (or to `until`). */
  private async fetchOnce(until = Infinity): Promise<boolean> {
    const bounded = Number.isFinite(until);
    const res = await this.client.request({
      method: 'GET',
      path: `/v2/${this.repository}/blobs/${this.digest}`,
      headers: bounded ? { range: `bytes=${this.received}-${until - 1}` } : this.received > 0 ? { range: `bytes=${this.received}-` } : {},
      scopes: this.scopes,
      expect: [200, 206],
      context: { repository: this.repository, digest: this.digest },
    });
    let skip = 0;
    let total: number | undefined;
    const length = Number(headerValue(res.headers['content-length']));
    if (res.status === 206) {
      const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(headerValue(res.headers['content-range']) ?? '');
      if (!m || Number(m[1]) !== this.received) {
        res.body.destroy();
        throw registryError('protocol', `registry ${this.client.registry}: blob ${this.digest}: asked for bytes from ${this.received}, got Content-Range '${res.headers['content-range'] ?? ''}'`,
          { registry: this.client.registry, repository: this.repository, digest: this.digest });
      }
      if (m[3] !== '*') total = Number(m[3]);
    } else {
      skip = this.received; // the registry ignored Range: drop what we have already
      if (Number.isSafeInteger(length)) total = length;
    }
    this.current = res.body;
    let yielded = false;
    const yieldNow = (): void => {
      yielded = true;
      res.body.destroy();
    };
    const unsubscribe = this.gate?.onClose(yieldNow);
    if (this.gate && !this.gate.open) yieldNow(); // closed while the request was on its way
    try {
      await new Promise<void>((resolve, reject) => {
        res.body.on('data', (chunk: Buffer) => {
          if (skip > 0) {
            const drop = Math.min(skip, chunk.length);
            skip -= drop;
            chunk = chunk.subarray(drop);
            if (chunk.length === 0) return;
          }
          if (this.received >= until) return;
          if (this.received + chunk.length > until) chunk = chunk.subarray(0, until - this.received);
          this.received += chunk.length;
          if (!this.push(chunk)) res.body.pause();
          if (this.received >= until && res.status !== 206) {
            // A registry that ignored Range sends the whole blob: the rest is here already.
            resolve();
            res.body.destroy();
          }
        });
        res.body.on('end', resolve);
        res.body.on('error', reject);
        res.body.on('close', () => {
          if (yielded) reject(new Yielded(`blob ${this.digest}: yielded after ${this.received} bytes`));
          else if (!res.body.complete) reject(Object.assign(new Error('aborted'), { code: 'ECONNRESET' }));
        });
      });
    } catch (err) {
      if (yielded) throw new Yielded(`blob ${this.digest}: yielded after ${this.received} bytes`);
      throw err;
    } finally {
      unsubscribe?.();
      this.current = undefined;
    }
    return this.received >= until || total === undefined || this.received >= total;
  }
}
