/**
 * The image documents layerd reads: OCI image indexes and manifests, Docker
 * manifest lists and schema2 manifests, and image configs. Parsing checks
 * the fields layerd relies on and refuses the rest with EBADJSON, naming
 * the document and the field.
 */
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type Digest, parseDigest } from './digest.js';

export const MediaTypes = {
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  ociLayer: 'application/vnd.oci.image.layer.v1.tar',
  ociLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  ociLayerZstd: 'application/vnd.oci.image.layer.v1.tar+zstd',
  ociLayerNondistributable: 'application/vnd.oci.image.layer.nondistributable.v1.tar',
  dockerList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerSchema1: 'application/vnd.docker.distribution.manifest.v1+json',
  dockerSchema1Signed: 'application/vnd.docker.distribution.manifest.v1+prettyjws',
  dockerConfig: 'application/vnd.docker.container.image.v1+json',
  dockerLayer: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
  dockerForeignLayer: 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip',
} as const;

export const INDEX_MEDIA_TYPES: readonly string[] = [MediaTypes.ociIndex, MediaTypes.dockerList];
export const MANIFEST_MEDIA_TYPES: readonly string[] = [MediaTypes.ociManifest, MediaTypes.dockerManifest];
export const LAYER_MEDIA_TYPES: readonly string[] = [
  MediaTypes.ociLayer, MediaTypes.ociLayerGzip, MediaTypes.ociLayerZstd, MediaTypes.ociLayerNondistributable,
  `${MediaTypes.ociLayerNondistributable}+gzip`, `${MediaTypes.ociLayerNondistributable}+zstd`,
  MediaTypes.dockerLayer, MediaTypes.dockerForeignLayer, 'application/vnd.docker.image.rootfs.diff.tar',
];

/** Largest manifest, index or config layerd reads (registries use 4 MiB). */
export const MAX_DOCUMENT_BYTES = 4 * 1024 * 1024;

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
  'os.version'?: string;
  'os.features'?: string[];
  features?: string[];
}

export interface Descriptor {
  mediaType: string;
  digest: Digest;
  size: number;
  urls?: string[];
  annotations?: Record<string, string>;
  platform?: Platform;
}

export interface ImageIndex {
  schemaVersion: 2;
  mediaType?: string;
  manifests: Descriptor[];
  annotations?: Record<string, string>;
}

export interface ImageManifest {
  schemaVersion: 2;
  mediaType?: string;
  config: Descriptor;
  layers: Descriptor[];
  annotations?: Record<string, string>;
}

export interface HistoryEntry {
  created?: string;
  created_by?: string;
  author?: string;
  comment?: string;
  empty_layer?: boolean;
}

export interface ImageConfig {
  created?: string;
  author?: string;
  architecture: string;
  os: string;
  variant?: string;
  'os.version'?: string;
  config?: Record<string, unknown>;
  rootfs: { type: string; diff_ids: Digest[] };
  history?: HistoryEntry[];
}

type Json = Record<string, unknown>;

function fail(what: string, message: string, context: Record<string, string> = {}): never {
  throw new LayerdError(ErrorCodes.EBADJSON, `${what}: ${message}`, context);
}

/** Parse JSON bytes into an object, with a clear error naming the document. */
export function parseJsonObject(bytes: Buffer | string, what: string, context: Record<string, string> = {}): Json {
  if (bytes.length > MAX_DOCUMENT_BYTES) {
    throw new LayerdError(ErrorCodes.ELIMIT, `${what} is larger than ${MAX_DOCUMENT_BYTES} bytes`, context);
  }
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString());
  } catch (err) {
    fail(what, `not valid JSON (${err instanceof Error ? err.message : String(err)})`, context);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(what, 'not a JSON object', context);
  return value as Json;
}

function str(obj: Json, key: string, what: string, optional = false): string | undefined {
  const v = obj[key];
  if (v === undefined && optional) return undefined;
  if (typeof v !== 'string') fail(what, `field '${key}' must be a string`);
  return v;
}

function stringMap(obj: Json, key: string, what: string): Record<string, string> | undefined {
  const v = obj[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'object' || Array.isArray(v)) fail(what, `field '${key}' must be an object`);
  for (const [k, val] of Object.entries(v as Json)) {
    if (typeof val !== 'string') fail(what, `field '${key}.${k}' must be a string`);
  }
  return v as Record<string, string>;
}

function parsePlatform(v: unknown, what: string): Platform | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'object' || Array.isArray(v)) fail(what, `'platform' must be an object`);
  const p = v as Json;
  const platform: Platform = { os: str(p, 'os', what)!, architecture: str(p, 'architecture', what)! };
  const variant = str(p, 'variant', what, true);
  if (variant !== undefined) platform.variant = variant;
  const osVersion = str(p, 'os.version', what, true);
  if (osVersion !== undefined) platform['os.version'] = osVersion;
  return platform;
}

export function parseDescriptor(v: unknown, what: string): Descriptor {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(what, 'descriptor must be an object');
  const d = v as Json;
  const mediaType = str(d, 'mediaType', what)!;
  let digest: Digest;
  try {
    digest = parseDigest(d['digest'], `${what} digest`);
  } catch (err) {
    if (err instanceof LayerdError && err.code === ErrorCodes.EUNSUPPORTED) throw err;
    fail(what, `invalid digest ${JSON.stringify(d['digest'])}`);
  }
  const size = d['size'];
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) fail(what, `invalid size for ${digest}`, { digest });
  const desc: Descriptor = { mediaType, digest, size };
  const annotations = stringMap(d, 'annotations', what);
  if (annotations) desc.annotations = annotations;
  const platform = parsePlatform(d['platform'], what);
  if (platform) desc.platform = platform;
  if (Array.isArray(d['urls'])) desc.urls = (d['urls'] as unknown[]).filter((u): u is string => typeof u === 'string');
  return desc;
}

function descriptorList(obj: Json, key: string, what: string): Descriptor[] {
  const v = obj[key];
  if (!Array.isArray(v)) fail(what, `field '${key}' must be an array`);
  return v.map((d, i) => parseDescriptor(d, `${what} ${key}[${i}]`));
}

function checkSchemaVersion(obj: Json, what: string): void {
  const mediaType = obj['mediaType'];
  if (mediaType === MediaTypes.dockerSchema1 || mediaType === MediaTypes.dockerSchema1Signed || obj['schemaVersion'] === 1) {
    throw new LayerdError(ErrorCodes.EUNSUPPORTED, `${what}: Docker schema1 manifests are not supported (deprecated); push the image again as schema2 or OCI`);
  }
  if (obj['schemaVersion'] !== 2) fail(what, `unsupported schemaVersion ${JSON.stringify(obj['schemaVersion'])}`);
}

export type ParsedDocument =
  | { kind: 'index'; mediaType: string; index: ImageIndex }
  | { kind: 'manifest'; mediaType: string; manifest: ImageManifest };

/**
 * Parse a manifest or index. The kind comes from the descriptor's media type
 * when known, else from the document's own `mediaType`, else from its shape
 * (OCI allows manifests without a `mediaType` field; umoci writes them).
 */
export function parseManifestOrIndex(bytes: Buffer, what: string, descriptorMediaType?: string): ParsedDocument {
  const obj = parseJsonObject(bytes, what);
  checkSchemaVersion(obj, what);
  const ownType = str(obj, 'mediaType', what, true);
  if (ownType && descriptorMediaType && ownType !== descriptorMediaType) {
    fail(what, `mediaType ${ownType} does not match its descriptor's ${descriptorMediaType}`);
  }
  const mediaType = ownType ?? descriptorMediaType ?? (Array.isArray(obj['manifests']) ? MediaTypes.ociIndex : MediaTypes.ociManifest);
  if (INDEX_MEDIA_TYPES.includes(mediaType)) {
    const index: ImageIndex = { schemaVersion: 2, mediaType, manifests: descriptorList(obj, 'manifests', what) };
    const annotations = stringMap(obj, 'annotations', what);
    if (annotations) index.annotations = annotations;
    return { kind: 'index', mediaType, index };
  }
  if (MANIFEST_MEDIA_TYPES.includes(mediaType)) {
    if (typeof obj['config'] !== 'object') fail(what, `field 'config' must be a descriptor`);
    const manifest: ImageManifest = {
      schemaVersion: 2,
      mediaType,
      config: parseDescriptor(obj['config'], `${what} config`),
      layers: descriptorList(obj, 'layers', what),
    };
    const annotations = stringMap(obj, 'annotations', what);
    if (annotations) manifest.annotations = annotations;
    return { kind: 'manifest', mediaType, manifest };
  }
  throw new LayerdError(ErrorCodes.EUNSUPPORTED, `${what}: unsupported media type ${mediaType}`, { mediaType });
}

export function parseImageConfig(bytes: Buffer, what: string): ImageConfig {
  const obj = parseJsonObject(bytes, what);
  const rootfs = obj['rootfs'];
  if (typeof rootfs !== 'object' || rootfs === null || Array.isArray(rootfs)) fail(what, `field 'rootfs' must be an object`);
  const r = rootfs as Json;
  if (r['type'] !== 'layers') fail(what, `rootfs.type must be 'layers'`);
  if (!Array.isArray(r['diff_ids'])) fail(what, `rootfs.diff_ids must be an array`);
  const diffIds = (r['diff_ids'] as unknown[]).map((d, i) => {
    try {
      return parseDigest(d, `${what} rootfs.diff_ids[${i}]`);
    } catch {
      return fail(what, `rootfs.diff_ids[${i}] is not a sha256 digest`);
    }
  });
  const config: ImageConfig = {
    ...(obj as Partial<ImageConfig>),
    architecture: str(obj, 'architecture', what)!,
    os: str(obj, 'os', what)!,
    rootfs: { type: 'layers', diff_ids: diffIds },
  };
  if (obj['history'] !== undefined && !Array.isArray(obj['history'])) fail(what, `field 'history' must be an array`);
  return config;
}
