/**
 * The per-layer index: everything the union filesystem and the debugging
 * tools need to know about one layer, built once (at import, or once per
 * mount for a plain directory) and never by walking the layer again.
 *
 * Vocabulary:
 * - path: a layer-relative path with no leading `/` or `./`, no trailing `/`,
 *   components joined by `/`; the layer's root directory is the empty path "".
 * - entry: one object the layer provides at a path (file, dir, symlink, device,
 *   fifo). A hard link is an entry whose `link` names another entry's path.
 * - whiteout: a path the layer deletes from the layers below (`.wh.<name>`).
 * - opaque: a directory whose lower contents the layer hides (`.wh..wh..opq`).
 *
 * Metadata (mode, owner, times, xattrs, device numbers, link targets) lives
 * only here; the bytes of regular files stay where they are in the layer's
 * uncompressed tar, found by `offset`. So nothing a tar archive names is
 * ever created on disk, and no device node or setuid binary lies in the
 * store.
 */
import { constants as fsConstants, openSync } from 'node:fs';
import { dirname, join } from 'node:path';

/**
 * 'socket' exists only in directories (a container's writable layer): an
 * OCI layer tar cannot hold one, so commit and export leave sockets out, as
 * Docker and GNU tar do.
 */
export type EntryKind = 'file' | 'dir' | 'symlink' | 'char' | 'block' | 'fifo' | 'socket';

export interface LayerEntry {
  path: string;
  kind: EntryKind;
  /** Permission bits including setuid/setgid/sticky (mode & 0o7777). */
  mode: number;
  uid: number;
  gid: number;
  /** Modification time, whole seconds since the epoch (may be negative). */
  mtime: number;
  /** Nanoseconds of the modification time (0–999,999,999); absent means 0. */
  mtimeNsec?: number;
  /** Size in bytes of a regular file's content; 0 for everything else. */
  size: number;
  /** Symlink target, verbatim as the archive gave it. */
  target?: string;
  /**
   * For a hard link: the path of the entry it links to. Within one layer the
   * target is an earlier entry of the same layer (resolved at import); a
   * target not in this layer refers to the merged view of the layers below.
   */
  link?: string;
  /** Device numbers of char/block devices. */
  devMajor?: number;
  devMinor?: number;
  /** Extended attributes, name → value bytes encoded base64 (exact bytes). */
  xattrs?: Record<string, string>;
  /**
   * Where a regular file's bytes start in the layer's uncompressed tar
   * (`layer.tar`); absent for empty files. Hard links share their target's.
   */
  offset?: number;
  /**
   * sha256 of a regular file's bytes (`sha256:<hex>`), computed at import
   * from the verified layer for files of PASSTHROUGH_MIN_LOWER_SIZE or more;
   * absent for smaller files and in indexes written before it was recorded. Names the file's content-addressed object
   * (storage/objectStore.ts). Hard links share their target's.
   */
  digest?: string;
}

export interface LayerIndex {
  /** Format version of this structure; bumped on incompatible changes. */
  version: 1;
  /** The layer's diffID (`sha256:<hex>`), or a label for a plain directory. */
  id: string;
  entries: LayerEntry[];
  /** Paths this layer deletes from the layers below. */
  whiteouts: string[];
  /** Directories whose lower contents this layer hides. */
  opaques: string[];
  /**
   * 'skeleton': the store keeps the layer as a tar skeleton + objects
   * (storage/tarSkeleton.ts), not as `layer.tar`: a file's bytes are the
   * object its `digest` names, or, for a small file with no digest, `size`
   * bytes of the layer's `inline` file from `offset`. Absent: `layer.tar`,
   * `offset` into it.
   */
  storage?: 'skeleton';
}

export const LAYER_INDEX_VERSION = 1 as const;

/**
 * Lower files smaller than this are served here and page-cached, not passed
 * through: one READ fills the kernel's cache for every later open, where a
 * passthrough open costs two backing ioctls, the object's open and, on a
 * writable mount, a GETATTR after each read (the kernel drops the cached
 * atime), and reading thousands of small objects cold is scattered I/O
 * where the layer's tar is one sequential file (docs/performance.md). Only
 * such files get a digest at import (hashing the others cost import time).
 */
export const PASSTHROUGH_MIN_LOWER_SIZE = 256 * 1024;

/** The uncompressed tar a store layer keeps beside its index. */
export const LAYER_TAR = 'layer.tar';

/** Extended-attribute helpers: the index stores exact bytes as base64. */
export function xattrsFromBuffers(map: ReadonlyMap<string, Buffer>): Record<string, string> | undefined {
  if (map.size === 0) return undefined;
  const out: Record<string, string> = {};
  for (const [name, value] of [...map.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    out[name] = value.toString('base64');
  }
  return out;
}

export function xattrBytes(entry: LayerEntry, name: string): Buffer | undefined {
  const value = entry.xattrs?.[name];
  return value === undefined ? undefined : Buffer.from(value, 'base64');
}

/** Where a regular file's bytes are: `size` bytes of `path` from `offset`. */
export interface ContentRef {
  path: string;
  offset: number;
  size: number;
  /**
   * Open the bytes for reading, when `path` must not be opened by name (a
   * file of a directory a user owns: opened beneath the directory's root
   * without following any symlink, and checked to be the file the scan
   * saw). Returns a descriptor the caller closes.
   */
  open?: () => number;
  /**
   * Make bytes [offset, offset + length) of the file present and verified
   * before they are read (a lazily pulled layer fetches them); rejects with
   * EIO when they cannot be had within its bound. Absent: always present.
   */
  ready?: (offset: number, length: number) => Promise<void>;
  /**
   * A read-only descriptor of a whole file holding exactly these bytes (the
   * file's content-addressed object: storage/objectStore.ts), for FUSE
   * passthrough; the caller closes it. Undefined when there is none yet:
   * then one may be made in the background for a later open.
   */
  whole?: () => number | undefined;
}

/** A descriptor of a file's bytes (the caller closes it): through `open` where the reference has one. */
export function openContent(content: ContentRef): number {
  return content.open !== undefined ? content.open() : openSync(content.path, fsConstants.O_RDONLY);
}

/**
 * A layer as the union filesystem consumes it: its index plus where the
 * bytes of its regular files are. For a store layer they are ranges of the
 * layer's `layer.tar`; for a plain directory, the files themselves.
 */
export interface LayerSource {
  readonly index: LayerIndex;
  /** The bytes of a regular file, or undefined for an empty one. */
  content(entry: LayerEntry): ContentRef | undefined;
}

/**
 * A store layer (index + its uncompressed tar, `<root>/layers/sha256/<hex>/layer.tar`)
 * as a LayerSource. A layer kept as a skeleton (`index.storage`) has no tar:
 * its files are read from their objects (`<root>/objects/sha256/<xx>/<hex>`,
 * storage/objectStore.ts) or its `inline` file, found from the same path.
 */
export function tarLayerSource(index: LayerIndex, tarPath: string): LayerSource {
  if (index.storage === 'skeleton') {
    const layerDir = dirname(tarPath);
    const root = dirname(dirname(dirname(layerDir)));
    return { index, content: (entry) => skeletonContent(entry, layerDir, root) };
  }
  return {
    index,
    content: (entry) => (entry.kind !== 'file' || entry.size === 0 || entry.offset === undefined
      ? undefined
      : { path: tarPath, offset: entry.offset, size: entry.size }),
  };
}

/** The layer's `inline` file: small files' bytes of a skeleton layer (storage/tarSkeleton.ts INLINE_FILE). */
const SKELETON_INLINE_FILE = 'inline';

/** Where a skeleton layer's file's bytes are: its object, or a range of the layer's `inline` file. */
export function skeletonContent(entry: LayerEntry, layerDir: string, root: string): ContentRef | undefined {
  if (entry.kind !== 'file' || entry.size === 0) return undefined;
  const digest = entry.digest;
  if (digest === undefined) return entry.offset === undefined ? undefined : { path: join(layerDir, SKELETON_INLINE_FILE), offset: entry.offset, size: entry.size };
  if (!/^sha256:[0-9a-f]{64}$/.test(digest)) return undefined;
  const hex = digest.slice('sha256:'.length);
  const path = join(root, 'objects', 'sha256', hex.slice(0, 2), hex);
  // Opened per open file (`open`), not kept like a layer's one tar (or `inline`) for the mount's life: a layer has thousands of objects.
  return { path, offset: 0, size: entry.size, open: () => openSync(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW) };
}
