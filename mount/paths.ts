/**
 * Union paths use the LayerIndex convention: no leading `/`, components
 * joined by `/`, the root is "". FUSE hands us `/a/b`; `fromFusePath` maps it.
 */

export function fromFusePath(fusePath: string): string {
  return fusePath.length <= 1 ? '' : fusePath.slice(1);
}

export function joinPath(parent: string, name: string): string {
  return parent === '' ? name : `${parent}/${name}`;
}

export function parentOf(path: string): string {
  const slash = path.lastIndexOf('/');
  return slash < 0 ? '' : path.slice(0, slash);
}

export function baseName(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1);
}

/** Ancestors of `path` from its parent up to (and including) the root "". */
export function* ancestorsOf(path: string): Generator<string> {
  let p = path;
  while (p !== '') {
    p = parentOf(p);
    yield p;
  }
}

/** True when `path` is `dir` or lies below it. */
export function isWithin(path: string, dir: string): boolean {
  return dir === '' || path === dir || path.startsWith(dir + '/');
}

/** An empty or `.` component: `/a`, `a//b`, `a/`, `./a`, `a/./b`, `.`, "". */
const ODD_COMPONENT = /(?:^|\/)\.?(?:\/|$)/;

/** Normalise an index path (`./a/b/`, `a//b`) to the union convention. */
export function normalizeIndexPath(path: string): string {
  // Indexes written by the importer are normal already: check before building anything (mount time).
  if (!ODD_COMPONENT.test(path)) return path;
  return path.split('/').filter((c) => c !== '' && c !== '.').join('/');
}

/** OCI whiteout naming. */
export const WHITEOUT_PREFIX = '.wh.';
export const OPAQUE_MARKER = '.wh..wh..opq';
