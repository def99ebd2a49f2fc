/**
 * `layerctl index REF`: build the gzip index of every plain gzip layer of an
 * image that is already in a registry, and publish it there as the image's
 * gzip-index artifact (gzipArtifact.ts), so that `pull --lazy` can mount the
 * image lazily. Each layer blob is streamed once through the indexer —
 * verified against its digest and the config's diffID — and not kept.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest } from '../digest.js';
import { readDocument } from '../importer.js';
import { type Descriptor, parseImageConfig, parseManifestOrIndex } from '../oci.js';
import { type PlatformSpec, hostPlatform, selectPlatform } from '../platform.js';
import { DEFAULT_RETRY, RegistryClient } from '../registry/client.js';
import { EMPTY_CONFIG, type RegistriesConfig, endpointsFor } from '../registry/config.js';
import { formatRegistryRef } from '../registry/reference.js';
import { RegistrySource } from '../registry/source.js';
import { DEFAULT_TIMEOUTS, type RegistryTimeouts, withDeadline } from '../registry/timeouts.js';
import { type ReferrersVia, publishImageGzipIndexes } from './gzipArtifact.js';

export interface IndexImageOptions {
  config?: RegistriesConfig;
  timeouts?: RegistryTimeouts;
  signal?: AbortSignal;
  platform?: PlatformSpec;
  onLayer?: (event: { digest: Digest; spans: number; tarSize: number }) => void;
}

export interface IndexImageResult {
  ref: string;
  /** The image manifest the artifact refers to. */
  manifest: Digest;
  /** The artifact's manifest digest; absent if the image has no plain gzip layer. */
  artifact?: Digest;
  /** How readers find the artifact: the registry's referrers API, or the `sha256-<hex>` referrers tag written beside it. */
  listedBy?: ReferrersVia;
  layers: { digest: Digest; spans: number; tarSize: number }[];
}

export async function indexRemoteImage(reference: string, options: IndexImageOptions = {}): Promise<IndexImageResult> {
  const timeouts = options.timeouts ?? DEFAULT_TIMEOUTS;
  const deadline = withDeadline(options.signal, timeouts.totalMs);
  const config = options.config ?? EMPTY_CONFIG;
  const source = await RegistrySource.open(reference, { config, transfer: { timeouts, signal: deadline.signal } });
  const [endpoint] = await endpointsFor(config, source.ref.registry, false);
  const client = new RegistryClient(endpoint!, DEFAULT_RETRY, { timeouts, signal: deadline.signal });
  const workDir = await mkdtemp(join(tmpdir(), 'layerd-index-'));
  try {
    const [image] = await source.images();
    if (!image) throw new LayerdError(ErrorCodes.EFORMAT, `${source.description}: the registry offers no image`);
    const { descriptor, layers, diffIds } = await resolveManifest(source, image.descriptor, options.platform ?? hostPlatform());
    const indexed: IndexImageResult['layers'] = [];
    const published = await publishImageGzipIndexes(client, source.ref.repository, descriptor, layers.map((l, i) => ({
      descriptor: l, diffId: diffIds[i]!, open: () => source.openBlob(l.digest),
    })), workDir, (index) => {
      const event = { digest: index.layer.digest, spans: index.spans.length, tarSize: index.layer.tarSize };
      indexed.push(event);
      options.onLayer?.(event);
    });
    return { ref: formatRegistryRef(source.ref), manifest: descriptor.digest, ...(published ? { artifact: published.digest, listedBy: published.listedBy } : {}), layers: indexed };
  } finally {
    client.close();
    await source.close();
    deadline.dispose();
    await rm(workDir, { recursive: true, force: true });
  }
}

/** The platform's manifest (by way of indexes), its layers and their diffIDs. */
async function resolveManifest(source: RegistrySource, top: Descriptor, platform: PlatformSpec): Promise<{ descriptor: Descriptor; layers: Descriptor[]; diffIds: Digest[] }> {
  let desc = top;
  for (let depth = 0; depth <= 8; depth++) {
    const bytes = await readDocument(source, desc, 'manifest');
    const parsed = parseManifestOrIndex(bytes, `${source.description}: ${desc.digest}`, desc.mediaType);
    if (parsed.kind === 'index') {
      desc = selectPlatform(parsed.index.manifests, platform, `${source.description}: index ${desc.digest}`);
      continue;
    }
    const config = parseImageConfig(await readDocument(source, parsed.manifest.config, 'image config'), `${source.description}: config`);
    if (config.rootfs.diff_ids.length !== parsed.manifest.layers.length) {
      throw new LayerdError(ErrorCodes.EBADJSON, `${source.description}: ${parsed.manifest.layers.length} layers but the config lists ${config.rootfs.diff_ids.length} diff_ids`, { digest: desc.digest });
    }
    return { descriptor: { mediaType: parsed.mediaType, digest: desc.digest, size: bytes.length }, layers: parsed.manifest.layers, diffIds: config.rootfs.diff_ids as Digest[] };
  }
  throw new LayerdError(ErrorCodes.EBADJSON, `${source.description}: indexes nested too deeply`, { digest: top.digest });
}
