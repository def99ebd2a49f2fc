/**
 * The merged view of ordered layers, built in memory once at mount time.
 *
 * Every visible path maps to a `UnionNode` (O(1) lookup by path); a
 * directory node keeps the names of its children. Lower content is described
 * by `LowerObject`s: one per lower inode, shared by all names of a hard-link
 * group, so `names.size` is the group's link count in the merged view.
 *
 * Merge rules (OCI image layers, as overlayfs would show them):
 * - a layer's whiteouts and opaque markers act only on the layers below it,
 *   so they are applied before the layer's own entries;
 * - a whiteout only ever names a path under real directories (the map never
 *   holds a path below a symlink or file), so a whiteout below a path a higher
 *   layer turned into a symlink or file simply matches nothing;
 * - a directory over a directory merges; anything else replaces;
 * - a merged directory takes its attributes from the topmost layer with an
 *   explicit entry for it; a parent no index names is 0755 root:root, time 0.
 */
import type { EntryKind, LayerEntry, LayerSource } from '../storage/layerIndex.js';
import { LowerInoAllocator, ROOT_INO } from './inodes.js';
import { baseName, joinPath, normalizeIndexPath, parentOf } from './paths.js';
import type { MarkerStyle, ScannedDirectory } from './lowerDir.js';
import type { XattrMap } from './lowerDir.js';

export interface LowerObject {
  /** Metadata; for a hard link, its target's. */
  readonly entry: LayerEntry;
  /** Where the bytes are; undefined for an invented directory. */
  readonly source: LayerSource | undefined;
  readonly ino: number;
  /** Merged paths currently naming this object (non-directories only). */
  readonly names: Set<string>;
}

export class UnionNode {
  /** Lower content shown here (non-dir), or the lower directory merged here. */
  lower: LowerObject | undefined;
  /** The path exists in the upper dir (content and attributes come from there). */
  upper = false;
  /** st_ino of the upper file, once `upper`. */
  upperStIno = 0;
  /** Upper directory that hides everything below it in the lower layers. */
  opaque = false;
  /** Child names (directories only). */
  readonly children: Set<string> | undefined;
  /** How many of the children are directories (a directory's nlink is 2 + this), kept as children change. */
  subdirs = 0;
  /** Cached xattrs of the upper file; undefined = read from disk when asked. */
  upperXattrs: XattrMap | undefined;

  constructor(readonly kind: EntryKind, lower: LowerObject | undefined, children?: Iterable<string>) {
    this.lower = lower;
    this.children = kind === 'dir' ? new Set(children) : undefined;
  }
}

export function inventedDirEntry(path: string): LayerEntry {
  return { path, kind: 'dir', mode: 0o755, uid: 0, gid: 0, mtime: 0, size: 0 };
}

export class MergedTree {
  /**
   * Nodes by path. Over a base: only the paths read or changed through this
   * tree, and `null` for a path removed here that the base still holds.
   */
  private readonly nodes = new Map<string, UnionNode | null>();
  /** A merge shared with other trees (never changed), that this one changes on top of. */
  private readonly base: MergedTree | undefined;
  /** The base's lower objects → this tree's copies (one per hard-link group, as in the base). */
  private readonly objects = new Map<LowerObject, LowerObject>();
  /** Set once another tree is built over this one: from then on it must not change. */
  private frozen = false;
  /** Index entries skipped because they made no sense (hard link to nothing, ...). */
  skipped = 0;

  /**
   * A new tree: empty (just the root), or one that shows `base` and keeps its
   * own changes apart. `base` is frozen by this: mounts of the same layers all
   * build on one merge, and each copies only the nodes it touches (reading a
   * node copies it too, since callers change the nodes they get).
   */
  constructor(base?: MergedTree) {
    if (base !== undefined) {
      if (base.base !== undefined) throw new Error('a merged tree can only be built over a tree without a base');
      base.frozen = true;
      this.base = base;
      this.skipped = base.skipped;
    } else {
      this.nodes.set('', new UnionNode('dir', { entry: inventedDirEntry(''), source: undefined, ino: ROOT_INO, names: new Set() }));
    }
  }

  get(path: string): UnionNode | undefined {
    const own = this.nodes.get(path);
    if (own !== undefined) return own ?? undefined;
    const shared = this.base?.nodes.get(path);
    if (shared == null) return undefined;
    const copy = new UnionNode(shared.kind, this.ownObject(shared.lower), shared.children);
    copy.upper = shared.upper;
    copy.upperStIno = shared.upperStIno;
    copy.opaque = shared.opaque;
    copy.upperXattrs = shared.upperXattrs;
    copy.subdirs = shared.subdirs;
    this.nodes.set(path, copy);
    return copy;
  }

  /** What the base (the lower layers' merge) holds at `path`, whatever this tree changed since. */
  baseKind(path: string): EntryKind | undefined {
    return this.base?.nodes.get(path)?.kind;
  }

  /** This tree's copy of a lower object of the base (names of one hard-link group keep sharing one). */
  private ownObject(object: LowerObject | undefined): LowerObject | undefined {
    if (object === undefined) return undefined;
    let copy = this.objects.get(object);
    if (copy === undefined) {
      copy = { entry: object.entry, source: object.source, ino: object.ino, names: new Set(object.names) };
      this.objects.set(object, copy);
    }
    return copy;
  }

  private set(path: string, node: UnionNode): void {
    if (this.frozen) throw new Error(`a merge shared by mounts must not change (at '${path}')`);
    this.nodes.set(path, node);
  }

  private forget(path: string): void {
    if (this.frozen) throw new Error(`a merge shared by mounts must not change (at '${path}')`);
    if (this.base?.nodes.has(path)) this.nodes.set(path, null);
    else this.nodes.delete(path);
  }

  /** Add `node` at `path`; the parent must be a directory node. */
  insert(path: string, node: UnionNode): void {
    this.set(path, node);
    this.addChild(path, node);
    if (node.lower !== undefined && node.kind !== 'dir') node.lower.names.add(path);
  }

  /** Remove `path` and everything below it. */
  removeSubtree(path: string): void {
    const node = this.get(path);
    if (node === undefined || path === '') return;
    this.dropDescendants(path, node);
    this.forget(path);
    if (node.lower !== undefined && node.kind !== 'dir') node.lower.names.delete(path);
    this.removeChild(path, node);
  }

  private addChild(path: string, node: UnionNode): void {
    const parent = this.get(parentOf(path))!;
    const name = baseName(path);
    if (parent.children!.has(name)) return;
    parent.children!.add(name);
    if (node.kind === 'dir') parent.subdirs++;
  }

  private removeChild(path: string, node: UnionNode): void {
    const parent = this.get(parentOf(path));
    if (parent?.children?.delete(baseName(path)) === true && node.kind === 'dir') parent.subdirs--;
  }

  /** Remove everything below directory `path` (an opaque marker's effect). */
  clearChildren(path: string): void {
    const node = this.get(path);
    if (node?.children === undefined) return;
    for (const name of [...node.children]) this.removeSubtree(joinPath(path, name));
  }

  private dropDescendants(path: string, node: UnionNode): void {
    if (node.children === undefined) return;
    for (const name of node.children) {
      const childPath = joinPath(path, name);
      const child = this.get(childPath)!;
      this.dropDescendants(childPath, child);
      this.forget(childPath);
      if (child.lower !== undefined && child.kind !== 'dir') child.lower.names.delete(childPath);
    }
    node.children.clear();
    node.subdirs = 0;
  }

  /** Re-key the subtree at `src` to `dst` (the parent of dst must exist, dst must not). */
  move(src: string, dst: string): void {
    const node = this.get(src)!;
    const moved: Array<[string, UnionNode]> = [];
    const collect = (p: string, n: UnionNode): void => {
      moved.push([p, n]);
      if (n.children) for (const name of n.children) collect(joinPath(p, name), this.get(joinPath(p, name))!);
    };
    collect(src, node);
    this.removeChild(src, node);
    for (const [p, n] of moved) {
      this.forget(p);
      if (n.lower !== undefined && n.kind !== 'dir') n.lower.names.delete(p);
    }
    for (const [p, n] of moved) {
      const q = dst + p.slice(src.length);
      this.set(q, n);
      if (n.lower !== undefined && n.kind !== 'dir') n.lower.names.add(q);
    }
    this.addChild(dst, node);
  }

  /** Make every ancestor of `path` a directory, inventing missing ones. */
  ensureParents(path: string, invent: (dirPath: string) => UnionNode): void {
    const parent = parentOf(path);
    if (parent === '' ) return;
    const existing = this.get(parent);
    if (existing?.kind === 'dir') return;
    this.ensureParents(parent, invent);
    if (existing !== undefined) this.removeSubtree(parent);
    this.insert(parent, invent(parent));
  }

  /** Merge one lower layer on top of what is there. */
  addLayer(source: LayerSource, inos: LowerInoAllocator): void {
    const { index } = source;
    for (const opaque of index.opaques) this.clearChildren(normalizeIndexPath(opaque));
    for (const whiteout of index.whiteouts) this.removeSubtree(normalizeIndexPath(whiteout));

    const invent = (dirPath: string): UnionNode =>
      new UnionNode('dir', { entry: inventedDirEntry(dirPath), source: undefined, ino: inos.take(), names: new Set() });

    for (const entry of index.entries) {
      const ino = inos.take();
      const path = normalizeIndexPath(entry.path);
      if (path === '') {
        if (entry.kind === 'dir') this.get('')!.lower = { entry, source, ino: ROOT_INO, names: new Set() };
        else this.skipped++;
        continue;
      }
      this.ensureParents(path, invent);
      const existing = this.get(path);

      if (entry.link !== undefined) {
        const target = this.get(normalizeIndexPath(entry.link));
        if (target === undefined || target.kind === 'dir' || target.lower === undefined || target === existing) {
          this.skipped++;
          continue;
        }
        if (existing !== undefined) this.removeSubtree(path);
        this.insert(path, new UnionNode(target.kind, target.lower));
        continue;
      }

      const object: LowerObject = { entry, source, ino, names: new Set() };
      if (entry.kind === 'dir' && existing?.kind === 'dir') {
        existing.lower = object; // explicit entry: its attributes win, children merge
        continue;
      }
      if (existing !== undefined) this.removeSubtree(path);
      this.insert(path, new UnionNode(entry.kind, object));
    }
  }

  /**
   * Put the upper dir on top, as the last layer: its entries become upper
   * nodes (a directory over a lower directory still merges with it), its
   * opaque directories are marked. Returns the whiteouts it holds.
   */
  addUpper(scanned: ScannedDirectory): Map<string, MarkerStyle> {
    const whiteouts = new Map<string, MarkerStyle>();
    for (const path of scanned.index.opaques) this.clearChildren(path);
    for (const path of scanned.index.whiteouts) {
      this.removeSubtree(path);
      whiteouts.set(path, scanned.whiteoutStyles.get(path) ?? 'oci');
    }
    for (const entry of scanned.index.entries) {
      const path = entry.path;
      let node = this.get(path);
      if (node === undefined || node.kind !== 'dir' || entry.kind !== 'dir') {
        this.ensureParents(path, () => new UnionNode('dir', undefined)); // never needed: the walk lists parents first
        if (node !== undefined) this.removeSubtree(path);
        node = new UnionNode(entry.kind, undefined);
        this.insert(path, node);
      }
      node.upper = true;
      node.upperStIno = scanned.inodes.get(path) ?? 0;
      node.upperXattrs = scanned.xattrs.get(path);
      if (entry.kind !== 'dir') node.lower = undefined;
    }
    for (const path of scanned.index.opaques) {
      const node = this.get(path);
      if (node !== undefined) node.opaque = true;
    }
    return whiteouts;
  }

  /** Every path of a tree without a base (the benchmarks walk a merge with it). */
  paths(): IterableIterator<string> {
    if (this.base !== undefined) throw new Error('paths() needs a tree without a base');
    return this.nodes.keys();
  }
}
