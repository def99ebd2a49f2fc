/**
 * A directory as a content-addressed layer: walk it (scanDirectory, with
 * the markers of its dialect), write it as a deterministic OCI
 * layer tar, and commit that as a new layer on top of an image. Used for a
 * container's writable layer and for live directory layers
 * (`layerctl commit --layer-dir`).
 */
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type CommitResult, commitWrittenLayer } from '../storage/commit.js';
import { writeLayerTar } from '../storage/layerWriter.js';
import { splitNameTag } from '../storage/references.js';
import { type Store } from '../storage/store.js';
import { directorySource, scanDirectory, type MarkerDialect } from './lowerDir.js';
import { isWithin } from './paths.js';
import type { Writable } from 'node:stream';

export interface DirectoryCommitOptions {
  ref?: { name: string; tag: string };
  /** How markers are read: 'overlay' for a container's writable layer, 'layer-dir' for a directory a user prepared. */
  dialect: MarkerDialect;
  createdBy: string;
  comment?: string;
}

/** Write `dir` as an OCI layer tar (whiteouts included) to `out`. */
export async function writeDirectoryLayer(dir: string, out: Writable, label: string | undefined, dialect: MarkerDialect): Promise<void> {
  const scanned = await scanDirectory(dir, label, dialect);
  await writeLayerTar(directorySource(scanned), out);
}

/** Commit `dir` as a new layer on top of image `baseRef`; the result is a new image. */
export async function commitDirectory(store: Store, baseRef: string, dir: string, options: DirectoryCommitOptions): Promise<CommitResult> {
  return commitWrittenLayer(store, baseRef, (out) => writeDirectoryLayer(dir, out, undefined, options.dialect), { ...options, source: dir });
}

/**
 * A layer directory as given by a user: an absolute path to a directory that
 * neither contains nor lies inside any of `keepClearOf` (the store, a
 * mountpoint: a layer must never include them). Returns it resolved.
 */
export async function checkLayerDirectory(dir: string, keepClearOf: string[]): Promise<string> {
  if (typeof dir !== 'string' || !dir.startsWith('/')) {
    throw new LayerdError(ErrorCodes.EINVAL, 'the layer directory must be an absolute path', { layerDir: String(dir) });
  }
  const path = resolve(dir);
  const st = await stat(path).catch(() => undefined);
  if (!st?.isDirectory()) throw new LayerdError(ErrorCodes.ENOTFOUND, `layer directory ${path} is not a directory`, { layerDir: path });
  for (const other of keepClearOf) {
    if (isWithin(path, other) || isWithin(other, path)) {
      throw new LayerdError(ErrorCodes.EINVAL, `layer directory ${path} must not contain or lie inside ${other}`, { layerDir: path });
    }
  }
  return path;
}

/**
 * `layerctl commit --layer-dir DIR IMAGE [REF]`: DIR (absolute) becomes a
 * content-addressed layer on top of IMAGE, in a new image tagged REF.
 */
export async function commitLayerDirectory(
  store: Store, image: string, dir: string, options: { ref?: string; comment?: string } = {},
): Promise<CommitResult> {
  const path = await checkLayerDirectory(dir, [store.layout.root]);
  const ref = options.ref !== undefined ? splitNameTag(options.ref) : undefined;
  return commitDirectory(store, image, path, {
    dialect: 'layer-dir',
    createdBy: `layerctl commit --layer-dir ${path}`, ...(ref ? { ref } : {}), ...(options.comment ? { comment: options.comment } : {}),
  });
}
