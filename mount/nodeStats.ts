/**
 * What getattr and readdir report for a union node: attributes from the
 * lower index (no I/O) or from an lstat of the upper file, and the inode
 * numbers of inodes.ts.
 */
import type { Stats } from 'node:fs';
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
  /** Milliseconds since the epoch. */
  atime: number;
  mtime: number;
  ctime: number;
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

/** Attributes of content still in a lower layer. Directories report nlink 1 ("not counted"). */
export function lowerStat(path: string, node: UnionNode): UnionStat {
  const object = node.lower!;
  const { entry } = object;
  const size = node.kind === 'file' ? entry.size : node.kind === 'symlink' ? Buffer.byteLength(entry.target ?? '') : 0;
  const ms = entry.mtime * 1000;
  return {
    ino: inoOf(path, node),
    mode: TYPE_BITS[node.kind] | (entry.mode & 0o7777),
    nlink: node.kind === 'dir' ? 1 : Math.max(1, object.names.size),
    uid: entry.uid, gid: entry.gid, size,
    rdev: node.kind === 'char' || node.kind === 'block' ? makeDev(entry.devMajor ?? 0, entry.devMinor ?? 0) : 0,
    blksize: 4096, blocks: Math.ceil(size / 512),
    atime: ms, mtime: ms, ctime: ms,
  };
}

/** Attributes of upper content, from its lstat. */
export function upperStat(path: string, node: UnionNode, st: Stats): UnionStat {
  return {
    ino: node.kind === 'dir' || path === '' ? inoOf(path, node) : upperIno(st.ino),
    mode: st.mode, nlink: node.kind === 'dir' ? 1 : st.nlink, uid: st.uid, gid: st.gid,
    size: st.size, rdev: st.rdev, blksize: st.blksize, blocks: st.blocks,
    atime: st.atimeMs, mtime: st.mtimeMs, ctime: st.ctimeMs,
  };
}
