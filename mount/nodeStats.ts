/**
 * What getattr and readdir report for a union node: attributes from the
 * lower index (no I/O) or from a stat of the upper object, and the inode
 * numbers of inodes.ts. Times are seconds + nanoseconds, as the kernel
 * keeps them.
 */
import type { Stat, Timespec } from '../common/sys/fs.js';
import type { EntryKind } from '../storage/layerIndex.js';
import { ROOT_INO, upperIno } from './inodes.js';
import { makeDev } from './lowerDir.js';
import type { UnionNode } from './mergedTree.js';

export interface UnionStat {
  ino: number;
  /** Full st_mode: type bits | permission bits. */
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  size: number;
  rdev: number;
  blksize: number;
  blocks: number;
  atime: Timespec;
  mtime: Timespec;
  ctime: Timespec;
}

export const S_IFMT = 0o170000;
export const TYPE_BITS: Readonly<Record<EntryKind, number>> = {
  file: 0o100000, dir: 0o040000, symlink: 0o120000, char: 0o020000, block: 0o060000, fifo: 0o010000, socket: 0o140000,
};
export const KIND_OF_TYPE: ReadonlyMap<number, EntryKind> =
  new Map(Object.entries(TYPE_BITS).map(([kind, bits]) => [bits, kind as EntryKind]));

/**
 * The inode number of a node, without I/O. A directory that merges a lower
 * one keeps the lower number after copy-up; other upper content reports the
 * upper file's number.
 */
export function inoOf(path: string, node: UnionNode): number {
  if (path === '') return ROOT_INO;
  if (node.lower !== undefined && (!node.upper || node.kind === 'dir')) return node.lower.ino;
  return upperIno(node.upperStIno);
}

/**
 * Attributes of content still in a lower layer. `subdirs` is the number of
 * directories in a directory (its nlink is 2 + that, as on any Linux fs).
 */
export function lowerStat(path: string, node: UnionNode, subdirs: number, named = true): UnionStat {
  const object = node.lower!;
  const { entry } = object;
  const size = node.kind === 'file' ? entry.size : node.kind === 'symlink' ? Buffer.byteLength(entry.target ?? '') : 0;
  const time = { sec: entry.mtime, nsec: entry.mtimeNsec ?? 0 };
  return {
    ino: inoOf(path, node),
    mode: TYPE_BITS[node.kind] | (entry.mode & 0o7777),
    // An open file whose names are all gone (`named` false) has nlink 0, as fstat shows on a local fs.
    nlink: node.kind === 'dir' ? 2 + subdirs : named ? Math.max(1, object.names.size) : object.names.size,
    uid: entry.uid, gid: entry.gid, size,
    rdev: node.kind === 'char' || node.kind === 'block' ? makeDev(entry.devMajor ?? 0, entry.devMinor ?? 0) : 0,
    blksize: 4096, blocks: Math.ceil(size / 512),
    atime: time, mtime: time, ctime: time,
  };
}

/** Attributes of upper content, from its stat (a directory's nlink counts the union's subdirectories). */
export function upperStat(path: string, node: UnionNode, st: Stat, subdirs: number): UnionStat {
  return {
    ino: node.kind === 'dir' || path === '' ? inoOf(path, node) : upperIno(st.ino),
    mode: st.mode, nlink: node.kind === 'dir' ? 2 + subdirs : st.nlink, uid: st.uid, gid: st.gid,
    size: st.size, rdev: st.rdev, blksize: st.blksize, blocks: st.blocks,
    atime: st.atime, mtime: st.mtime, ctime: st.ctime,
  };
}
