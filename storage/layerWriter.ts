/**
 * Writing a layer as an OCI layer tar: entries in byte order of their paths
 * (so a directory precedes what it holds, and the output is deterministic),
 * whiteouts as `.wh.<name>` and opaque directories as `.wh..wh..opq`,
 * hard links as GNU tar writes them (the first name of a link group written
 * carries the content, every later one is a link to it), sub-second and
 * out-of-range times as PAX `mtime` records, and xattrs as PAX
 * `SCHILY.xattr.*` records carrying the exact bytes.
 *
 * What a tar cannot say is refused or left out before anything is written:
 * a user's file named `.wh.*` would read back as a whiteout (EUNSUPPORTED);
 * sockets have no tar type and are skipped, as Docker and GNU tar do.
 */
import { createReadStream } from 'node:fs';
import { type Readable, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import tarStream, { type Headers, type Pack } from 'tar-stream';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type ContentRef, type LayerEntry, type LayerIndex, type LayerSource } from './layerIndex.js';
import { formatPaxTime, isNsec } from './paxTime.js';
import { OPAQUE_MARKER, WHITEOUT_PREFIX, baseName, parentOf, joinPath } from './tarPaths.js';

/** The tar's uid/gid fields hold 7 octal digits; larger ids go in PAX. */
const MAX_OCTAL_ID = 0o7777777;
const MAX_HEADER_MTIME = 2 ** 31 - 1;

/** The names of one inode within the layer, and which of them was written first. */
interface LinkGroup {
  /** The entry that describes the inode (the first name in the index). */
  readonly root: LayerEntry;
  firstWritten?: string;
}

type Item =
  | { path: string; entry: LayerEntry; group?: LinkGroup }
  | { path: string; entry: LayerEntry; lowerLink: string }
  | { path: string; marker: 'whiteout' | 'opaque' };

export interface LayerTarSummary {
  /** Entries written, whiteouts and opaque markers included. */
  written: number;
  /** Sockets left out (a tar has no type for them). */
  socketsSkipped: number;
}

function byteOrder(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}

export async function writeLayerTar(source: LayerSource, out: Writable): Promise<LayerTarSummary> {
  const pack = tarStream.pack();
  const done = pipeline(pack, out);
  try {
    // Planned in full before the first byte: a refused name leaves no partial tar behind.
    const { items, socketsSkipped } = planItems(source.index);
    for (const item of items) await writeItem(pack, source, item);
    pack.finalize();
    await done;
    return { written: items.length, socketsSkipped };
  } catch (err) {
    pack.destroy(err as Error);
    await done.catch(() => undefined);
    throw err;
  }
}

/** Every tar member to write, in byte order of its name, with link groups resolved. */
function planItems(index: LayerIndex): { items: Item[]; socketsSkipped: number } {
  const entries = index.entries;
  const position = new Map<string, number>();
  entries.forEach((e, i) => { if (!position.has(e.path)) position.set(e.path, i); });

  // A link names an earlier entry of the index (the scan's and the
  // importer's contract); a name not earlier refers to the layers below.
  const resolveLink = (entry: LayerEntry, at: number): { root: LayerEntry } | { lower: string } => {
    let current = entry;
    let currentAt = at;
    while (current.link !== undefined) {
      const p = position.get(current.link);
      if (p === undefined || p >= currentAt) return { lower: current.link };
      current = entries[p]!;
      currentAt = p;
    }
    if (current.kind === 'dir') {
      throw new LayerdError(ErrorCodes.EINVAL, `hard link ${entry.path} names a directory: ${current.path}`, { path: entry.path, target: current.path });
    }
    return { root: current };
  };

  const groups = new Map<string, LinkGroup>();
  const resolved = new Map<LayerEntry, { group: LinkGroup } | { lower: string }>();
  entries.forEach((entry, i) => {
    if (entry.link === undefined) return;
    const r = resolveLink(entry, i);
    if ('lower' in r) { resolved.set(entry, r); return; }
    let group = groups.get(r.root.path);
    if (!group) groups.set(r.root.path, group = { root: r.root });
    resolved.set(entry, { group });
  });

  const items: Item[] = [];
  let socketsSkipped = 0;
  for (const entry of entries) {
    if (entry.path === '') continue;
    if (entry.kind === 'socket') { socketsSkipped++; continue; }
    refuseMarkerName(entry.path, `${entry.kind === 'dir' ? 'directory' : 'file'} ${entry.path}`);
    const r = resolved.get(entry) ?? (groups.has(entry.path) ? { group: groups.get(entry.path)! } : undefined);
    if (r === undefined) items.push({ path: entry.path, entry });
    else if ('lower' in r) items.push({ path: entry.path, entry, lowerLink: r.lower });
    else if (r.group.root.kind === 'socket') socketsSkipped++;
    else items.push({ path: entry.path, entry, group: r.group });
  }
  for (const w of index.whiteouts) {
    refuseMarkerName(w, `the deletion of ${w}`);
    items.push({ path: joinPath(parentOf(w), WHITEOUT_PREFIX + baseName(w)), marker: 'whiteout' });
  }
  for (const d of index.opaques) items.push({ path: joinPath(d, OPAQUE_MARKER), marker: 'opaque' });
  items.sort((a, b) => byteOrder(a.path, b.path));

  // A link to a lower file whose name this layer also replaces cannot be
  // written: listed before the replacement, the indexer refuses it (a link to
  // a later member, as GNU tar does); listed after, it reads back as a link
  // to the new file.
  for (const item of items) {
    if (!('lowerLink' in item)) continue;
    if (position.get(item.lowerLink) !== undefined) {
      throw new LayerdError(ErrorCodes.EUNSUPPORTED,
        `hard link ${item.path} to ${item.lowerLink} of a lower layer cannot be written: this layer also replaces ${item.lowerLink}`,
        { path: item.path, target: item.lowerLink });
    }
  }
  return { items, socketsSkipped };
}

/**
 * A name that starts with `.wh.` means a whiteout or an opaque marker in an
 * OCI layer: a user's file of that name cannot be expressed.
 */
function refuseMarkerName(path: string, what: string): void {
  if (!baseName(path).startsWith(WHITEOUT_PREFIX)) return;
  throw new LayerdError(ErrorCodes.EUNSUPPORTED,
    `cannot write ${what} to an OCI layer: names starting with '${WHITEOUT_PREFIX}' mean whiteouts there, and it would read back as one`,
    { path });
}

async function writeItem(pack: Pack, source: LayerSource, item: Item): Promise<void> {
  if ('marker' in item) {
    await addEntry(pack, { name: item.path, type: 'file', size: 0, mode: 0o644, uid: 0, gid: 0, mtime: new Date(0) });
    return;
  }
  if ('lowerLink' in item) {
    await addEntry(pack, { ...headerFor(item.entry, item.path), type: 'link', linkname: item.lowerLink });
    return;
  }
  // One inode, many names: its own metadata and bytes go with every name.
  const group = item.group;
  const meta = group ? group.root : item.entry;
  const header = headerFor(meta, item.path);
  if (group) {
    if (group.firstWritten !== undefined) {
      await addEntry(pack, { ...header, type: 'link', linkname: group.firstWritten });
      return;
    }
    group.firstWritten = item.path;
  }
  switch (meta.kind) {
    case 'dir': header.type = 'directory'; header.name = `${item.path}/`; break;
    case 'symlink': header.type = 'symlink'; header.linkname = meta.target ?? ''; break;
    case 'char': header.type = 'character-device'; header.devmajor = meta.devMajor ?? 0; header.devminor = meta.devMinor ?? 0; break;
    case 'block': header.type = 'block-device'; header.devmajor = meta.devMajor ?? 0; header.devminor = meta.devMinor ?? 0; break;
    case 'fifo': header.type = 'fifo'; break;
    case 'socket': throw new LayerdError(ErrorCodes.EINTERNAL, `socket ${item.path} reached the tar writer`, { path: item.path });
    case 'file': header.type = 'file'; header.size = meta.size; break;
  }
  if (header.type !== 'file' || meta.size === 0) {
    await addEntry(pack, header);
    return;
  }
  const content = source.content(meta);
  if (!content) throw new LayerdError(ErrorCodes.EINTERNAL, `no content for file ${item.path} of ${meta.size} bytes`, { path: item.path });
  // Opened before the entry starts: a file that cannot be opened (or is no longer the one
  // scanned) fails the write with its own error, with no half-written entry to unwind.
  const bytes = openContent(content);
  const sink = pack.entry(header);
  try {
    await pipeline(bytes, sink);
  } catch (err) {
    // tar-stream's word for a file that ended before the size the index gave.
    if (err instanceof Error && err.message === 'Size mismatch') {
      throw new LayerdError(ErrorCodes.ECONFLICT, `file ${item.path} changed while it was written to the layer: it has fewer than the ${meta.size} bytes it had when scanned`,
        { path: item.path, size: meta.size }, { cause: err });
    }
    throw err;
  }
}

function headerFor(e: LayerEntry, path: string): Headers {
  const header: Headers = {
    name: path,
    mode: e.mode,
    uid: e.uid <= MAX_OCTAL_ID ? e.uid : 0,
    gid: e.gid <= MAX_OCTAL_ID ? e.gid : 0,
    mtime: new Date(Math.min(Math.max(e.mtime, 0), MAX_HEADER_MTIME) * 1000),
    size: 0,
  };
  const pax: Record<string, string | Buffer> = {};
  // The header holds whole seconds as a 32-bit number: 2100, 1969 and
  // fractions go in PAX. Whole in-range times add nothing, so tars written
  // before nanoseconds were kept stay byte-identical.
  const nsec = e.mtimeNsec ?? 0;
  if (!isNsec(nsec)) throw new LayerdError(ErrorCodes.EINVAL, `mtime nanoseconds of ${path} out of range: ${nsec}`, { path, mtimeNsec: nsec });
  if (e.mtime < 0 || e.mtime > MAX_HEADER_MTIME || nsec !== 0) pax['mtime'] = formatPaxTime(e.mtime, nsec);
  if (e.uid > MAX_OCTAL_ID) pax['uid'] = String(e.uid);
  if (e.gid > MAX_OCTAL_ID) pax['gid'] = String(e.gid);
  for (const [name, value] of Object.entries(e.xattrs ?? {})) pax[`SCHILY.xattr.${name}`] = Buffer.from(value, 'base64');
  if (Object.keys(pax).length > 0) header.pax = pax;
  return header;
}

/** The bytes of a file: through the source's descriptor when it gives one (closed here), else by name. */
function openContent(content: ContentRef): Readable {
  const range = { start: content.offset, end: content.offset + content.size - 1 };
  if (content.open) return createReadStream(content.path, { ...range, fd: content.open(), autoClose: true });
  return createReadStream(content.path, range);
}

function addEntry(pack: Pack, header: Headers): Promise<void> {
  return new Promise((resolve, reject) => {
    pack.entry(header, Buffer.alloc(0), (err?: Error | null) => (err ? reject(err) : resolve()));
  });
}
