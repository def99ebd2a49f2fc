/**
 * Putting one blob into a repository (OCI distribution API):
 *
 *   HEAD /v2/<name>/blobs/<digest>                       200: already there
 *   POST /v2/<name>/blobs/uploads/?mount=<d>&from=<repo> 201: mounted; 202: a new session
 *   POST /v2/<name>/blobs/uploads/                       202 + Location: a new session
 *   monolithic: PUT <Location>&digest=<d> with the bytes
 *   chunked:    PATCH <Location> (Content-Range: a-b) per chunk, each answer
 *               naming the next Location (distribution's `_state` token
 *               changes every time), then PUT <Location>&digest=<d>, empty.
 *
 * distribution 2.8 ignores a Content-Range that does not start at its
 * current offset and appends anyway, so a PATCH is never blindly resent:
 * after a failure the session's status (GET <Location> → Range: 0-N) says
 * where to go on from.
 */
import { type ReadStream, createReadStream } from 'node:fs';
import { type Readable } from 'node:stream';
import { type Digest } from '../digest.js';
import { type RegistryClient, type RegistryResponse, backoffDelay, headerValue, isRetryableNetworkError } from './client.js';
import { registryError } from './errors.js';

export interface LocalBlob {
  digest: Digest;
  size: number;
  /** A file holding exactly the blob's bytes. */
  path: string;
}

export interface UploadOptions {
  /** Blobs larger than this are sent in chunks (default 32 MiB). */
  chunkThreshold: number;
  /** Bytes per PATCH (default 16 MiB). */
  chunkSize: number;
  onProgress?: (bytes: number) => void;
}

export const DEFAULT_UPLOAD: UploadOptions = { chunkThreshold: 32 * 1024 * 1024, chunkSize: 16 * 1024 * 1024 };

export type BlobOutcome = 'exists' | 'mounted' | 'uploaded';

export class BlobUploader {
  constructor(
    private readonly client: RegistryClient,
    private readonly repository: string,
    private readonly scopes: readonly string[],
    private readonly options: UploadOptions,
  ) {}

  async exists(digest: Digest): Promise<boolean> {
    const res = await this.client.request({
      method: 'HEAD', path: `/v2/${this.repository}/blobs/${digest}`, scopes: this.scopes, expect: [200, 404],
      context: { repository: this.repository, digest },
    });
    res.body.resume();
    return res.status === 200;
  }

  /**
   * Make `blob` present in the repository by the cheapest way there is:
   * already there, mounted from `mountFrom` (a repository of the same
   * registry that should have it), or uploaded.
   */
  async put(blob: LocalBlob, mountFrom: string | undefined): Promise<BlobOutcome> {
    if (await this.exists(blob.digest)) return 'exists';
    let location: string | undefined;
    if (mountFrom) {
      const res = await this.client.request({
        method: 'POST', path: `/v2/${this.repository}/blobs/uploads/?mount=${blob.digest}&from=${encodeURIComponent(mountFrom)}`,
        headers: { 'content-length': '0' },
        scopes: [...this.scopes, `repository:${mountFrom}:pull`], expect: [201, 202], context: { repository: this.repository, digest: blob.digest },
      });
      res.body.resume();
      if (res.status === 201) return 'mounted';
      // 202: the source lacked it; distribution opened an ordinary session instead.
      location = this.locationOf(res, blob.digest);
    }
    location ??= await this.startSession(blob.digest);
    if (blob.size > this.options.chunkThreshold) await this.sendChunked(location, blob);
    else await this.sendWhole(location, blob);
    return 'uploaded';
  }

  private async startSession(digest: Digest): Promise<string> {
    const res = await this.client.request({
      method: 'POST', path: `/v2/${this.repository}/blobs/uploads/`, headers: { 'content-length': '0' },
      scopes: this.scopes, expect: [202], context: { repository: this.repository, digest },
    });
    res.body.resume();
    return this.locationOf(res, digest);
  }

  private async sendWhole(location: string, blob: LocalBlob): Promise<void> {
    const res = await this.client.request({
      method: 'PUT', path: withDigest(location, blob.digest),
      headers: { 'content-type': 'application/octet-stream' },
      body: { length: blob.size, open: () => this.progressStream(createReadStream(blob.path), 0) },
      scopes: this.scopes, expect: [201], context: { repository: this.repository, digest: blob.digest },
    });
    res.body.resume();
    this.checkDigest(res.headers['docker-content-digest'], blob.digest);
  }

  private async sendChunked(location: string, blob: LocalBlob): Promise<void> {
    const context = { registry: this.client.registry, repository: this.repository, digest: blob.digest };
    let offset = 0;
    let failures = 0;
    while (offset < blob.size) {
      const end = Math.min(offset + this.options.chunkSize, blob.size) - 1;
      const start = offset;
      try {
        const res = await this.client.request({
          method: 'PATCH', path: location,
          headers: { 'content-type': 'application/octet-stream', 'content-range': `${start}-${end}` },
          body: { length: end - start + 1, open: () => this.progressStream(createReadStream(blob.path, { start, end }), start) },
          scopes: this.scopes, expect: [202], context: { repository: this.repository, digest: blob.digest },
          noRetry: true,
        });
        res.body.resume();
        location = this.locationOf(res, blob.digest);
        offset = rangeEnd(headerValue(res.headers.range)) ?? end + 1;
        if (offset !== end + 1) throw registryError('protocol', `registry ${this.client.registry}: upload of ${blob.digest}: sent bytes ${start}-${end}, the registry has 0-${offset - 1}`, context);
        failures = 0;
      } catch (err) {
        const reason = (err as { context?: { reason?: string } }).context?.reason;
        if (!(isRetryableNetworkError(err) || reason === 'network' || reason === 'server') || failures >= this.client.retry.retries) throw err;
        await this.client.pause(backoffDelay(this.client.retry, failures++), 'PATCH', location, context);
        // Ask the session where it stands, then go on from there.
        const status = await this.client.request({
          method: 'GET', path: location, scopes: this.scopes, expect: [204], context: { repository: this.repository, digest: blob.digest },
        });
        status.body.resume();
        location = this.locationOf(status, blob.digest);
        offset = rangeEnd(headerValue(status.headers.range)) ?? 0;
      }
    }
    const res = await this.client.request({
      method: 'PUT', path: withDigest(location, blob.digest), headers: { 'content-length': '0' },
      scopes: this.scopes, expect: [201], context: { repository: this.repository, digest: blob.digest },
    });
    res.body.resume();
    this.checkDigest(res.headers['docker-content-digest'], blob.digest);
  }

  private progressStream(stream: ReadStream, base: number): Readable {
    const onProgress = this.options.onProgress;
    if (onProgress) {
      let n = base;
      stream.on('data', (chunk) => { n += chunk.length; onProgress(n); });
    }
    return stream;
  }

  /** The session's next URL: relative to where the answer came from; possibly another host (never sent our Authorization, client.ts). */
  private locationOf(res: RegistryResponse, digest: Digest): string {
    const location = headerValue(res.headers.location);
    if (!location) {
      throw registryError('protocol', `registry ${this.client.registry}: upload of ${digest}: no Location in the answer`,
        { registry: this.client.registry, repository: this.repository, digest });
    }
    try {
      return new URL(location, res.url).toString();
    } catch {
      throw registryError('protocol', `registry ${this.client.registry}: upload of ${digest}: invalid Location '${location}'`,
        { registry: this.client.registry, repository: this.repository, digest });
    }
  }

  private checkDigest(header: string | string[] | undefined, digest: Digest): void {
    const got = headerValue(header);
    if (got && got !== digest) {
      throw registryError('protocol', `registry ${this.client.registry}: uploaded ${digest} but the registry stored ${got}`,
        { registry: this.client.registry, repository: this.repository, digest });
    }
  }
}

function withDigest(location: string, digest: Digest): string {
  const url = new URL(location);
  url.searchParams.set('digest', digest);
  return url.toString();
}

/** `Range: 0-N` (inclusive) of an upload session → the next offset, N+1. */
function rangeEnd(range: string | undefined): number | undefined {
  const m = /^(?:bytes=)?0-(\d+)$/.exec(range ?? '');
  return m ? Number(m[1]) + 1 : undefined;
}
