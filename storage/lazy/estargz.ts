/**
 * eStargz (containerd/stargz-snapshotter's docs/estargz.md): a gzip layer
 * made of many gzip members — one starting at the payload of every non-empty
 * regular file and at every chunk of a big one — whose last tar entry is a
 * JSON table of contents, `stargz.index.json`, followed by a 51-byte footer
 * (an empty gzip member whose Extra field holds the TOC's offset). The layer
 * descriptor carries the TOC's digest as an annotation; every chunk in the
 * TOC carries its own digest. So a layer can be mounted from its footer and
 * TOC alone, and every chunk fetched later is verified on its own.
 *
 * This module only parses: the footer, the TOC member, and the TOC into the
 * layer index (through the same indexer as a full pull, so whiteouts, hard
 * links and limits mean the same) plus the chunk table a lazy layer serves
 * its files from.
 */
import { gunzip } from 'node:zlib';
import { promisify } from 'node:util';
import { type Headers } from 'tar-stream';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, digestOf, isDigest } from '../digest.js';
import { type LayerIndex, PASSTHROUGH_MIN_LOWER_SIZE } from '../layerIndex.js';
import { LayerUnpacker } from '../layerUnpack.js';

const gunzipAsync = promisify(gunzip);

export const ESTARGZ_FOOTER_SIZE = 51;
export const TOC_DIGEST_ANNOTATION = 'containerd.io/snapshot/stargz/toc.digest';
export const TOC_NAME = 'stargz.index.json';
/** A TOC larger than this is refused (a real one of 100k files is ~30 MiB). */
export const MAX_TOC_BYTES = 256 * 1024 * 1024;

export interface TocEntry {
  name: string;
  type: string;
  size?: number;
  modtime?: string;
  linkName?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  devMajor?: number;
  devMinor?: number;
  /** Extended attributes, values base64 (Go's []byte in JSON). */
  xattrs?: Record<string, string>;
  digest?: string;
  offset?: number;
  chunkOffset?: number;
  chunkSize?: number;
  chunkDigest?: string;
}

export interface Toc {
  version: number;
  entries: TocEntry[];
}

/**
 * One chunk of a file: `length` bytes at `fileOffset` of the file, which are
 * the first bytes the gzip member at [`start`, `end`) of the blob inflates
 * to, and hash to `digest`.
 */
export interface Chunk {
  fileOffset: number;
  length: number;
  start: number;
  end: number;
  digest: Digest;
  /**
   * A span of an unmodified gzip layer (gzipIndex.ts) instead of a gzip
   * member: [start, end) is inflated from this checkpoint (the split byte's
   * bits, the window), not from a gzip header.
   */
  checkpoint?: { bits: number; window: string };
}

/** A regular file's content in the lazy layer's content file, at `offset` (the index entry's `offset`). */
export interface LazyFile {
  offset: number;
  size: number;
  chunks: Chunk[];
}

/** The offset of the TOC's gzip member, from the last 51 bytes of the blob. */
export function parseFooter(footer: Buffer, what: string): number {
  const bad = (why: string): LayerdError => new LayerdError(ErrorCodes.EFORMAT, `${what}: not an eStargz footer (${why})`);
  if (footer.length !== ESTARGZ_FOOTER_SIZE) throw bad(`${footer.length} bytes`);
  if (footer[0] !== 0x1f || footer[1] !== 0x8b || footer[2] !== 8) throw bad('no gzip header');
  if ((footer[3]! & 0x04) === 0) throw bad('no Extra field');
  if (footer.readUInt16LE(10) !== 26 || footer[12] !== 0x53 || footer[13] !== 0x47 || footer.readUInt16LE(14) !== 22) throw bad('no SG subfield');
  const field = footer.subarray(16, 38).toString('latin1');
  const m = /^([0-9a-f]{16})STARGZ$/.exec(field);
  if (!m) throw bad('malformed subfield');
  const offset = Number.parseInt(m[1]!, 16);
  if (!Number.isSafeInteger(offset)) throw bad('offset out of range');
  return offset;
}

/** The tar entry inside the TOC member: the JSON and the header it came with. */
export interface TocMember {
  json: Buffer;
  digest: Digest;
  header: { mode: number; uid: number; gid: number; mtime: number };
}

/** Inflate the TOC's gzip member and take `stargz.index.json` out of its tar entry. */
export async function readTocMember(member: Buffer, what: string): Promise<TocMember> {
  let tar: Buffer;
  try {
    tar = await gunzipAsync(member, { maxOutputLength: MAX_TOC_BYTES + 64 * 1024 });
  } catch (err) {
    throw new LayerdError(ErrorCodes.EFORMAT, `${what}: the TOC does not inflate: ${(err as Error).message}`, {}, { cause: err });
  }
  let at = 0;
  for (let guard = 0; guard < 4; guard++) {
    if (tar.length < at + 512) break;
    const h = tar.subarray(at, at + 512);
    const size = octal(h.subarray(124, 136));
    const type = String.fromCharCode(h[156]!);
    const name = cString(h.subarray(0, 100));
    const body = at + 512;
    if (type === 'x' || type === 'g' || type === 'L') { // PAX or long-name headers before the entry
      at = body + Math.ceil(size / 512) * 512;
      continue;
    }
    if (name.replace(/^\.\//, '') !== TOC_NAME || body + size > tar.length) break;
    const json = tar.subarray(body, body + size);
    return {
      json, digest: digestOf(json),
      header: { mode: octal(h.subarray(100, 108)), uid: octal(h.subarray(108, 116)), gid: octal(h.subarray(116, 124)), mtime: octal(h.subarray(136, 148)) },
    };
  }
  throw new LayerdError(ErrorCodes.EFORMAT, `${what}: the last member holds no ${TOC_NAME}`);
}

export function parseToc(json: Buffer, what: string): Toc {
  let doc: unknown;
  try {
    doc = JSON.parse(json.toString('utf8'));
  } catch (err) {
    throw new LayerdError(ErrorCodes.EBADJSON, `${what}: the TOC is not JSON: ${(err as Error).message}`, {}, { cause: err });
  }
  const toc = doc as Partial<Toc>;
  if (toc.version !== 1 || !Array.isArray(toc.entries)) throw new LayerdError(ErrorCodes.EBADJSON, `${what}: not a version-1 eStargz TOC`);
  for (const e of toc.entries) {
    if (typeof e?.name !== 'string' || typeof e.type !== 'string') throw new LayerdError(ErrorCodes.EBADJSON, `${what}: a TOC entry has no name or type`);
  }
  return toc as Toc;
}

export interface LazyLayerPlan {
  /** The layer index (its `id` the diffID); file offsets point into the content file. */
  index: LayerIndex;
  fileBytes: number;
  /** Regular files with content, by their offset in the content file. */
  files: LazyFile[];
  /** Where the TOC's own entry lies in the content file (its bytes are known at once). */
  tocFile: LazyFile;
  contentSize: number;
}

/**
 * The layer index and chunk table of an eStargz layer. Files are laid out in
 * the content file one after the other in TOC order (a hard link shares its
 * target's bytes); `stargz.index.json` itself is the last file, as it is the
 * last entry of the tar a full pull indexes.
 */
export function planLazyLayer(toc: Toc, tocMember: TocMember, tocOffset: number, diffId: Digest, what: string): LazyLayerPlan {
  const bad = (message: string, name?: string): LayerdError => new LayerdError(ErrorCodes.EFORMAT, `${what}: ${message}`, name ? { path: name } : {});
  // Where each gzip member ends: at the next member's start (a payload or chunk), or at the TOC's.
  const starts = [...new Set(toc.entries.flatMap((e) => (typeof e.offset === 'number' && (e.type === 'reg' || e.type === 'chunk') && (e.size ?? 1) !== 0 ? [e.offset] : [])))].sort((a, b) => a - b);
  const endOf = (start: number): number => {
    let lo = 0;
    let hi = starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (starts[mid]! <= start) lo = mid + 1; else hi = mid;
    }
    return lo < starts.length ? starts[lo]! : tocOffset;
  };
  const indexer = new LayerUnpacker();
  const files: LazyFile[] = [];
  /** The TOC's digest of each regular file, by its offset in the content file. */
  const fileDigests = new Map<number, Digest>();
  let current: LazyFile | undefined;
  let currentName = '';
  let contentSize = 0;
  const closeFile = (): void => {
    if (!current) return;
    const covered = current.chunks.reduce((n, c) => n + c.length, 0);
    if (covered !== current.size) throw bad(`the chunks of ${currentName} cover ${covered} of its ${current.size} bytes`, currentName);
    current = undefined;
  };
  const addChunk = (e: TocEntry, size: number): void => {
    const fileOffset = e.type === 'chunk' ? e.chunkOffset ?? -1 : 0;
    if (typeof e.offset !== 'number' || e.offset < 0 || e.offset >= tocOffset) throw bad(`${e.name}: chunk offset outside the blob`, e.name);
    if (!isDigest(e.chunkDigest)) throw bad(`${e.name}: a chunk has no sha256 chunkDigest`, e.name);
    const length = e.chunkSize !== undefined && e.chunkSize > 0 ? e.chunkSize : size - fileOffset;
    if (fileOffset < 0 || length <= 0 || fileOffset + length > size) throw bad(`${e.name}: chunk at ${fileOffset} of ${length} bytes outside the file`, e.name);
    current!.chunks.push({ fileOffset, length, start: e.offset, end: endOf(e.offset), digest: e.chunkDigest });
  };
  for (const e of toc.entries) {
    if (e.type === 'chunk') {
      if (!current || e.name !== currentName) throw bad(`chunk of ${e.name} does not follow its file`, e.name);
      addChunk(e, current.size);
      continue;
    }
    closeFile();
    const header = headerOf(e, what);
    if (e.type === 'reg' && (e.size ?? 0) > 0) {
      const size = e.size!;
      if (isDigest(e.digest)) fileDigests.set(contentSize, e.digest);
      current = { offset: contentSize, size, chunks: [] };
      currentName = e.name;
      header.byteOffset = contentSize;
      contentSize += size;
      files.push(current);
      addChunk(e, size);
    }
    indexer.addHeader(header);
  }
  closeFile();
  // The TOC's own tar entry, last, as a full pull sees it.
  const tocFile: LazyFile = {
    offset: contentSize, size: tocMember.json.length,
    chunks: [{ fileOffset: 0, length: tocMember.json.length, start: -1, end: -1, digest: tocMember.digest }],
  };
  indexer.addHeader({
    name: TOC_NAME, type: 'file', size: tocMember.json.length, mode: tocMember.header.mode, uid: tocMember.header.uid, gid: tocMember.header.gid,
    mtime: new Date(tocMember.header.mtime * 1000), byteOffset: contentSize,
  });
  contentSize += tocMember.json.length;
  files.push(tocFile);
  const { index, fileBytes } = indexer.result();
  // A file's TOC digest (sha256 of its bytes; the TOC is verified) names its content-addressed object, as the digest a full pull computes does.
  for (const entry of index.entries) {
    const digest = entry.kind === 'file' && entry.link === undefined && entry.size >= PASSTHROUGH_MIN_LOWER_SIZE && entry.offset !== undefined ? fileDigests.get(entry.offset) : undefined;
    if (digest !== undefined) entry.digest = digest;
  }
  return { index: { ...index, id: diffId }, fileBytes, files, tocFile, contentSize };
}

const TYPES: Record<string, Headers['type']> = {
  dir: 'directory', reg: 'file', symlink: 'symlink', hardlink: 'link', char: 'character-device', block: 'block-device', fifo: 'fifo',
};

function headerOf(e: TocEntry, what: string): Headers {
  const type = TYPES[e.type];
  if (type === undefined) throw new LayerdError(ErrorCodes.EFORMAT, `${what}: TOC entry ${e.name} has unknown type ${e.type}`, { path: e.name });
  const mtime = e.modtime ? Date.parse(e.modtime) : 0;
  const header: Headers = {
    name: e.name, type, mode: e.mode ?? 0, uid: e.uid ?? 0, gid: e.gid ?? 0, size: type === 'file' ? e.size ?? 0 : 0,
    mtime: new Date(Number.isFinite(mtime) ? mtime : 0),
    ...(e.linkName !== undefined ? { linkname: e.linkName } : {}),
    ...(e.devMajor !== undefined ? { devmajor: e.devMajor } : {}),
    ...(e.devMinor !== undefined ? { devminor: e.devMinor } : {}),
  };
  if (e.xattrs && Object.keys(e.xattrs).length > 0) {
    header.paxRaw = new Map(Object.entries(e.xattrs).map(([k, v]) => [`SCHILY.xattr.${k}`, Buffer.from(v, 'base64')]));
  }
  return header;
}

function octal(field: Buffer): number {
  const text = cString(field).trim();
  return text === '' ? 0 : Number.parseInt(text, 8);
}

function cString(field: Buffer): string {
  const nul = field.indexOf(0);
  return field.subarray(0, nul < 0 ? field.length : nul).toString('utf8');
}
