/**
 * A registry repository as an ImageSource: `images()` resolves the
 * reference to a manifest or index (verified), `readBlob` serves manifests
 * and configs, `openBlob` streams layers with resume. Everything else —
 * platform choice, digest and diffID checks, storage — is the importer's,
 * exactly as for a local import.
 *
 * Digests are checked here for what the importer cannot check: a manifest
 * fetched by tag must match the registry's `Docker-Content-Digest` when it
 * sends one, and a manifest fetched by digest must match that digest.
 */
import { type Readable } from 'node:stream';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, digestOf, verifyDigest } from '../digest.js';
import { INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, MAX_DOCUMENT_BYTES, MediaTypes, type Descriptor } from '../oci.js';
import { type ImageSource, type SourceImage } from '../sources/source.js';
import { repositoryScope } from './auth.js';
import { DEFAULT_RETRY, RegistryClient, type RetryPolicy, type Transfer, headerValue, readLimited } from './client.js';
import { EMPTY_CONFIG, type RegistriesConfig, endpointsFor } from './config.js';
import { ResumableBlobStream } from './download.js';
import { type RegistryRef, formatRegistryRef, parseRegistryRef, storeName } from './reference.js';

/** Accept for resolving a reference: without the OCI types distribution 2.8 answers 404 for OCI content. */
export const MANIFEST_ACCEPT = [MediaTypes.ociIndex, MediaTypes.ociManifest, MediaTypes.dockerList, MediaTypes.dockerManifest].join(', ');

/** Mirrors are given up on quickly: the registry itself is the fallback. */
const MIRROR_RETRY: RetryPolicy = { retries: 1, backoffMs: 100, maxBackoffMs: 500 };

export interface RegistrySourceOptions {
  config?: RegistriesConfig;
  retry?: RetryPolicy;
  /** Timeouts and the signal that stops every request (client.ts). */
  transfer?: Transfer;
  /** A blob the caller already has (the store's copy): used instead of a request. */
  localBlob?: (digest: Digest) => Promise<Buffer | undefined>;
}

export class RegistrySource implements ImageSource {
  // 'registry' is not yet in ImageSource's kind union (storage/sources/source.ts); nothing branches on kind.
  readonly kind = 'registry' as const;
  readonly ref: RegistryRef;
  private readonly documents = new Map<Digest, Buffer>();
  /** Digests known to name manifests or indexes (from an index), with their media type. */
  private readonly manifestTypes = new Map<Digest, string>();
  private readonly scopes: string[];

  private constructor(ref: RegistryRef, private readonly clients: RegistryClient[], private readonly options: RegistrySourceOptions) {
    this.ref = ref;
    this.scopes = [repositoryScope(ref.repository, 'pull')];
  }

  static async open(reference: string | RegistryRef, options: RegistrySourceOptions = {}): Promise<RegistrySource> {
    const ref = typeof reference === 'string' ? parseRegistryRef(reference) : reference;
    const endpoints = await endpointsFor(options.config ?? EMPTY_CONFIG, ref.registry, true);
    const clients = endpoints.map((e) => new RegistryClient(e, e.mirror ? MIRROR_RETRY : options.retry ?? DEFAULT_RETRY, options.transfer));
    return new RegistrySource(ref, clients, options);
  }

  get description(): string { return formatRegistryRef(this.ref); }

  async images(): Promise<SourceImage[]> {
    const reference = this.ref.digest ?? this.ref.tag!;
    const { bytes, mediaType, digest } = await this.fetchManifest(reference);
    const descriptor: Descriptor = { mediaType, digest, size: bytes.length };
    const refs = this.ref.tag ? [{ name: storeName(this.ref), tag: this.ref.tag }] : [];
    return [{ descriptor, refs }];
  }

  async readBlob(digest: Digest, maxBytes: number): Promise<Buffer> {
    const cached = this.documents.get(digest);
    if (cached) return cached;
    const local = await this.options.localBlob?.(digest);
    if (local) {
      this.noteChildren(local);
      return local;
    }
    if (this.manifestTypes.has(digest)) return (await this.fetchManifest(digest)).bytes;
    const context = { registry: this.ref.registry, repository: this.ref.repository, digest };
    return this.firstAnswer(async (client) => {
      const res = await client.requestBuffer({
        method: 'GET', path: `/v2/${this.ref.repository}/blobs/${digest}`, scopes: this.scopes, expect: [200], context,
      }, maxBytes);
      return res.body;
    });
  }

  /** Bytes [start, end) of a blob, by a Range request (a lazy pull's footer and TOC); unverified. */
  async readBlobRange(digest: Digest, start: number, end: number): Promise<Buffer> {
    const context = { registry: this.ref.registry, repository: this.ref.repository, digest };
    return this.firstAnswer(async (client) => {
      const res = await client.request({
        method: 'GET', path: `/v2/${this.ref.repository}/blobs/${digest}`, headers: { range: `bytes=${start}-${end - 1}` },
        scopes: this.scopes, expect: [206], context,
      });
      const m = /^bytes (\d+)-(\d+)\//.exec(headerValue(res.headers['content-range']) ?? '');
      if (!m || Number(m[1]) !== start || Number(m[2]) !== end - 1) {
        res.body.destroy();
        throw new LayerdError(ErrorCodes.EFORMAT, `${this.description}: asked for bytes ${start}-${end - 1} of ${digest}, got Content-Range '${res.headers['content-range'] ?? ''}'`, context);
      }
      return readLimited(res.body, end - start, client.registry);
    });
  }

  /**
   * GET a document of the repository that may well not exist (`referrers/<digest>`,
   * a manifest by tag): its bytes and media type, or undefined for 404. Unverified.
   */
  async readOptional(path: string, accept: string, maxBytes: number): Promise<{ bytes: Buffer; mediaType: string } | undefined> {
    const context = { registry: this.ref.registry, repository: this.ref.repository, ref: path };
    // Every endpoint in turn: a mirror that lacks the document says nothing of the registry.
    let missing = false;
    let last: unknown;
    for (const client of this.clients) {
      try {
        const res = await client.requestBuffer({
          method: 'GET', path: `/v2/${this.ref.repository}/${path}`, headers: { accept }, scopes: this.scopes, expect: [200, 404], context,
        }, maxBytes);
        if (res.status === 404) {
          missing = true;
          continue;
        }
        return { bytes: res.body, mediaType: (headerValue(res.headers['content-type']) ?? '').split(';')[0]!.trim() };
      } catch (err) {
        last = err;
      }
    }
    if (missing) return undefined;
    throw last;
  }

  async openBlob(digest: Digest): Promise<Readable> {
    return new ResumableBlobStream(this.clients, this.ref.repository, digest, this.scopes);
  }

  async close(): Promise<void> {
    for (const c of this.clients) c.close();
  }

  /** GET a manifest or index by tag or digest, verified, and remember it. */
  private async fetchManifest(reference: string): Promise<{ bytes: Buffer; mediaType: string; digest: Digest }> {
    const byDigest = reference.startsWith('sha256:');
    const context = { registry: this.ref.registry, repository: this.ref.repository, ref: reference };
    const answer = await this.firstAnswer(async (client) => client.requestBuffer({
      method: 'GET', path: `/v2/${this.ref.repository}/manifests/${reference}`,
      headers: { accept: MANIFEST_ACCEPT }, scopes: this.scopes, expect: [200], context,
    }, MAX_DOCUMENT_BYTES));
    const bytes = answer.body;
    const contentType = (headerValue(answer.headers['content-type']) ?? '').split(';')[0]!.trim();
    if (contentType === MediaTypes.dockerSchema1 || contentType === MediaTypes.dockerSchema1Signed) {
      throw new LayerdError(ErrorCodes.EUNSUPPORTED,
        `${this.description}: the registry serves a Docker schema1 manifest, which layerd does not support (deprecated); push the image again as schema2 or OCI`,
        { ...context, mediaType: contentType });
    }
    const actual = { digest: digestOf(bytes), size: bytes.length };
    const claimed = headerValue(answer.headers['docker-content-digest']);
    if (byDigest) verifyDigest(`${this.description}: manifest`, { digest: reference as Digest }, actual, context);
    else if (claimed) verifyDigest(`${this.description}: manifest (Docker-Content-Digest)`, { digest: claimed as Digest }, actual, context);
    const known = [...INDEX_MEDIA_TYPES, ...MANIFEST_MEDIA_TYPES];
    const mediaType = known.includes(contentType) ? contentType : this.manifestTypes.get(actual.digest) ?? mediaTypeOf(bytes);
    this.documents.set(actual.digest, bytes);
    this.noteChildren(bytes);
    return { bytes, mediaType, digest: actual.digest };
  }

  /** An index's entries are manifests: remember to fetch them from /manifests/. */
  private noteChildren(bytes: Buffer): void {
    let doc: unknown;
    try {
      doc = JSON.parse(bytes.toString());
    } catch {
      return; // not ours to judge: the importer's parser reports it
    }
    const manifests = (doc as { manifests?: unknown }).manifests;
    if (!Array.isArray(manifests)) return;
    for (const m of manifests as { digest?: unknown; mediaType?: unknown }[]) {
      if (typeof m?.digest === 'string' && m.digest.startsWith('sha256:')) {
        this.manifestTypes.set(m.digest as Digest, typeof m.mediaType === 'string' ? m.mediaType : MediaTypes.ociManifest);
      }
    }
  }

  /** Ask each endpoint in turn (mirrors, then the registry); the registry's error is the one reported. */
  private async firstAnswer<T>(ask: (client: RegistryClient) => Promise<T>): Promise<T> {
    for (const [i, client] of this.clients.entries()) {
      try {
        return await ask(client);
      } catch (err) {
        if (i === this.clients.length - 1) throw err;
      }
    }
    throw new LayerdError(ErrorCodes.EINTERNAL, 'no registry endpoint');
  }
}

function mediaTypeOf(bytes: Buffer): string {
  try {
    const doc = JSON.parse(bytes.toString()) as { mediaType?: unknown; manifests?: unknown };
    if (typeof doc.mediaType === 'string') return doc.mediaType;
    return Array.isArray(doc.manifests) ? MediaTypes.ociIndex : MediaTypes.ociManifest;
  } catch {
    return MediaTypes.ociManifest;
  }
}
