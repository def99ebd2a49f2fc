/**
 * Merges of lower layers kept for the next mount of the same layers.
 *
 * A mount host serves many containers of one image: merging its layers
 * again for each (tens of ms for ~7k entries, more on a cold JIT) would be
 * the largest part of a mount. The merge is kept and never changed: each
 * mount's tree is built over it (`new MergedTree(base)`) and copies only the
 * nodes it touches.
 */
import type { LayerSource } from '../storage/layerIndex.js';
import { LowerInoAllocator } from './inodes.js';
import { MergedTree } from './mergedTree.js';

/** Merge `layers` (bottom → top) into a new tree (frozen once a mount's tree is built over it). */
export function mergeLayers(layers: readonly LayerSource[]): MergedTree {
  const tree = new MergedTree();
  const inos = new LowerInoAllocator();
  for (const layer of layers) tree.addLayer(layer, inos);
  return tree;
}

/** Merges by layer stack (the identity of its LayerSource objects), the most recently used kept. */
export class LowerMergeCache {
  private readonly merges = new Map<string, MergedTree>();
  private readonly ids = new WeakMap<LayerSource, number>();
  private nextId = 1;

  constructor(private readonly limit = 2) {}

  /** The merge of `layers`, made now if it is not kept. */
  get(layers: readonly LayerSource[]): MergedTree {
    const key = layers.map((l) => this.idOf(l)).join(',');
    let merge = this.merges.get(key);
    if (merge === undefined) {
      merge = mergeLayers(layers);
      if (this.merges.size >= this.limit) this.merges.delete(this.merges.keys().next().value!);
    } else {
      this.merges.delete(key); // re-inserted below: most recently used last
    }
    this.merges.set(key, merge);
    return merge;
  }

  private idOf(layer: LayerSource): number {
    let id = this.ids.get(layer);
    if (id === undefined) this.ids.set(layer, id = this.nextId++);
    return id;
  }
}
