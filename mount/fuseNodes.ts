/**
 * The kernel's view of the union: which node id stands for which file.
 *
 * The kernel names files by node id and remembers how many times each id
 * was handed to it (lookups); it gives them back with FORGET. One node per
 * file, not per name: all names of a hard-link group (same union inode
 * number) share a node, so the kernel keeps one inode, one attribute cache
 * and one page cache for them, and a change through one name is seen
 * through all. That is what lets layerd cache attributes for long.
 *
 * A node knows its names as (parent node, name) pairs, so a directory
 * rename moves every path below it at once; its path is found by walking up.
 * Node ids are never reused.
 *
 * Matching names by inode number needs numbers that stay with their file: a
 * live layer renumbers its entries on every rescan, so such mounts turn the
 * matching off (and keep short caches instead).
 */
import { FUSE_ROOT_ID } from './fuseProtocol.js';
import { S_IFMT, TYPE_BITS, type UnionStat } from './nodeStats.js';
import { joinPath } from './paths.js';

const S_IFDIR = TYPE_BITS.dir;

export interface NodeName { parent: number; name: string }

export class FuseNode {
  lookups = 0;
  names: NodeName[] = [];
  /** Handles open on this node (the kernel opened it through some name). */
  openHandles = 0;
  /** Of those, the ones served here (page-cached, not passed through). */
  cachedOpens = 0;
  /**
   * The backing file registered for its passthrough opens, while any last;
   * `lower`: a lower file's read-only object (never for opens of its upper copy).
   */
  backing: { id: number; opens: number; lower: boolean } | undefined;
  /** Its bytes were handed to the kernel's page cache at an open (kernelFuse.ts, `prefill`): not again. */
  prefilled = false;

  constructor(readonly id: number, public ino: number, public type: number) {}
}

function keyOf(parent: number, name: string): string {
  return `${parent}/${name}`; // names never contain '/'
}

export class NodeTable {
  private readonly nodes = new Map<number, FuseNode>();
  private readonly byName = new Map<string, number>();
  private readonly byIno = new Map<number, number>();
  private nextId = FUSE_ROOT_ID + 1;

  constructor(private readonly aliasByIno = true) {
    const root = new FuseNode(FUSE_ROOT_ID, 1, S_IFDIR);
    root.lookups = 1; // the kernel never forgets the root
    this.nodes.set(FUSE_ROOT_ID, root);
  }

  get size(): number {
    return this.nodes.size;
  }

  get(id: number): FuseNode | undefined {
    return this.nodes.get(id);
  }

  /** The union path of a node ("" for the root), or undefined once it has no name left. */
  pathOf(id: number): string | undefined {
    if (id === FUSE_ROOT_ID) return '';
    const name = this.nodes.get(id)?.names[0];
    if (name === undefined) return undefined;
    return this.childPath(name.parent, name.name);
  }

  childPath(parent: number, name: string): string | undefined {
    const parentPath = this.pathOf(parent);
    return parentPath === undefined ? undefined : joinPath(parentPath, name);
  }

  /**
   * The kernel is about to be told that `name` under `parent` is the file
   * `st`: the node for it, with its lookup count raised by one.
   */
  remember(parent: number, name: string, st: UnionStat): FuseNode {
    const key = keyOf(parent, name);
    const type = st.mode & S_IFMT;
    let node = this.nodes.get(this.byName.get(key) ?? 0);
    if (node !== undefined && node.type !== type) {
      // Replaced by something of another kind behind the kernel (a live layer): a new node.
      this.dropName(node, parent, name);
      node = undefined;
    }
    if (node === undefined && type !== S_IFDIR && this.aliasByIno) {
      // Another name of a hard-link group the kernel already knows.
      const alias = this.nodes.get(this.byIno.get(st.ino) ?? 0);
      if (alias !== undefined && alias.type === type) node = alias;
    }
    if (node === undefined) {
      node = new FuseNode(this.nextId++, st.ino, type);
      this.nodes.set(node.id, node);
    }
    if (!node.names.some((n) => n.parent === parent && n.name === name)) node.names.push({ parent, name });
    this.byName.set(key, node.id);
    this.noteIno(node, st.ino);
    node.lookups++;
    return node;
  }

  /** A reply carries fresh attributes of `node`: follow its inode number (copy-up changes it). */
  noteIno(node: FuseNode, ino: number): void {
    if (node.ino !== ino && this.byIno.get(node.ino) === node.id) this.byIno.delete(node.ino);
    node.ino = ino;
    if (node.type !== S_IFDIR && node.names.length > 0 && this.aliasByIno) this.byIno.set(ino, node.id);
  }

  forget(id: number, count: number): void {
    const node = this.nodes.get(id);
    if (node === undefined || id === FUSE_ROOT_ID) return;
    node.lookups -= count;
    if (node.lookups > 0) return;
    for (const { parent, name } of node.names) {
      const key = keyOf(parent, name);
      if (this.byName.get(key) === id) this.byName.delete(key);
    }
    if (this.byIno.get(node.ino) === id) this.byIno.delete(node.ino);
    this.nodes.delete(id);
  }

  /** The node the kernel knows under `name` in `parent`, if any. */
  find(parent: number, name: string): FuseNode | undefined {
    return this.nodes.get(this.byName.get(keyOf(parent, name)) ?? 0);
  }

  /** `name` under `parent` is gone (unlink, rmdir, or replaced by a rename). */
  removeName(parent: number, name: string): FuseNode | undefined {
    const node = this.find(parent, name);
    if (node !== undefined) this.dropName(node, parent, name);
    return node;
  }

  private dropName(node: FuseNode, parent: number, name: string): void {
    const key = keyOf(parent, name);
    if (this.byName.get(key) === node.id) this.byName.delete(key);
    node.names = node.names.filter((n) => n.parent !== parent || n.name !== name);
    // Nothing reachable may find a nameless node by its number: the upper fs may reuse it.
    if (node.names.length === 0 && this.byIno.get(node.ino) === node.id) this.byIno.delete(node.ino);
  }

  /** After a rename: the node at (fromParent, fromName) is now at (toParent, toName). */
  move(fromParent: number, fromName: string, toParent: number, toName: string): void {
    this.removeName(toParent, toName);
    const node = this.find(fromParent, fromName);
    if (node === undefined) return;
    this.byName.delete(keyOf(fromParent, fromName));
    node.names = node.names.map((n) => (n.parent === fromParent && n.name === fromName ? { parent: toParent, name: toName } : n));
    this.byName.set(keyOf(toParent, toName), node.id);
  }
}
