/**
 * The gzip indexes of an image as an OCI artifact in its repository (OCI
 * image spec 1.1 / distribution spec 1.1):
 *
 *   an image manifest with `artifactType` GZIP_INDEX_ARTIFACT_TYPE, the
 *   empty config descriptor, one layer per indexed gzip layer (the index
 *   document, annotated with the layer's digest) and `subject` = the image
 *   manifest; pushed by digest.
 *
 * A registry with the referrers API (distribution spec 1.1) says so when the
 * artifact manifest is pushed (`OCI-Subject: <subject digest>` in its answer)
 * and lists the artifact itself. Registries without it (docker-registry 2.8)
 * are served by the referrers tag schema: an OCI index tagged `sha256-<hex of
 * the subject digest>` listing the referrers, which publishing merges into. Finding
 * tries `GET /v2/<name>/referrers/<digest>?artifactType=…` first, then that tag.
 * Listings are unverified; the artifact manifest is fetched by digest and
 * must name the image as its subject, and every index blob is verified by
 * digest and must describe the layer it is used for.
 */
import { writeFile } from 'node:fs/promises';
import { type IncomingHttpHeaders } from 'node:http';
import { type Readable } from 'node:stream';
import { join } from 'node:path';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, digestHex, digestOf, isDigest, verifyDigest } from '../digest.js';
import { type Descriptor, MAX_DOCUMENT_BYTES, MediaTypes } from '../oci.js';
import { repositoryScope } from '../registry/auth.js';
import { type RegistryClient, headerValue } from '../registry/client.js';
import { registryError } from '../registry/errors.js';
import { type RegistrySource } from '../registry/source.js';
import { BlobUploader, DEFAULT_UPLOAD, type LocalBlob } from '../registry/upload.js';
import { TOC_DIGEST_ANNOTATION } from './estargz.js';
import { GZIP_INDEX_MEDIA_TYPE, type GzipIndex, MAX_GZIP_INDEX_BYTES, buildGzipIndex, parseGzipIndex } from './gzipIndex.js';

export const GZIP_INDEX_ARTIFACT_TYPE = 'application/vnd.layerd.gzip-index.v1';
/** On each index layer of the artifact: the digest of the image layer it indexes. */
export const INDEXED_LAYER_ANNOTATION = 'org.layerd.gzip-index.layer';
export const EMPTY_DESCRIPTOR = {
  mediaType: 'application/vnd.oci.empty.v1+json',
  digest: 'sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a' as Digest,
  size: 2,
} as const;
const EMPTY_JSON = Buffer.from('{}');

/** Layers a gzip index is made for: gzip, and not eStargz (which has its own TOC). */
export function wantsGzipIndex(layer: Descriptor): boolean {
  return (layer.mediaType === MediaTypes.ociLayerGzip || layer.mediaType === MediaTypes.dockerLayer)
    && layer.annotations?.[TOC_DIGEST_ANNOTATION] === undefined;
}

/**
 * Index every gzip layer of an image (reading each blob once, from `open`)
 * and publish the indexes as the artifact of `subject`; undefined if the
 * image has no such layer.
 */
export async function publishImageGzipIndexes(
  client: RegistryClient, repository: string, subject: Descriptor,
  layers: { descriptor: Descriptor; diffId: Digest; open: () => Readable | Promise<Readable> }[], workDir: string,
  onIndexed?: (index: GzipIndex) => void,
): Promise<PublishedArtifact | undefined> {
  const indexes: GzipIndex[] = [];
  for (const layer of layers) {
    if (!wantsGzipIndex(layer.descriptor)) continue;
    const { digest, size } = layer.descriptor;
    const index = await buildGzipIndex(await layer.open(), `layer ${digest}`, { expected: { digest, size, diffId: layer.diffId } });
    onIndexed?.(index);
    indexes.push(index);
  }
  return indexes.length > 0 ? publishGzipIndexes(client, repository, subject, indexes, workDir) : undefined;
}

/** The referrers tag schema's tag for a subject. */
export function referrersTag(subject: Digest): string {
  return `sha256-${digestHex(subject)}`;
}

export interface PublishedArtifact {
  digest: Digest;
  size: number;
  /** The indexed layers' digests. */
  layers: Digest[];
  /** How readers find it: the registry's referrers API (it answered the push with OCI-Subject), else the tag schema. */
  listedBy: ReferrersVia;
}

/**
 * Push `indexes` (documents in files of `workDir`) as the gzip-index artifact
 * of `subject`; unless the registry answers that it processed the subject
 * (referrers API), list it in the referrers tag of the subject.
 */
export async function publishGzipIndexes(
  client: RegistryClient, repository: string, subject: Descriptor, indexes: GzipIndex[], workDir: string,
): Promise<PublishedArtifact> {
  const scopes = [repositoryScope(repository, 'pull,push')];
  const uploader = new BlobUploader(client, repository, scopes, DEFAULT_UPLOAD);
  const emptyPath = join(workDir, 'gzip-index-empty.json');
  await writeFile(emptyPath, EMPTY_JSON, { mode: 0o600 });
  await uploader.put({ digest: EMPTY_DESCRIPTOR.digest, size: EMPTY_DESCRIPTOR.size, path: emptyPath }, undefined);
  const layers: Descriptor[] = [];
  for (const index of indexes) {
    const bytes = Buffer.from(JSON.stringify(index));
    const digest = digestOf(bytes);
    const blob: LocalBlob = { digest, size: bytes.length, path: join(workDir, `gzip-index-${digestHex(digest)}.json`) };
    await writeFile(blob.path, bytes, { mode: 0o600 });
    await uploader.put(blob, undefined);
    layers.push({ mediaType: GZIP_INDEX_MEDIA_TYPE, digest: blob.digest, size: blob.size, annotations: { [INDEXED_LAYER_ANNOTATION]: index.layer.digest } });
  }
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2, mediaType: MediaTypes.ociManifest, artifactType: GZIP_INDEX_ARTIFACT_TYPE,
    config: EMPTY_DESCRIPTOR, layers, subject: { mediaType: subject.mediaType, digest: subject.digest, size: subject.size },
  }));
  const artifact: Descriptor & { artifactType: string } = {
    mediaType: MediaTypes.ociManifest, digest: digestOf(manifest), size: manifest.length, artifactType: GZIP_INDEX_ARTIFACT_TYPE,
  };
  const answer = await putManifest(client, repository, artifact.digest, manifest, MediaTypes.ociManifest, scopes);
  // Distribution spec 1.1: a registry with the referrers API answers a manifest with a subject with OCI-Subject; else the client keeps the tag.
  const listedBy: ReferrersVia = headerValue(answer['oci-subject']) === subject.digest ? 'referrers API' : 'referrers tag';
  if (listedBy === 'referrers tag') await addToReferrersTag(client, repository, subject.digest, artifact, scopes);
  return { digest: artifact.digest, size: artifact.size, layers: indexes.map((i) => i.layer.digest), listedBy };
}

/** PUT a manifest; the answer's headers. */
async function putManifest(client: RegistryClient, repository: string, reference: string, bytes: Buffer, mediaType: string, scopes: string[]): Promise<IncomingHttpHeaders> {
  const digest = digestOf(bytes);
  const res = await client.requestBuffer({
    method: 'PUT', path: `/v2/${repository}/manifests/${reference}`, headers: { 'content-type': mediaType }, body: bytes,
    scopes, expect: [201], context: { repository, digest, ref: reference },
  }, 64 * 1024);
  const stored = headerValue(res.headers['docker-content-digest']);
  if (stored && stored !== digest) {
    throw registryError('protocol', `registry ${client.registry}: pushed ${reference} as ${digest} but the registry stored ${stored}`, { registry: client.registry, repository, digest });
  }
  return res.headers;
}

/**
 * The referrers tag schema: GET the subject's tag, add the artifact to its
 * OCI index (keeping every other referrer), PUT it back. Two publishers at
 * once may lose one entry (the schema has no compare-and-swap); publishing
 * again restores it.
 */
async function addToReferrersTag(client: RegistryClient, repository: string, subject: Digest, artifact: Descriptor & { artifactType: string }, scopes: string[]): Promise<void> {
  const tag = referrersTag(subject);
  const res = await client.requestBuffer({
    method: 'GET', path: `/v2/${repository}/manifests/${tag}`, headers: { accept: MediaTypes.ociIndex },
    scopes, expect: [200, 404], context: { repository, ref: tag },
  }, MAX_DOCUMENT_BYTES);
  let manifests: Record<string, unknown>[] = [];
  if (res.status === 200) {
    const existing = parseIndexDocument(res.body, `${repository}:${tag}`);
    if (existing) manifests = existing.filter((m) => m['digest'] !== artifact.digest);
  }
  manifests.push({ ...artifact });
  const index = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaTypes.ociIndex, manifests }));
  await putManifest(client, repository, tag, index, MediaTypes.ociIndex, scopes);
}

/** The `manifests` of an OCI index document, or undefined if it is none. */
function parseIndexDocument(bytes: Buffer, what: string): Record<string, unknown>[] | undefined {
  let doc: unknown;
  try {
    doc = JSON.parse(bytes.toString('utf8'));
  } catch (err) {
    throw new LayerdError(ErrorCodes.EBADJSON, `${what}: not JSON: ${(err as Error).message}`, {}, { cause: err });
  }
  const manifests = (doc as { manifests?: unknown })?.manifests;
  return Array.isArray(manifests) ? manifests.filter((m): m is Record<string, unknown> => typeof m === 'object' && m !== null) : undefined;
}

/** Where the referrers of `subject` were listed (for messages and tests). */
export type ReferrersVia = 'referrers API' | 'referrers tag';

/** The gzip-index artifacts listed for `subject`: by the referrers API, else by the tag schema. */
export async function listGzipIndexArtifacts(source: RegistrySource, subject: Digest): Promise<{ via: ReferrersVia; artifacts: Digest[] } | undefined> {
  const api = await source.readOptional(`referrers/${subject}?artifactType=${encodeURIComponent(GZIP_INDEX_ARTIFACT_TYPE)}`, MediaTypes.ociIndex, MAX_DOCUMENT_BYTES)
    .catch(() => undefined); // a registry that answers the unknown route oddly has no API either
  const fromApi = api && api.mediaType === MediaTypes.ociIndex ? parseIndexDocument(api.bytes, `${source.description}: referrers of ${subject}`) : undefined;
  const pick = (list: Record<string, unknown>[]): Digest[] => list
    .filter((m) => m['artifactType'] === GZIP_INDEX_ARTIFACT_TYPE && isDigest(m['digest']))
    .map((m) => m['digest'] as Digest);
  if (fromApi && pick(fromApi).length > 0) return { via: 'referrers API', artifacts: pick(fromApi) };
  const tagged = await source.readOptional(`manifests/${referrersTag(subject)}`, MediaTypes.ociIndex, MAX_DOCUMENT_BYTES);
  const fromTag = tagged ? parseIndexDocument(tagged.bytes, `${source.description}: ${referrersTag(subject)}`) : undefined;
  if (fromTag && pick(fromTag).length > 0) return { via: 'referrers tag', artifacts: pick(fromTag) };
  return undefined;
}

/**
 * The gzip index of each of `layers` the image's artifacts have, verified
 * (the artifact by digest and subject, each index by digest and against the
 * layer's digest, size and diffID). Layers without one are left out.
 */
export async function findGzipIndexes(
  source: RegistrySource, subject: Digest, layers: { descriptor: Descriptor; diffId: Digest }[],
): Promise<{ via: ReferrersVia; indexes: Map<Digest, { index: GzipIndex; blob: Descriptor }> } | undefined> {
  const listed = await listGzipIndexArtifacts(source, subject);
  if (!listed) return undefined;
  const wanted = new Map(layers.map((l) => [l.descriptor.digest, l]));
  const indexes = new Map<Digest, { index: GzipIndex; blob: Descriptor }>();
  // The newest listed artifact last: its indexes win.
  for (const digest of listed.artifacts) {
    const what = `${source.description}: gzip-index artifact ${digest}`;
    const got = await source.readOptional(`manifests/${digest}`, MediaTypes.ociManifest, MAX_DOCUMENT_BYTES);
    if (!got) continue;
    verifyDigest(what, { digest }, { digest: digestOf(got.bytes), size: got.bytes.length });
    const doc = JSON.parse(got.bytes.toString('utf8')) as { subject?: Descriptor; artifactType?: string; layers?: Descriptor[] };
    if (doc.subject?.digest !== subject || doc.artifactType !== GZIP_INDEX_ARTIFACT_TYPE || !Array.isArray(doc.layers)) continue;
    for (const blob of doc.layers) {
      const layerDigest = blob?.annotations?.[INDEXED_LAYER_ANNOTATION];
      const layer = isDigest(layerDigest) ? wanted.get(layerDigest) : undefined;
      if (!layer || blob.mediaType !== GZIP_INDEX_MEDIA_TYPE || !isDigest(blob.digest) || !(blob.size > 0 && blob.size <= MAX_GZIP_INDEX_BYTES)) continue;
      const bytes = await source.readBlob(blob.digest, blob.size);
      const blobWhat = `${what}: index ${blob.digest}`;
      verifyDigest(blobWhat, { digest: blob.digest, size: blob.size }, { digest: digestOf(bytes), size: bytes.length });
      const index = parseGzipIndex(bytes, blobWhat);
      if (index.layer.digest !== layer.descriptor.digest || index.layer.size !== layer.descriptor.size || index.layer.diffId !== layer.diffId) {
        throw new LayerdError(ErrorCodes.EDIGEST, `${blobWhat}: describes layer ${index.layer.digest} (diffID ${index.layer.diffId}), not ${layer.descriptor.digest} (${layer.diffId})`, { digest: blob.digest });
      }
      indexes.set(layer.descriptor.digest, { index, blob });
    }
  }
  return { via: listed.via, indexes };
}
