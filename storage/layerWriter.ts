/**
 * Writing a layer as an OCI layer tar: entries in byte order of their paths
 * (so a directory precedes what it holds, and the output is deterministic),
 * whiteouts as `.wh.<name>` and opaque directories as `.wh..wh..opq`,
 * hard links as link entries to their first name, and xattrs as PAX
 * `SCHILY.xattr.*` records carrying the exact bytes.
 */
import { createReadStream } from 'node:fs';
import { type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import tarStream, { type Headers, type Pack } from 'tar-stream';
import { type LayerEntry, type LayerIndex, type LayerSource } from './layerIndex.js';
import { OPAQUE_MARKER, WHITEOUT_PREFIX, baseName, parentOf, joinPath } from './tarPaths.js';

/** The tar's uid/gid fields hold 7 octal digits; larger ids go in PAX. */
const MAX_OCTAL_ID = 0o7777777;
const MAX_HEADER_MTIME = 2 ** 31 - 1;

type Item =
  | { path: string; entry: LayerEntry }
  | { path: string; marker: 'whiteout' | 'opaque' };

function byteOrder(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}

export async function writeLayerTar(source: LayerSource, out: Writable): Promise<void> {
  const index: LayerIndex = source.index;
  const items: Item[] = [];
  for (const entry of index.entries) if (entry.path !== '') items.push({ path: entry.path, entry });
  for (const w of index.whiteouts) items.push({ path: joinPath(parentOf(w), WHITEOUT_PREFIX + baseName(w)), marker: 'whiteout' });
  for (const d of index.opaques) items.push({ path: joinPath(d, OPAQUE_MARKER), marker: 'opaque' });
  items.sort((a, b) => byteOrder(a.path, b.path));

  const pack = tarStream.pack();
  const done = pipeline(pack, out);
  const emitted = new Set<string>();
  try {
    for (const item of items) {
      if ('marker' in item) {
        await addEntry(pack, { name: item.path, type: 'file', size: 0, mode: 0o644, uid: 0, gid: 0, mtime: new Date(0) });
        continue;
      }
      const e = item.entry;
      const header: Headers = {
        name: e.kind === 'dir' ? `${e.path}/` : e.path,
        mode: e.mode,
        uid: e.uid <= MAX_OCTAL_ID ? e.uid : 0,
        gid: e.gid <= MAX_OCTAL_ID ? e.gid : 0,
        mtime: new Date(Math.min(Math.max(e.mtime, 0), MAX_HEADER_MTIME) * 1000),
        size: 0,
      };
      const pax: Record<string, string | Buffer> = {};
      // tar-stream packs mtime as a 32-bit number: 2100 or 1969 go in PAX.
      if (e.mtime < 0 || e.mtime > MAX_HEADER_MTIME) pax['mtime'] = String(e.mtime);
      if (e.uid > MAX_OCTAL_ID) pax['uid'] = String(e.uid);
      if (e.gid > MAX_OCTAL_ID) pax['gid'] = String(e.gid);
      for (const [name, value] of Object.entries(e.xattrs ?? {})) pax[`SCHILY.xattr.${name}`] = Buffer.from(value, 'base64');
      if (Object.keys(pax).length > 0) header.pax = pax;
      switch (e.kind) {
        case 'dir': header.type = 'directory'; break;
        case 'symlink': header.type = 'symlink'; header.linkname = e.target ?? ''; break;
        case 'char': header.type = 'character-device'; header.devmajor = e.devMajor ?? 0; header.devminor = e.devMinor ?? 0; break;
        case 'block': header.type = 'block-device'; header.devmajor = e.devMajor ?? 0; header.devminor = e.devMinor ?? 0; break;
        case 'fifo': header.type = 'fifo'; break;
        case 'file':
          if (e.link !== undefined && emitted.has(e.link)) {
            header.type = 'link';
            header.linkname = e.link;
            break;
          }
          header.type = 'file';
          header.size = e.size;
          break;
      }
      emitted.add(e.path);
      if (header.type === 'file' && e.size > 0) {
        const content = source.content(e);
        const entryStream = pack.entry(header);
        await pipeline(createReadStream(content!.path, { start: content!.offset, end: content!.offset + content!.size - 1 }), entryStream);
      } else {
        await addEntry(pack, header);
      }
    }
    pack.finalize();
    await done;
  } catch (err) {
    pack.destroy(err as Error);
    await done.catch(() => undefined);
    throw err;
  }
}

function addEntry(pack: Pack, header: Headers): Promise<void> {
  return new Promise((resolve, reject) => {
    pack.entry(header, Buffer.alloc(0), (err?: Error | null) => (err ? reject(err) : resolve()));
  });
}
