/**
 * Indexing one layer tar: every entry's metadata, and for each regular file
 * the offset of its bytes in the uncompressed tar, which the store keeps as
 * the layer's `layer.tar` (see docs/storage.md).
 *
 * Nothing named by the archive is ever created on disk, so path traversal
 * and symlink escapes cannot write outside the layer; they are still refused
 * with EBADTAR, because an archive that contains them is broken or hostile
 * and the image would not mean what it says.
 */
import { isUtf8 } from 'node:buffer';
import { createHash } from 'node:crypto';
import { type Readable, type Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import tarStream, { type Headers } from 'tar-stream';
import { ErrorCodes, LayerdError, asLayerdError } from '../common/errors.js';
import { type EntryKind, type LayerEntry, type LayerIndex, LAYER_INDEX_VERSION, PASSTHROUGH_MIN_LOWER_SIZE } from './layerIndex.js';
import { escapeBytes } from '../common/sys/fs.js';
import { parsePaxTime } from './paxTime.js';
import { ancestorsOf, classifyWhiteout, normalizeTarPath } from './tarPaths.js';

export interface UnpackLimits {
  /** Most entries one layer may have. */
  maxEntries: number;
  /** Largest single regular file. */
  maxFileSize: number;
  /** Most bytes of extended attributes on one entry. */
  maxXattrBytes: number;
}

export const DEFAULT_UNPACK_LIMITS: UnpackLimits = {
  maxEntries: 2_000_000,
  maxFileSize: 64 * 1024 ** 3,
  maxXattrBytes: 1024 * 1024,
};

/** tar-stream 3 with layerd's patch (patches/tar-stream+*.patch) adds paxRaw. */
type RawHeaders = Headers;

export interface UnpackResult {
  index: Omit<LayerIndex, 'id'>;
  /** Sum of regular-file sizes. */
  fileBytes: number;
}

/**
 * A writable end that accepts an uncompressed layer tar and indexes it.
 * Await `done` for the index.
 */
export class LayerUnpacker {
  readonly writable: Writable;
  readonly done: Promise<UnpackResult>;

  private readonly entries: LayerEntry[] = [];
  private readonly byPath = new Map<string, LayerEntry>();
  /** Paths that are the parent of some entry in this layer. */
  private readonly parents = new Set<string>();
  private readonly whiteouts = new Set<string>();
  private readonly opaques = new Set<string>();
  /** Hard links to files of the layers below (their target was no earlier member). */
  private readonly lowerLinkEntries = new Set<LayerEntry>();
  /** Hard-link targets not (yet) in this layer, taken as a lower layer's files: target → link. */
  private readonly lowerLinks = new Map<string, string>();
  private fileBytes = 0;
  private count = 0;

  /**
   * @param options.digests hash files of PASSTHROUGH_MIN_LOWER_SIZE or more
   *   (default); off when another stage hashes every file (storage/tarSplit.ts)
   */
  constructor(private readonly limits: UnpackLimits = DEFAULT_UNPACK_LIMITS, options: { digests?: boolean } = {}) {
    const digests = options.digests ?? true;
    // Names as bytes (latin1: one char per byte), so that utf8Names can tell a name that is not UTF-8 from one that is.
    const extract = tarStream.extract({ filenameEncoding: 'latin1' });
    this.writable = extract;
    extract.on('entry', (header: RawHeaders, stream: Readable, next: (err?: unknown) => void) => {
      // Synchronous, and the data skipped by a plain resume: a promise and a
      // finished() per entry cost more than the parsing on layers of many
      // small files. A failure of the archive also destroys the entry's
      // stream with it; it is reported once, through `done`.
      stream.on('error', ignore);
      let entry: LayerEntry | undefined;
      try {
        utf8Names(header);
        entry = this.onEntry(header);
      } catch (err) {
        stream.resume();
        next(err);
        return;
      }
      if (digests && entry !== undefined && entry.kind === 'file' && entry.size >= PASSTHROUGH_MIN_LOWER_SIZE && entry.link === undefined) {
        // The file's own digest names its content-addressed object (storage/objectStore.ts); smaller files never pass through.
        const file = entry;
        const hash = createHash('sha256');
        stream.on('data', (chunk: Buffer) => hash.update(chunk));
        stream.once('end', () => { file.digest = `sha256:${hash.digest('hex')}`; next(); });
      } else {
        stream.once('end', () => next());
      }
      stream.resume();
    });
    this.done = (async () => {
      try {
        await finished(extract);
      } catch (err) {
        throw tarError(err);
      }
      return {
        index: {
          version: LAYER_INDEX_VERSION,
          entries: this.entries,
          whiteouts: [...this.whiteouts],
          opaques: [...this.opaques],
        },
        fileBytes: this.fileBytes,
      };
    })();
    // The caller observes failures through `done`; keep Node from reporting
    // an unhandled rejection if it has not attached yet.
    this.done.catch(() => undefined);
  }

  /**
   * Index one entry described by a header rather than read from a tar (an
   * eStargz TOC entry; `byteOffset` says where a file's bytes are).
   */
  addHeader(header: RawHeaders): void {
    // Names from JSON may hold lone surrogates, which no UTF-8 name can be.
    for (const name of [header.name, header.linkname ?? '']) {
      if (LONE_SURROGATE.test(name)) throw new LayerdError(ErrorCodes.EBADTAR, `a member's name or link target is not UTF-8: ${JSON.stringify(name)}`, { path: name });
    }
    this.onEntry(header);
  }

  /** The index of the entries added so far with addHeader. */
  result(): UnpackResult {
    return {
      index: { version: LAYER_INDEX_VERSION, entries: this.entries, whiteouts: [...this.whiteouts], opaques: [...this.opaques] },
      fileBytes: this.fileBytes,
    };
  }

  /** Index one member; returns its entry (undefined for whiteouts and opaque markers). */
  private onEntry(header: RawHeaders): LayerEntry | undefined {
    if (++this.count > this.limits.maxEntries) {
      throw new LayerdError(ErrorCodes.ELIMIT, `layer has more than ${this.limits.maxEntries} entries`, { limit: this.limits.maxEntries });
    }
    const path = normalizeTarPath(header.name);
    const kind = entryKind(header, path);

    const whiteout = classifyWhiteout(path);
    if (whiteout.kind !== 'none') {
      if (whiteout.kind === 'whiteout') this.addOnce(this.whiteouts, whiteout.target, 'whiteout', path);
      else if (whiteout.kind === 'opaque') this.addOnce(this.opaques, whiteout.dir, 'opaque marker', path);
      // A whiteout below a path this layer made a file or symlink is kept as
      // layer metadata (umoci writes such layers); the union never applies it
      // through that non-directory.
      return undefined;
    }

    if (this.byPath.has(path)) {
      throw new LayerdError(ErrorCodes.EBADTAR, `duplicate entry in layer: ${path || '/'}`, { path });
    }
    const laterTarget = this.lowerLinks.get(path);
    if (laterTarget !== undefined) {
      // GNU tar refuses this too; taking it would make the link name a lower
      // layer's file while tree/diff list this one.
      throw new LayerdError(ErrorCodes.EBADTAR, `hard link ${laterTarget} points to ${path}, which comes later in the archive`, { path: laterTarget, target: path });
    }
    this.checkParents(path, 'entry');
    if (kind !== 'dir' && this.parents.has(path)) {
      throw new LayerdError(ErrorCodes.EBADTAR, `entry ${path} is not a directory but the layer has entries beneath it`, { path });
    }

    const pax = header.pax ?? {};
    const paxMtime = pax['mtime'] === undefined ? undefined : parsePaxTime(pax['mtime'].toString());
    let entry: LayerEntry = {
      path,
      kind: kind === 'hardlink' ? 'file' : kind,
      mode: (header.mode ?? 0) & 0o7777,
      uid: paxInt(pax['uid']) ?? header.uid ?? 0,
      gid: paxInt(pax['gid']) ?? header.gid ?? 0,
      mtime: paxMtime?.sec ?? Math.floor((header.mtime?.getTime() ?? 0) / 1000),
      size: 0,
    };
    // Absent means 0: indexes of whole-second layers stay as they were.
    if (paxMtime !== undefined && paxMtime.nsec !== 0) entry.mtimeNsec = paxMtime.nsec;
    const xattrs = this.xattrsOf(header, path);
    if (xattrs) entry.xattrs = xattrs;

    switch (kind) {
      case 'file': {
        const size = header.size ?? 0;
        if (size > this.limits.maxFileSize) {
          throw new LayerdError(ErrorCodes.ELIMIT, `file ${path} is ${size} bytes, over the limit of ${this.limits.maxFileSize}`, { path, size });
        }
        entry.size = size;
        this.fileBytes += size;
        if (size > 0) entry.offset = header.byteOffset ?? 0;
        break;
      }
      case 'hardlink':
        entry = this.linkEntry(entry, header.linkname ?? '');
        break;
      case 'symlink':
        if (!header.linkname) throw new LayerdError(ErrorCodes.EBADTAR, `symlink ${path} has an empty target`, { path });
        entry.target = header.linkname;
        break;
      case 'char':
      case 'block':
        entry.devMajor = header.devmajor ?? 0;
        entry.devMinor = header.devminor ?? 0;
        break;
    }

    this.byPath.set(path, entry);
    this.entries.push(entry);
    for (const ancestor of ancestorsOf(path)) {
      if (this.parents.has(ancestor)) break; // its own ancestors are in already
      this.parents.add(ancestor);
    }
    return entry;
  }

  private addOnce(set: Set<string>, path: string, what: string, raw: string): void {
    if (set.has(path)) throw new LayerdError(ErrorCodes.EBADTAR, `duplicate ${what} in layer: ${raw}`, { path: raw });
    set.add(path);
  }

  /** Refuse an entry beneath something this layer made a non-directory. */
  private checkParents(path: string, what: string): void {
    for (const ancestor of ancestorsOf(path)) {
      const existing = this.byPath.get(ancestor);
      if (existing && existing.kind !== 'dir') {
        const how = existing.kind === 'symlink' ? 'through the symlink' : 'beneath the non-directory';
        throw new LayerdError(ErrorCodes.EBADTAR, `${what} ${path} would be written ${how} ${ancestor}`, { path, parent: ancestor });
      }
      if (existing) return; // an explicit directory: its own ancestors were checked when it was added
    }
  }

  /**
   * A hard link, GNU tar's way: it names an earlier member of the archive,
   * whose inode (metadata and bytes) it shares. A name that no earlier
   * member has is a file of the layers below, as when the layer is applied
   * member by member onto them.
   */
  private linkEntry(entry: LayerEntry, rawTarget: string): LayerEntry {
    const target = normalizeTarPath(rawTarget, 'hard link target');
    if (target === entry.path) throw new LayerdError(ErrorCodes.EBADTAR, `hard link ${entry.path} points to itself`, { path: entry.path });
    this.checkParents(target, 'hard link target');
    const existing = this.byPath.get(target);
    if (!existing) {
      // A link to a file of a lower layer: kept by name, resolved by the union.
      entry.link = target;
      this.lowerLinkEntries.add(entry);
      if (!this.lowerLinks.has(target)) this.lowerLinks.set(target, entry.path);
      return entry;
    }
    if (existing.kind === 'dir') {
      throw new LayerdError(ErrorCodes.EBADTAR, `hard link ${entry.path} points to a directory: ${target}`, { path: entry.path, target });
    }
    // The link shares its target's inode: the same metadata (nothing of its
    // own header: the inode has one mtime, one set of xattrs) and the same data.
    // A link to a lower file is its own root: the name it links to may be
    // replaced by a later member, which is another inode.
    const root = existing.link !== undefined && !this.lowerLinkEntries.has(existing) ? this.byPath.get(existing.link) ?? existing : existing;
    return { ...root, path: entry.path, link: root.path };
  }

  private xattrsOf(header: RawHeaders, path: string): Record<string, string> | undefined {
    if (!header.paxRaw) return undefined;
    let out: Record<string, string> | undefined;
    let bytes = 0;
    for (const [key, value] of header.paxRaw) {
      let name: string;
      let bytesValue: Buffer;
      if (key.startsWith('SCHILY.xattr.')) {
        name = key.slice('SCHILY.xattr.'.length);
        bytesValue = value;
      } else if (key.startsWith('LIBARCHIVE.xattr.')) {
        name = decodeURIComponent(key.slice('LIBARCHIVE.xattr.'.length));
        bytesValue = Buffer.from(value.toString('latin1'), 'base64');
      } else {
        continue;
      }
      if (name === '' || name.includes('\0')) throw new LayerdError(ErrorCodes.EBADTAR, `invalid xattr name on ${path}`, { path });
      bytes += name.length + bytesValue.length;
      if (bytes > this.limits.maxXattrBytes) {
        throw new LayerdError(ErrorCodes.ELIMIT, `extended attributes of ${path} exceed ${this.limits.maxXattrBytes} bytes`, { path });
      }
      (out ??= {})[name] = bytesValue.toString('base64');
    }
    if (!out) return undefined;
    return Object.fromEntries(Object.entries(out).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
  }

}

type TarKind = EntryKind | 'hardlink';

function entryKind(header: Headers, path: string): TarKind {
  switch (header.type) {
    case 'file':
    case 'contiguous-file':
      return 'file';
    case 'directory': return 'dir';
    case 'symlink': return 'symlink';
    case 'link': return 'hardlink';
    case 'character-device': return 'char';
    case 'block-device': return 'block';
    case 'fifo': return 'fifo';
    default:
      throw new LayerdError(ErrorCodes.EBADTAR, `unsupported tar entry type '${String(header.type)}' for ${path || '/'}`, { path, type: String(header.type) });
  }
}

function paxInt(value: string | Buffer | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Math.floor(Number(value.toString()));
  return Number.isSafeInteger(n) ? n : undefined;
}

function ignore(): void {}

/** A UTF-16 surrogate without its pair: no UTF-8 name decodes to one. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/**
 * Turn the member's name and link target into UTF-8 strings, or refuse the
 * layer. layerd keeps every path as UTF-8 (the FUSE union refuses other
 * names with EILSEQ): decoded, a name such as 'a\xff' would be served as
 * 'a\uFFFD', another name than the layer's, and two such names as one.
 * ustar, GNU long-name and prefix fields arrive as latin1 (the raw bytes);
 * PAX path/linkpath records are UTF-8 by the standard, checked in their raw form.
 */
function utf8Names(header: RawHeaders): void {
  const decode = (field: string, paxKey: string): string => {
    const pax = header.paxRaw?.get(paxKey);
    const bytes = pax ?? Buffer.from(field, 'latin1');
    if (!isUtf8(bytes)) {
      const shown = escapeBytes(bytes);
      throw new LayerdError(ErrorCodes.EBADTAR, `a member's ${paxKey === 'path' ? 'name' : 'link target'} is not UTF-8: "${shown}"`, { path: shown });
    }
    return pax !== undefined ? field : bytes.toString('utf8');
  };
  header.name = decode(header.name, 'path');
  if (header.linkname) header.linkname = decode(header.linkname, 'linkpath');
}

/** tar-stream reports malformed archives with plain Errors. */
function tarError(err: unknown): LayerdError {
  if (err instanceof LayerdError) return err;
  const message = err instanceof Error ? err.message : String(err);
  if (/tar|header|unexpected end|premature close/i.test(message)) {
    return new LayerdError(ErrorCodes.EBADTAR, `malformed tar archive: ${message}`, {}, { cause: err });
  }
  return asLayerdError(err);
}
