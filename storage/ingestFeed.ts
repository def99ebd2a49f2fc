/**
 * The end of a blob's byte stream that feeds a second pipeline (decompress,
 * hash, index) while the blob itself is still being hashed and written.
 *
 * The second pipeline is opened once the first bytes are in (compression is
 * sniffed from them). If it fails, the feed keeps swallowing bytes when told
 * to, so the blob is still read to its end and its digest decides which
 * error is reported (a mismatch beats the parse error it caused).
 */
import { Writable } from 'node:stream';
import { SNIFF_BYTES } from './compression.js';

export interface Downstream {
  /** Where the blob's bytes go. */
  head: Writable;
  /** Settles when the second pipeline is finished or has failed. */
  done: Promise<void>;
}

export class IngestFeed extends Writable {
  /** Settles with the second pipeline (rejects with its error). */
  readonly done: Promise<void>;

  private target: Downstream | undefined;
  private failure: { error: unknown } | undefined;
  private head: Buffer[] = [];
  private headBytes = 0;
  private settle!: { resolve: () => void; reject: (error: unknown) => void };

  /**
   * @param open builds the second pipeline from the blob's first bytes (at most SNIFF_BYTES)
   * @param keepReading after a failure of the second pipeline, keep accepting
   *   (and dropping) bytes instead of failing the first pipeline
   */
  constructor(private readonly open: (head: Buffer) => Downstream, private readonly keepReading: boolean) {
    super({ highWaterMark: 1024 * 1024 });
    this.done = new Promise((resolve, reject) => { this.settle = { resolve, reject }; });
    this.done.catch(() => undefined);
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (this.failure) { this.dropped(callback); return; }
    if (!this.target) {
      this.head.push(chunk);
      this.headBytes += chunk.length;
      if (this.headBytes < SNIFF_BYTES) { callback(); return; }
      chunk = this.head.length === 1 ? this.head[0]! : Buffer.concat(this.head);
      this.head = [];
      if (!this.start(chunk)) { this.dropped(callback); return; }
    }
    this.forward(chunk, callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    if (!this.target && !this.failure) {
      const rest = Buffer.concat(this.head);
      this.head = [];
      if (this.start(rest) && rest.length > 0) this.target!.head.write(rest);
    }
    const head = this.target?.head;
    if (head && !head.destroyed && !this.failure) head.end();
    callback();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    // Also called without an error once the feed has finished: the second
    // pipeline then still has buffered bytes to work through.
    if (error) {
      if (this.target) this.target.head.destroy(error);
      else this.settle.reject(error);
    }
    callback(error);
  }

  private start(first: Buffer): boolean {
    try {
      this.target = this.open(first.subarray(0, SNIFF_BYTES));
    } catch (error) {
      this.failure = { error };
      this.settle.reject(error);
      return false;
    }
    this.target.done.then(() => this.settle.resolve(), (error: unknown) => {
      this.failure ??= { error };
      this.settle.reject(error);
    });
    return true;
  }

  /** After a failure: drop the bytes, or stop the first pipeline too. */
  private dropped(callback: (error?: Error | null) => void): void {
    if (this.keepReading) { callback(); return; }
    if (this.failure) { callback(asError(this.failure.error)); return; }
    // The second pipeline's stream is gone but it has not reported why yet:
    // stop with its error once it does (a pipeline that simply finished has
    // no use for the bytes left: they are only hashed, as with keepReading).
    this.done.then(() => callback(), (error: unknown) => callback(asError(error)));
  }

  private forward(chunk: Buffer, callback: (error?: Error | null) => void): void {
    const target = this.target!.head;
    if (this.failure || target.destroyed) { this.dropped(callback); return; }
    if (target.write(chunk)) { callback(); return; }
    // Wait for room, or for the second pipeline to fail.
    const resume = (): void => {
      target.off('drain', resume);
      target.off('close', resume);
      callback();
    };
    target.on('drain', resume);
    target.on('close', resume);
  }
}

function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}
