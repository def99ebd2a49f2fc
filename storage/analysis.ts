/**
 * Debugging layer stacks from the per-layer indexes alone (nothing is
 * extracted): which layer provides a path and what it shadows, what each
 * layer adds, changes and deletes, the merged tree with provenance, and
 * wasted space ("efficiency", as dive defines it).
 *
 * The merge follows the union's rules (mount/mergedTree.ts): a layer's
 * whiteouts and opaque markers act on the layers below it only; a whiteout
 * under a path the same or a higher layer made a non-directory matches
 * nothing; hard links are resolved to their target's content.
 */
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type Digest, shortDigest } from './digest.js';
import { type LayerEntry, type LayerIndex } from './layerIndex.js';
import { parseImageConfig } from './oci.js';
import { type Store } from './store.js';

export interface LayerRef {
  /** 1 = the base layer. */
  position: number;
  diffId: Digest;
}

interface Version {
  layer: number; // 0-based
  entry: LayerEntry;
}

/** A path's history down the stack, from the merged view's point of view. */
interface PathState {
  /** Versions the layers wrote, bottom first. */
  versions: Version[];
  /** The visible version, or undefined if deleted. */
  visible: Version | undefined;
  /** What hid the path, when it is deleted. */
  deletedBy?: { layer: number; kind: 'whiteout' | 'opaque'; marker: string };
}

export class StackView {
  readonly states = new Map<string, PathState>();

  constructor(readonly layers: LayerIndex[]) {
    layers.forEach((index, layer) => this.apply(index, layer));
  }

  private apply(index: LayerIndex, layer: number): void {
    const byPath = new Map(index.entries.map((e) => [e.path, e]));
    const markerHidden = (path: string): boolean => {
      // a marker below something this layer made a non-directory matches nothing
      for (let p = parentOf(path); p !== ''; p = parentOf(p)) {
        const e = byPath.get(p);
        if (e && e.kind !== 'dir') return true;
      }
      return false;
    };
    for (const dir of index.opaques) {
      if (markerHidden(`${dir}/x`)) continue;
      const prefix = dir === '' ? '' : `${dir}/`;
      for (const [path, state] of this.states) {
        if (path.startsWith(prefix) && path !== dir && state.visible) {
          state.visible = undefined;
          state.deletedBy = { layer, kind: 'opaque', marker: `/${prefix}.wh..wh..opq` };
        }
      }
    }
    for (const target of index.whiteouts) {
      if (markerHidden(target) || !this.states.get(target)?.visible) continue;
      const marker = `/${parentOf(target) === '' ? '' : parentOf(target) + '/'}.wh.${baseName(target)}`;
      for (const [path, state] of this.states) {
        if ((path === target || path.startsWith(`${target}/`)) && state.visible) {
          state.visible = undefined;
          state.deletedBy = { layer, kind: 'whiteout', marker };
        }
      }
    }
    for (const entry of index.entries) {
      if (entry.path === '') continue;
      let state = this.states.get(entry.path);
      if (!state) this.states.set(entry.path, (state = { versions: [], visible: undefined }));
      const version = { layer, entry };
      state.versions.push(version);
      // a non-directory replacing a directory hides what was below it
      const previous = state.visible;
      if (previous && previous.entry.kind === 'dir' && entry.kind !== 'dir') {
        for (const [path, s] of this.states) if (path.startsWith(`${entry.path}/`) && s.visible) s.visible = undefined;
      }
      state.visible = version;
      delete state.deletedBy;
    }
  }

  visible(): [string, Version][] {
    const out: [string, Version][] = [];
    for (const [path, state] of this.states) if (state.visible && this.parentsVisible(path)) out.push([path, state.visible]);
    return out.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  }

  private parentsVisible(path: string): boolean {
    for (let p = parentOf(path); p !== ''; p = parentOf(p)) {
      const s = this.states.get(p);
      if (s && (!s.visible || s.visible.entry.kind !== 'dir')) return false;
    }
    return true;
  }
}

function parentOf(path: string): string {
  const i = path.lastIndexOf('/');
  return i < 0 ? '' : path.slice(0, i);
}

function baseName(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1);
}

function normalize(path: string): string {
  return path.split('/').filter((p) => p !== '' && p !== '.').join('/');
}

export interface StackLayers {
  image: Digest;
  refs: LayerRef[];
  indexes: LayerIndex[];
}

export async function loadStack(store: Store, ref: string): Promise<StackLayers> {
  const image = store.resolveImage(ref);
  const rows = store.db.imageLayers(image.id);
  const indexes: LayerIndex[] = [];
  for (const row of rows) indexes.push(await store.layerIndex(row.diff_id));
  return { image: image.id, refs: rows.map((r, i) => ({ position: i + 1, diffId: r.diff_id })), indexes };
}

export interface WhichResult {
  path: string;
  visible: boolean;
  layer: LayerRef | null;
  entry: Omit<LayerEntry, 'offset'> | null;
  shadows: { layer: LayerRef; kind: string; size: number; mode: number }[];
  deletedBy: { layer: LayerRef; kind: 'whiteout' | 'opaque'; marker: string } | null;
}

/** `which`: the layer providing a path, what it shadows, or what deleted it. */
export function which(stack: StackLayers, rawPath: string): WhichResult {
  const path = normalize(rawPath);
  const view = new StackView(stack.indexes);
  const state = view.states.get(path);
  if (!state) throw new LayerdError(ErrorCodes.ENOTFOUND, `no layer of the image has /${path}`, { path: `/${path}` });
  const ref = (layer: number): LayerRef => stack.refs[layer]!;
  const visible = state.visible !== undefined && view.visible().some(([p]) => p === path);
  const top = state.visible;
  const strip = (e: LayerEntry): Omit<LayerEntry, 'offset'> => { const { offset: _o, ...rest } = e; return rest; };
  return {
    path: `/${path}`,
    visible,
    layer: visible && top ? ref(top.layer) : null,
    entry: visible && top ? strip(top.entry) : null,
    shadows: state.versions.filter((v) => v !== top || !visible).reverse()
      .filter((v) => !(visible && v === top))
      .map((v) => ({ layer: ref(v.layer), kind: v.entry.kind, size: v.entry.size, mode: v.entry.mode })),
    deletedBy: !visible && state.deletedBy ? { layer: ref(state.deletedBy.layer), kind: state.deletedBy.kind, marker: state.deletedBy.marker } : null,
  };
}

export interface LayerChange {
  kind: 'A' | 'C' | 'D';
  path: string;
  /** For A/C of regular files: bytes the layer stores. */
  size: number;
}

/** What layer `n` (1-based) changes against the stack below it. */
export function diffLayer(stack: StackLayers, n: number): LayerChange[] {
  if (!Number.isInteger(n) || n < 1 || n > stack.indexes.length) {
    throw new LayerdError(ErrorCodes.EINVAL, `layer must be 1..${stack.indexes.length}`, { layer: n });
  }
  const below = new StackView(stack.indexes.slice(0, n - 1));
  const belowVisible = new Set(below.visible().map(([p]) => p));
  const index = stack.indexes[n - 1]!;
  const changes: LayerChange[] = [];
  const seen = new Set<string>();
  const after = new StackView(stack.indexes.slice(0, n));
  const afterVisible = new Set(after.visible().map(([p]) => p));
  for (const p of belowVisible) {
    if (!afterVisible.has(p)) { changes.push({ kind: 'D', path: `/${p}`, size: 0 }); seen.add(p); }
  }
  for (const d of index.opaques) {
    if (!seen.has(d)) { changes.push({ kind: 'C', path: `/${d}`, size: 0 }); seen.add(d); }
  }
  for (const e of index.entries) {
    if (e.path === '' || seen.has(e.path)) continue;
    changes.push({ kind: belowVisible.has(e.path) ? 'C' : 'A', path: `/${e.path}`, size: e.kind === 'file' && e.link === undefined ? e.size : 0 });
  }
  return changes.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

export interface HistoryRow {
  layer: LayerRef;
  digest: Digest | null;
  compressedSize: number;
  size: number;
  added: number;
  modified: number;
  deleted: number;
  bytes: number;
  createdBy: string | null;
  created: string | null;
}

/** One row per layer: sizes, what it adds/changes/deletes, and how it was made. */
export async function history(store: Store, ref: string): Promise<HistoryRow[]> {
  const stack = await loadStack(store, ref);
  const image = store.resolveImage(ref);
  const config = parseImageConfig(await store.readBlob(image.config_digest), `config ${image.config_digest}`);
  const layerHistory = (config.history ?? []).filter((h) => !h.empty_layer);
  const rows = store.db.imageLayers(image.id);
  return stack.refs.map((layer, i) => {
    const changes = diffLayer(stack, i + 1);
    return {
      layer,
      digest: rows[i]!.blob_digest,
      compressedSize: rows[i]!.blob_size,
      size: store.db.getLayer(layer.diffId)?.size ?? 0,
      added: changes.filter((c) => c.kind === 'A').length,
      modified: changes.filter((c) => c.kind === 'C').length,
      deleted: changes.filter((c) => c.kind === 'D').length,
      bytes: changes.reduce((n, c) => n + c.size, 0),
      createdBy: layerHistory[i]?.created_by ?? null,
      created: layerHistory[i]?.created ?? null,
    };
  });
}

export interface TreeEntry {
  path: string;
  kind: string;
  size: number;
  mode: number;
  layer: LayerRef;
}

/** The merged tree (or a subtree), each entry with the layer providing it. */
export function tree(stack: StackLayers, rawPath = '/', depth = Infinity): TreeEntry[] {
  const base = normalize(rawPath);
  const baseDepth = base === '' ? 0 : base.split('/').length;
  const view = new StackView(stack.indexes);
  return view.visible()
    .filter(([p]) => base === '' || p === base || p.startsWith(`${base}/`))
    .filter(([p]) => p.split('/').length - baseDepth <= depth)
    .map(([p, v]) => ({ path: `/${p}`, kind: v.entry.kind, size: v.entry.size, mode: v.entry.mode, layer: stack.refs[v.layer]! }));
}

export interface Efficiency {
  /** (bytes of all files in all layers − wasted bytes) / bytes of all files, as dive computes it. */
  score: number;
  totalBytes: number;
  wastedBytes: number;
  /** Bytes of lower versions hidden by an upper layer's version or deletion. */
  shadowedBytes: number;
  deletedBytes: number;
  /** Files whose content appears in more than one layer. */
  duplicated: number;
  offenders: { path: string; count: number; wastedBytes: number; layers: number[] }[];
}

/** Wasted space: bytes stored in some layer but not visible at the top. */
export function efficiency(stack: StackLayers, top = 20): Efficiency {
  const view = new StackView(stack.indexes);
  let totalBytes = 0;
  let shadowedBytes = 0;
  let deletedBytes = 0;
  let duplicated = 0;
  const offenders: Efficiency['offenders'] = [];
  for (const [path, state] of view.states) {
    const files = state.versions.filter((v) => v.entry.kind === 'file' && v.entry.link === undefined);
    const bytes = files.reduce((n, v) => n + v.entry.size, 0);
    totalBytes += bytes;
    const visibleBytes = state.visible && state.visible.entry.kind === 'file' && state.visible.entry.link === undefined ? state.visible.entry.size : 0;
    const wasted = bytes - visibleBytes;
    if (wasted <= 0) continue;
    if (state.visible) shadowedBytes += wasted;
    else deletedBytes += wasted;
    if (files.length > 1) duplicated++;
    offenders.push({ path: `/${path}`, count: files.length, wastedBytes: wasted, layers: files.map((v) => v.layer + 1) });
  }
  const wastedBytes = shadowedBytes + deletedBytes;
  offenders.sort((a, b) => b.wastedBytes - a.wastedBytes);
  return {
    score: totalBytes === 0 ? 1 : (totalBytes - wastedBytes) / totalBytes,
    totalBytes, wastedBytes, shadowedBytes, deletedBytes, duplicated,
    offenders: offenders.slice(0, top),
  };
}

export function layerLabel(ref: LayerRef): string {
  return `${ref.position}:${shortDigest(ref.diffId)}`;
}
