/**
 * `pull --lazy`: fetch the index, manifest and config, and of each layer
 * only its eStargz footer and table of contents (verified against the
 * layer's `toc.digest` annotation); build each layer's index from its TOC,
 * record the image, and return. The image can be mounted at once: its files'
 * bytes are fetched as they are read (lazyLayer.ts), and a background fill
 * (fill.ts) later makes every layer an ordinary stored one.
 *
 * A plain gzip layer is served lazily from its gzip index (gzipIndex.ts),
 * an OCI artifact referring to the image manifest (gzipArtifact.ts) that
 * `layerctl push` and `layerctl index` publish. A layer that is neither
 * (zstd, gzip without an index, …) cannot be served lazily: the whole image
 * is then pulled as usual, and the answer says why (`fallback`).
 */
import { mkdir, open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, isDigest } from '../digest.js';
import { noSpaceError } from '../diskSpace.js';
import { type ImportedImage, Transaction, readDocument } from '../importer.js';
import { MediaTypes, type Descriptor, type ImageManifest, parseImageConfig, parseManifestOrIndex } from '../oci.js';
import { formatPlatform, hostPlatform, normalizePlatform, selectPlatform } from '../platform.js';
import { formatRef } from '../references.js';
import { type PullOptions, openPullSource, pullImage } from '../registry/pull.js';
import { RegistrySource } from '../registry/source.js';
import { type Store } from '../store.js';
import { ESTARGZ_FOOTER_SIZE, MAX_TOC_BYTES, TOC_DIGEST_ANNOTATION, parseFooter, parseToc, planLazyLayer, readTocMember } from './estargz.js';
import { type ReferrersVia, findGzipIndexes } from './gzipArtifact.js';
import { type GzipIndex } from './gzipIndex.js';
import { stageGzipLazyLayer } from './gzipLazy.js';
import { LAZY_CONTENT, LAZY_FORMAT_VERSION, LAZY_JSON, type LazyLayerInfo } from './lazyLayer.js';

export interface LazyPullOptions extends PullOptions {
  /** Path of the registries configuration, recorded so the processes serving the layer fetch with the same credentials and mirrors. */
  registriesConfig?: string;
}

export interface LazyPullResult {
  images: ImportedImage[];
  /** Layers recorded lazily (their fills are the caller's to start). */
  lazyLayers: Digest[];
  /** Why the image was pulled in full instead (a layer is neither eStargz nor has a gzip index). */
  fallback?: string;
  /** Where the gzip indexes of plain gzip layers were found, if any were used. */
  gzipIndex?: ReferrersVia;
}

const GZIP_LAYER_TYPES: readonly string[] = [MediaTypes.ociLayerGzip, MediaTypes.dockerLayer];

export async function pullLazy(store: Store, reference: string, options: LazyPullOptions = {}): Promise<LazyPullResult> {
  const { source, deadline } = await openPullSource(store, reference, options);
  let fallback: string | undefined;
  const workDir = await store.newWorkDir();
  try {
    const tx = new Transaction(store, workDir);
    await tx.disk.check();
    const [image] = await source.images();
    if (!image) throw new LayerdError(ErrorCodes.EFORMAT, `${source.description}: the registry offers no image`);
    const found = await resolveManifest(tx, source, image.descriptor, options);
    const gzip = await gzipIndexesFor(source, found, store);
    fallback = gzip.error ?? notLazy(found.manifest, found.config.rootfs.diff_ids as Digest[], store, gzip.indexes);
    if (fallback === undefined) {
      const lazyLayers: Digest[] = [];
      for (const [i, layer] of found.manifest.layers.entries()) {
        const diffId = found.config.rootfs.diff_ids[i] as Digest;
        if (store.db.getLayer(diffId) || tx.lazyLayers.has(diffId)) {
          options.onProgress?.({ type: 'layer-exists', digest: layer.digest, diffId });
          continue;
        }
        options.onProgress?.({ type: 'layer-start', digest: layer.digest, size: layer.size, index: i, count: found.manifest.layers.length });
        const indexed = layer.annotations?.[TOC_DIGEST_ANNOTATION] === undefined ? gzip.indexes.get(layer.digest) : undefined;
        if (indexed) await stageGzipLazyLayer(tx, source, layer, diffId, indexed, options.registriesConfig);
        else await stageLazyLayer(tx, source, layer, diffId, options.registriesConfig);
        lazyLayers.push(diffId);
        options.onProgress?.({ type: 'layer-done', digest: layer.digest, diffId });
      }
      tx.images.set(found.digest, {
        manifestDigest: found.digest, manifestMediaType: found.mediaType, configDigest: found.manifest.config.digest, config: found.config,
        indexDigest: found.indexDigest,
        // A lazy layer's blob is not stored yet: the fill names it when it is (MetadataDb.completeLazyLayer).
        layers: found.manifest.layers.map((l, i) => {
          const diffId = found.config.rootfs.diff_ids[i] as Digest;
          const stored = store.db.getBlob(l.digest) !== undefined && !tx.lazyLayers.has(diffId);
          return { diffId, blobDigest: stored ? l.digest : null, mediaType: l.mediaType, size: l.size };
        }),
        refs: image.refs,
      });
      await tx.commit();
      const config = found.config;
      return {
        images: [{
          id: found.digest, refs: image.refs.map((r) => formatRef(r.name, r.tag)), layers: found.manifest.layers.length,
          platform: formatPlatform(normalizePlatform({ os: config.os, architecture: config.architecture, ...(config.variant ? { variant: config.variant } : {}) })),
        }],
        lazyLayers,
        ...(gzip.via ? { gzipIndex: gzip.via } : {}),
      };
    }
  } catch (err) {
    throw noSpaceError(err, `pulling ${source.description} lazily`) ?? err;
  } finally {
    await store.releaseWorkDir(workDir);
    deadline.dispose();
    await source.close();
  }
  // Some layer cannot be served lazily: the ordinary pull, which says nothing of laziness.
  return { images: await pullImage(store, reference, options), lazyLayers: [], fallback };
}

/** Why the image cannot be pulled lazily, or undefined if it can. */
function notLazy(manifest: ImageManifest, diffIds: Digest[], store: Store, gzipIndexes: ReadonlyMap<Digest, unknown>): string | undefined {
  for (const [i, layer] of manifest.layers.entries()) {
    if (store.db.getLayer(diffIds[i]!)) continue;
    if (!GZIP_LAYER_TYPES.includes(layer.mediaType)) return `layer ${layer.digest} is ${layer.mediaType}, not an eStargz gzip layer: pulled in full`;
    if (!isDigest(layer.annotations?.[TOC_DIGEST_ANNOTATION]) && !gzipIndexes.has(layer.digest)) {
      return `layer ${layer.digest} is not eStargz (no ${TOC_DIGEST_ANNOTATION} annotation) and the registry has no gzip index for it (layerctl index): pulled in full`;
    }
  }
  return undefined;
}

/**
 * The gzip indexes (gzipArtifact.ts) of the plain gzip layers the store
 * lacks, if there are such layers. An index that cannot be used (does not
 * verify, cannot be fetched) is a reason to pull in full, not to fail.
 */
async function gzipIndexesFor(
  source: RegistrySource, found: FoundManifest, store: Store,
): Promise<{ indexes: ReadonlyMap<Digest, { index: GzipIndex; blob: Descriptor }>; via?: ReferrersVia; error?: string }> {
  const plain = found.manifest.layers.flatMap((descriptor, i) => {
    const diffId = found.config.rootfs.diff_ids[i] as Digest;
    return !store.db.getLayer(diffId) && GZIP_LAYER_TYPES.includes(descriptor.mediaType) && descriptor.annotations?.[TOC_DIGEST_ANNOTATION] === undefined
      ? [{ descriptor, diffId }] : [];
  });
  if (plain.length === 0) return { indexes: new Map() };
  try {
    const listed = await findGzipIndexes(source, found.digest, plain);
    return listed ? { indexes: listed.indexes, via: listed.via } : { indexes: new Map() };
  } catch (err) {
    return { indexes: new Map(), error: `the gzip index of ${source.description} cannot be used (${(err as Error).message}): pulled in full` };
  }
}

interface FoundManifest {
  digest: Digest;
  mediaType: string;
  manifest: ImageManifest;
  config: ReturnType<typeof parseImageConfig>;
  indexDigest: Digest | null;
}

/** Walk indexes down to the manifest for the platform, staging the documents on the way. */
async function resolveManifest(tx: Transaction, source: RegistrySource, top: Descriptor, options: LazyPullOptions): Promise<FoundManifest> {
  let desc = top;
  let indexDigest: Digest | null = null;
  for (let depth = 0; depth <= 8; depth++) {
    const bytes = await readDocument(source, desc, 'manifest');
    const parsed = parseManifestOrIndex(bytes, `${source.description}: ${desc.digest}`, desc.mediaType);
    await tx.stageDocument(desc.digest, bytes, parsed.mediaType);
    if (parsed.kind === 'index') {
      indexDigest ??= desc.digest;
      desc = selectPlatform(parsed.index.manifests, options.platform ?? hostPlatform(), `${source.description}: index ${desc.digest}`);
      continue;
    }
    const manifest = parsed.manifest;
    const configBytes = await readDocument(source, manifest.config, 'image config');
    const config = parseImageConfig(configBytes, `${source.description}: config ${manifest.config.digest}`);
    await tx.stageDocument(manifest.config.digest, configBytes, manifest.config.mediaType);
    if (config.rootfs.diff_ids.length !== manifest.layers.length) {
      throw new LayerdError(ErrorCodes.EBADJSON, `${source.description}: ${manifest.layers.length} layers but the config lists ${config.rootfs.diff_ids.length} diff_ids`, { digest: desc.digest });
    }
    return { digest: desc.digest, mediaType: parsed.mediaType, manifest, config, indexDigest };
  }
  throw new LayerdError(ErrorCodes.EBADJSON, `${source.description}: indexes nested too deeply`, { digest: top.digest });
}

/** Footer, TOC (verified), index and an empty content file, in a directory of the ingest area. */
async function stageLazyLayer(tx: Transaction, source: RegistrySource, layer: Descriptor, diffId: Digest, registriesConfig: string | undefined): Promise<void> {
  const what = `${source.description}: layer ${layer.digest}`;
  const tocDigest = layer.annotations![TOC_DIGEST_ANNOTATION] as Digest;
  if (layer.size < ESTARGZ_FOOTER_SIZE) throw new LayerdError(ErrorCodes.EFORMAT, `${what}: too small for eStargz`);
  const tocOffset = parseFooter(await source.readBlobRange(layer.digest, layer.size - ESTARGZ_FOOTER_SIZE, layer.size), what);
  const tocEnd = layer.size - ESTARGZ_FOOTER_SIZE;
  if (tocOffset >= tocEnd || tocEnd - tocOffset > MAX_TOC_BYTES) throw new LayerdError(ErrorCodes.EFORMAT, `${what}: TOC offset ${tocOffset} out of range`);
  const member = await readTocMember(await source.readBlobRange(layer.digest, tocOffset, tocEnd), what);
  if (member.digest !== tocDigest) {
    throw new LayerdError(ErrorCodes.EDIGEST, `${what}: the TOC hashes to ${member.digest}, the manifest says ${tocDigest}`, { digest: layer.digest, expected: tocDigest, actual: member.digest });
  }
  const plan = planLazyLayer(parseToc(member.json, what), member, tocOffset, diffId, what);
  const dir = join(tx.nextDir(), 'lazy');
  await mkdir(dir, { recursive: true });
  const info: LazyLayerInfo = {
    version: LAZY_FORMAT_VERSION, diffId, registry: source.ref.registry, repository: source.ref.repository,
    blobDigest: layer.digest, blobSize: layer.size, mediaType: layer.mediaType, tocDigest,
    ...(registriesConfig !== undefined ? { registriesConfig } : {}), contentSize: plan.contentSize, files: plan.files,
  };
  await writeFile(join(dir, 'index.json'), JSON.stringify(plan.index), { mode: 0o600 });
  await writeFile(join(dir, LAZY_JSON), JSON.stringify(info), { mode: 0o600 });
  // Sparse: only what is read takes room. The TOC's own bytes are here already.
  const content = await open(join(dir, LAZY_CONTENT), 'wx', 0o600);
  try {
    await content.truncate(plan.contentSize);
    await content.write(member.json, 0, member.json.length, plan.tocFile.offset);
  } finally {
    await content.close();
  }
  tx.staged.push({ kind: 'lazy', diffId, path: dir });
  tx.lazyLayers.set(diffId, {
    row: { blob_digest: layer.digest, media_type: layer.mediaType, blob_size: layer.size, format: 'estargz', state: 'lazy', filled_bytes: 0, error: null },
    fileBytes: plan.fileBytes, entries: plan.index.entries.length,
  });
}
