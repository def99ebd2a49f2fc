/**
 * Does a directory containerd unpacked hold what a layer's tar holds? Before
 * layerd stores a committed unpack snapshot as the layer's original blob
 * (not as a tar rebuilt from the directory), the two file tables must agree:
 * the same paths with the same kinds, file sizes and symlink targets, the
 * same whiteouts and opaque directories. Directories the tar does not list
 * may exist in the unpacked tree only as parents of what it does list
 * (containerd's applier makes those).
 *
 * Metadata (modes, owners, times, xattrs) is not compared: containerd's
 * applier sets some of it differently (the times of parent directories it
 * touched), and the stored layer keeps the tar's own.
 */
import { type LayerEntry, type LayerIndex } from '../../storage/layerIndex.js';

/** Differences named in a mismatch report, at most. */
const MAX_REPORTED = 5;

function describe(e: LayerEntry): string {
  if (e.kind === 'file') return `file of ${e.size} bytes`;
  if (e.kind === 'symlink') return `symlink to ${JSON.stringify(e.target ?? '')}`;
  return e.kind;
}

/** Why `unpacked` (a scanned directory) does not hold what `layer` (a tar's index) does, or undefined when it does. */
export function fileTableDifference(unpacked: LayerIndex, layer: LayerIndex): string | undefined {
  const problems: string[] = [];
  const have = new Map(unpacked.entries.filter((e) => e.path !== '').map((e) => [e.path, e]));
  const want = new Map(layer.entries.filter((e) => e.path !== '').map((e) => [e.path, e]));
  for (const [path, w] of want) {
    const h = have.get(path);
    if (h === undefined) problems.push(`${path}: missing from the directory (the layer has a ${describe(w)})`);
    else if (describe(h) !== describe(w)) problems.push(`${path}: the directory has a ${describe(h)}, the layer a ${describe(w)}`);
  }
  const parents = new Set<string>();
  for (const path of [...want.keys(), ...layer.whiteouts, ...layer.opaques]) {
    for (let i = path.lastIndexOf('/'); i > 0; i = path.lastIndexOf('/', i - 1)) parents.add(path.slice(0, i));
  }
  for (const [path, h] of have) {
    if (want.has(path)) continue;
    if (h.kind === 'dir' && parents.has(path)) continue;
    problems.push(`${path}: a ${describe(h)} in the directory is not in the layer`);
  }
  const sets: [string, string[], string[]][] = [['whiteout', unpacked.whiteouts, layer.whiteouts], ['opaque directory', unpacked.opaques, layer.opaques]];
  for (const [what, a, b] of sets) {
    const inDir = new Set(a);
    const inLayer = new Set(b);
    for (const p of inLayer) if (!inDir.has(p)) problems.push(`${p}: ${what} missing from the directory`);
    for (const p of inDir) if (!inLayer.has(p)) problems.push(`${p}: ${what} in the directory is not in the layer`);
  }
  if (problems.length === 0) return undefined;
  const more = problems.length > MAX_REPORTED ? ` (and ${problems.length - MAX_REPORTED} more)` : '';
  return `${problems.slice(0, MAX_REPORTED).join('; ')}${more}`;
}
