/**
 * Committing a changeset (an OCI layer tar, e.g. a container's writable
 * layer) as a new layer on top of an image: the result is a new image whose
 * config lists the new diffID and whose history says how it was made.
 *
 * The new layer is stored uncompressed (its blob is its `layer.tar`, so its
 * distribution digest is its diffID until a push compresses it).
 */
import { createWriteStream } from 'node:fs';
import { join } from 'node:path';
import { type Writable } from 'node:stream';
import { FsError } from '../common/sys/errors.js';
import { ErrorCodes, LayerdError, errnoCode } from '../common/errors.js';
import { type Digest, digestOf } from './digest.js';
import { Transaction } from './importer.js';
import { LAYER_TAR } from './layerIndex.js';
import { type Descriptor, type ImageConfig, type ImageManifest, MediaTypes, parseImageConfig, parseManifestOrIndex } from './oci.js';
import { formatRef } from './references.js';
import { type Store } from './store.js';

export interface CommitResult {
  image: Digest;
  ref: string | null;
  diffId: Digest;
  /** Distribution digest of the new layer as stored (uncompressed: = diffID). */
  digest: Digest;
  size: number;
}

/** Docker media types of a base manifest, as the OCI types a new manifest uses. */
const TO_OCI: Record<string, string> = {
  [MediaTypes.dockerLayer]: MediaTypes.ociLayerGzip,
  'application/vnd.docker.image.rootfs.diff.tar': MediaTypes.ociLayer,
  [MediaTypes.dockerConfig]: MediaTypes.ociConfig,
};

/**
 * Write a layer tar with `write` into a private file of the ingest area and
 * commit it on top of `baseRef`. Whatever fails, the file is closed before
 * its directory goes (no descriptor to a deleted `layer.tar` is kept). A
 * source that changes while it is read (`source`: a live upper or layer
 * directory) is ECONFLICT saying what changed, not an internal error.
 */
export async function commitWrittenLayer(
  store: Store, baseRef: string, write: (out: Writable) => Promise<void>,
  options: { ref?: { name: string; tag: string }; createdBy: string; comment?: string; source: string },
): Promise<CommitResult> {
  const workDir = await store.newWorkDir();
  const tar = join(workDir, LAYER_TAR);
  const out = createWriteStream(tar, { mode: 0o600 });
  try {
    try {
      await write(out);
    } catch (err) {
      throw changedSource(err, options.source) ?? err;
    }
    return await commitLayer(store, baseRef, tar, options);
  } finally {
    if (!out.closed) {
      const closed = new Promise<void>((resolve) => out.once('close', () => resolve()));
      out.destroy();
      await closed;
    }
    await store.releaseWorkDir(workDir);
  }
}

/** A read that failed because the source changed underneath: a file gone, or not the size the scan saw. */
function changedSource(err: unknown, source: string): LayerdError | undefined {
  // A system-call layer error carries its errno apart from its layerd code.
  const code = err instanceof FsError ? err.errno : errnoCode(err);
  const message = err instanceof Error ? err.message : String(err);
  let what: string | undefined;
  if (code === 'ENOENT' || code === 'ESTALE' || code === 'ENOTDIR' || code === 'ELOOP') {
    const path = err instanceof FsError ? err.context['path'] : (err as { path?: unknown }).path;
    what = `${typeof path === 'string' ? path : 'a file'} vanished or was replaced`;
  } else if (err instanceof LayerdError && err.code === ErrorCodes.ECONFLICT) {
    what = message; // the writer's own word: which file, and how it changed
  } else if (!(err instanceof LayerdError) && /size mismatch/i.test(message)) {
    what = 'a file changed size while it was being read';
  }
  if (what === undefined) return undefined;
  return new LayerdError(ErrorCodes.ECONFLICT, `${source} changed while it was being committed: ${what}; commit it again once it is still`, { path: source }, { cause: err });
}

export async function commitLayer(
  store: Store, baseRef: string, layerTar: string,
  options: { ref?: { name: string; tag: string }; createdBy: string; comment?: string },
): Promise<CommitResult> {
  const base = store.resolveImage(baseRef);
  const parsed = parseManifestOrIndex(await store.readBlob(base.id), `manifest ${base.id}`, base.media_type);
  if (parsed.kind !== 'manifest') throw new LayerdError(ErrorCodes.ECORRUPT, `image ${base.id} is not a manifest`);
  const baseConfigBytes = await store.readBlob(base.config_digest);
  const baseConfig = parseImageConfig(baseConfigBytes, `config ${base.config_digest}`);

  const workDir = await store.newWorkDir();
  try {
    const tx = new Transaction(store, workDir);
    const ingested = await tx.ingestLayerFile(layerTar, { storedBlob: true });
    tx.stageLayer(ingested, MediaTypes.ociLayer);

    const created = new Date().toISOString();
    const raw = JSON.parse(baseConfigBytes.toString('utf8')) as ImageConfig;
    const config: ImageConfig = {
      ...raw,
      created,
      rootfs: { type: 'layers', diff_ids: [...baseConfig.rootfs.diff_ids, ingested.diffId] },
      history: [...(baseConfig.history ?? []), { created, created_by: options.createdBy, ...(options.comment ? { comment: options.comment } : {}) }],
    };
    const configBytes = Buffer.from(JSON.stringify(config));
    const configDigest = digestOf(configBytes);
    await tx.stageDocument(configDigest, configBytes, MediaTypes.ociConfig);

    const newLayer: Descriptor = { mediaType: MediaTypes.ociLayer, digest: ingested.diffId, size: ingested.diffSize };
    const manifest: ImageManifest = {
      schemaVersion: 2,
      mediaType: MediaTypes.ociManifest,
      config: { mediaType: MediaTypes.ociConfig, digest: configDigest, size: configBytes.length },
      layers: [...parsed.manifest.layers.map((l) => ({ ...l, mediaType: TO_OCI[l.mediaType] ?? l.mediaType })), newLayer],
    };
    const manifestBytes = Buffer.from(JSON.stringify(manifest));
    const manifestDigest = digestOf(manifestBytes);
    await tx.stageDocument(manifestDigest, manifestBytes, MediaTypes.ociManifest);

    const baseLayers = store.db.imageLayers(base.id).map((l) => ({
      diffId: l.diff_id, blobDigest: l.blob_digest, mediaType: TO_OCI[l.media_type] ?? l.media_type, size: l.blob_size,
    }));
    tx.images.set(manifestDigest, {
      manifestDigest, manifestMediaType: MediaTypes.ociManifest, configDigest, config, indexDigest: null,
      layers: [...baseLayers, { diffId: ingested.diffId, blobDigest: null, mediaType: MediaTypes.ociLayer, size: ingested.diffSize }],
      refs: options.ref ? [options.ref] : [],
    });
    await tx.commit();
    return {
      image: manifestDigest,
      ref: options.ref ? formatRef(options.ref.name, options.ref.tag) : null,
      diffId: ingested.diffId, digest: ingested.diffId, size: ingested.diffSize,
    };
  } finally {
    await store.releaseWorkDir(workDir);
  }
}
