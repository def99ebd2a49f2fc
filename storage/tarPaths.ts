/**
 * Names inside layer tar archives: normalisation, the checks that keep a
 * hostile archive from naming anything outside the layer, and the OCI
 * whiteout conventions.
 */
import { ErrorCodes, LayerdError } from '../common/errors.js';

export const MAX_PATH_BYTES = 4096;
export const MAX_NAME_BYTES = 255;

export const WHITEOUT_PREFIX = '.wh.';
export const OPAQUE_MARKER = '.wh..wh..opq';
/** AUFS bookkeeping names (`.wh..wh.plnk`, `.wh..wh.aufs`): not content. */
const AUFS_META_PREFIX = '.wh..wh.';

/**
 * Turn an archive member name into a layer path: no leading `./` or `/`,
 * no empty or `.` components, no trailing `/`; the root is "".
 * Absolute names and `..` components are refused, not cleaned: an archive
 * that says them is either broken or hostile.
 */
export function normalizeTarPath(raw: string, what = 'entry'): string {
  if (raw.includes('\0')) {
    throw new LayerdError(ErrorCodes.EBADTAR, `${what} name contains a NUL byte`, { path: raw.replace(/\0/g, '\\0') });
  }
  if (raw.startsWith('/')) {
    throw new LayerdError(ErrorCodes.EBADTAR, `${what} has an absolute name: ${raw}`, { path: raw });
  }
  const parts: string[] = [];
  for (const part of raw.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') {
      throw new LayerdError(ErrorCodes.EBADTAR, `${what} name escapes the layer with '..': ${raw}`, { path: raw });
    }
    if (Buffer.byteLength(part) > MAX_NAME_BYTES) {
      throw new LayerdError(ErrorCodes.ELIMIT, `${what} has a name component over ${MAX_NAME_BYTES} bytes`, { path: raw });
    }
    parts.push(part);
  }
  const path = parts.join('/');
  if (Buffer.byteLength(path) > MAX_PATH_BYTES) {
    throw new LayerdError(ErrorCodes.ELIMIT, `${what} name is over ${MAX_PATH_BYTES} bytes`, { path: raw.slice(0, 200) });
  }
  return path;
}

export function parentOf(path: string): string {
  const slash = path.lastIndexOf('/');
  return slash === -1 ? '' : path.slice(0, slash);
}

export function baseName(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1);
}

export function joinPath(dir: string, name: string): string {
  return dir === '' ? name : `${dir}/${name}`;
}

/** Every proper ancestor of a path, nearest first, ending with "" (the root). */
export function* ancestorsOf(path: string): Generator<string> {
  let p = path;
  while (p !== '') {
    p = parentOf(p);
    yield p;
  }
}

export type WhiteoutName =
  | { kind: 'none' }
  | { kind: 'whiteout'; target: string }
  | { kind: 'opaque'; dir: string }
  | { kind: 'meta' };

/** Classify a normalised path by the OCI whiteout naming rules. */
export function classifyWhiteout(path: string): WhiteoutName {
  const name = baseName(path);
  if (!name.startsWith(WHITEOUT_PREFIX)) return { kind: 'none' };
  if (name === OPAQUE_MARKER) return { kind: 'opaque', dir: parentOf(path) };
  if (name.startsWith(AUFS_META_PREFIX)) return { kind: 'meta' };
  const hidden = name.slice(WHITEOUT_PREFIX.length);
  if (hidden === '' || hidden === '.' || hidden === '..') {
    throw new LayerdError(ErrorCodes.EBADTAR, `invalid whiteout name: ${path}`, { path });
  }
  return { kind: 'whiteout', target: joinPath(parentOf(path), hidden) };
}
