/**
 * Content digests. layerd addresses everything by sha256; other algorithms
 * from the OCI spec are recognised and refused with a clear error.
 */
import { createHash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { ErrorCodes, LayerdError } from '../common/errors.js';

/** `sha256:` followed by 64 lowercase hex digits. */
export type Digest = `sha256:${string}`;

const DIGEST_RE = /^sha256:[0-9a-f]{64}$/;
const OTHER_ALGORITHM_RE = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$/;

export function isDigest(value: unknown): value is Digest {
  return typeof value === 'string' && DIGEST_RE.test(value);
}

export function parseDigest(value: unknown, what = 'digest'): Digest {
  if (isDigest(value)) return value;
  if (typeof value === 'string' && OTHER_ALGORITHM_RE.test(value) && !value.startsWith('sha256:')) {
    throw new LayerdError(ErrorCodes.EUNSUPPORTED, `${what} uses an unsupported algorithm: ${value}`, { digest: value });
  }
  throw new LayerdError(ErrorCodes.EINVAL, `invalid ${what}: ${JSON.stringify(value)}`, { digest: String(value) });
}

export function digestHex(digest: Digest): string {
  return digest.slice('sha256:'.length);
}

export function shortDigest(digest: Digest): string {
  return digestHex(digest).slice(0, 12);
}

export function digestOf(data: Buffer | string): Digest {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/** A pass-through stream that hashes and counts what flows through it. */
export class DigestingStream extends Transform {
  private readonly hash: Hash = createHash('sha256');
  private bytes = 0;
  private tailBytes: Buffer = Buffer.alloc(0);

  /** @param maxBytes fail with ELIMIT past this many bytes (decompression bombs). */
  constructor(
    private readonly maxBytes = Number.MAX_SAFE_INTEGER,
    private readonly what = 'stream',
    /** EDIGEST when the limit is a promised size, ELIMIT when it is a policy. */
    private readonly overCode: typeof ErrorCodes.ELIMIT | typeof ErrorCodes.EDIGEST = ErrorCodes.ELIMIT,
  ) {
    super({ highWaterMark: 1024 * 1024 });
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    if (this.bytes > this.maxBytes) {
      const message = this.overCode === ErrorCodes.EDIGEST
        ? `${this.what} is larger than the ${this.maxBytes} bytes promised`
        : `${this.what} is larger than the limit of ${this.maxBytes} bytes`;
      callback(new LayerdError(this.overCode, message, { limit: this.maxBytes }));
      return;
    }
    this.tailBytes = chunk.length >= 1024 ? chunk.subarray(chunk.length - 1024) : Buffer.concat([this.tailBytes, chunk]).subarray(-1024);
    callback(null, chunk);
  }

  /** The last (up to) 1024 bytes that went through. */
  tail(): Buffer {
    return this.tailBytes;
  }

  /** Only valid once the stream has ended. */
  result(): { digest: Digest; size: number } {
    return { digest: `sha256:${this.hash.digest('hex')}`, size: this.bytes };
  }
}

/** Fail unless `actual` matches what was promised. */
export function verifyDigest(
  what: string,
  expected: { digest: Digest; size?: number | undefined },
  actual: { digest: Digest; size: number },
  context: Record<string, string | number> = {},
): void {
  if (expected.size !== undefined && expected.size !== actual.size) {
    throw new LayerdError(
      ErrorCodes.EDIGEST,
      `${what} ${expected.digest}: size mismatch: expected ${expected.size} bytes, got ${actual.size}`,
      { ...context, digest: expected.digest, expectedSize: expected.size, actualSize: actual.size },
    );
  }
  if (expected.digest !== actual.digest) {
    throw new LayerdError(
      ErrorCodes.EDIGEST,
      `${what}: digest mismatch: expected ${expected.digest}, got ${actual.digest}`,
      { ...context, digest: expected.digest, actualDigest: actual.digest },
    );
  }
}
