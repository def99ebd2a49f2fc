/**
 * A small eStargz writer for tests, following containerd/stargz-snapshotter's
 * docs/estargz.md (written here from the spec, independent of layerd's
 * reader): an uncompressed layer tar is cut into gzip members at every
 * regular file's payload and every `chunkSize` bytes inside one; the TOC
 * (`stargz.index.json`, every entry and chunk with offsets and sha256
 * digests) is appended as the last tar entry in its own member, then the
 * 51-byte footer. The result is an ordinary gzip layer to any other reader.
 * `writeEstargzLayout` makes an OCI layout of such layers, with the
 * `containerd.io/snapshot/stargz/toc.digest` annotation on each.
 */
import { createHash } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { gzipSync } from 'node:zlib';
import tarStream, { type Headers } from 'tar-stream';

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

interface RawEntry { header: Headers; payload: number; size: number }

async function entriesOf(tar: Buffer): Promise<RawEntry[]> {
  const extract = tarStream.extract();
  const out: RawEntry[] = [];
  extract.on('entry', (header, stream, next) => {
    out.push({ header, payload: header.byteOffset ?? 0, size: header.size ?? 0 });
    stream.on('end', () => next());
    stream.resume();
  });
  const done = new Promise<void>((resolve, reject) => { extract.on('finish', resolve); extract.on('error', reject); });
  Readable.from([tar]).pipe(extract);
  await done;
  return out;
}

export interface EstargzLayer {
  blob: Buffer;
  diffId: string;
  tocDigest: string;
}

const TYPE: Partial<Record<string, string>> = {
  file: 'reg', 'contiguous-file': 'reg', directory: 'dir', symlink: 'symlink', link: 'hardlink',
  'character-device': 'char', 'block-device': 'block', fifo: 'fifo',
};

export async function toEstargz(tar: Buffer, chunkSize = 64 * 1024): Promise<EstargzLayer> {
  const entries = await entriesOf(tar);
  // The archive's data ends before its zero blocks (never inside the last file's bytes).
  let end = tar.length;
  const lastPayloadEnd = Math.max(0, ...entries.filter((e) => e.size > 0).map((e) => e.payload + Math.ceil(e.size / 512) * 512));
  while (end - 512 >= lastPayloadEnd && tar.subarray(end - 512, end).every((b) => b === 0)) end -= 512;

  // Member boundaries: the start, every payload, every chunk in a payload.
  const cuts: number[] = [0];
  const toc: Record<string, unknown>[] = [];
  const pending: { entry: Record<string, unknown>; at: number }[] = [];
  for (const e of entries) {
    const h = e.header;
    const type = TYPE[h.type ?? 'file'];
    if (type === undefined) throw new Error(`toEstargz: unsupported entry type ${String(h.type)}`);
    const base: Record<string, unknown> = {
      name: h.name, type, mode: h.mode ?? 0, uid: h.uid ?? 0, gid: h.gid ?? 0,
      modtime: (h.mtime ?? new Date(0)).toISOString().replace(/\.\d{3}Z$/, 'Z'),
    };
    if (h.linkname) base['linkName'] = h.linkname;
    if (type === 'char' || type === 'block') { base['devMajor'] = h.devmajor ?? 0; base['devMinor'] = h.devminor ?? 0; }
    const xattrs: Record<string, string> = {};
    for (const [k, v] of h.paxRaw ?? new Map<string, Buffer>()) if (k.startsWith('SCHILY.xattr.')) xattrs[k.slice(13)] = v.toString('base64');
    if (Object.keys(xattrs).length > 0) base['xattrs'] = xattrs;
    if (type !== 'reg' || e.size === 0) {
      if (type === 'reg') base['size'] = 0;
      toc.push(base);
      continue;
    }
    const body = tar.subarray(e.payload, e.payload + e.size);
    base['size'] = e.size;
    base['digest'] = sha(body);
    for (let off = 0; off < e.size; off += chunkSize) {
      const len = Math.min(chunkSize, e.size - off);
      const entry: Record<string, unknown> = off === 0 ? base : { name: h.name, type: 'chunk', chunkOffset: off };
      entry['chunkSize'] = off + len >= e.size ? 0 : len;
      entry['chunkDigest'] = sha(body.subarray(off, off + len));
      if (e.payload + off > cuts[cuts.length - 1]!) cuts.push(e.payload + off);
      pending.push({ entry, at: e.payload + off });
      toc.push(entry);
    }
  }
  const members: Buffer[] = [];
  const memberAt = new Map<number, number>();
  let written = 0;
  for (const [i, start] of cuts.entries()) {
    const stop = i + 1 < cuts.length ? cuts[i + 1]! : end;
    memberAt.set(start, written);
    const gz = gzipSync(tar.subarray(start, stop));
    members.push(gz);
    written += gz.length;
  }
  for (const p of pending) p.entry['offset'] = memberAt.get(p.at);
  const tocJson = Buffer.from(JSON.stringify({ version: 1, entries: toc }));
  const tocOffset = written;
  const tocTar = await packOne('stargz.index.json', tocJson);
  members.push(gzipSync(tocTar));
  members.push(footer(tocOffset));
  return { blob: Buffer.concat(members), diffId: sha(Buffer.concat([tar.subarray(0, end), tocTar])), tocDigest: sha(tocJson) };
}

/** A tar of one file, with its end-of-archive blocks. */
async function packOne(name: string, data: Buffer): Promise<Buffer> {
  const pack = tarStream.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c: Buffer) => chunks.push(c));
  const done = new Promise<void>((resolve) => pack.on('end', () => resolve()));
  pack.entry({ name, size: data.length, mode: 0o644, mtime: new Date(0), type: 'file' }, data);
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

/** The footer: an empty gzip member whose Extra field says `%016xSTARGZ` (the TOC's offset). */
function footer(tocOffset: number): Buffer {
  const b = Buffer.alloc(51);
  b.set([0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 0xff], 0);
  b.writeUInt16LE(26, 10);
  b.set([0x53, 0x47], 12);
  b.writeUInt16LE(22, 14);
  b.write(`${tocOffset.toString(16).padStart(16, '0')}STARGZ`, 16, 'latin1');
  b.set([0x01, 0x00, 0x00, 0xff, 0xff], 38); // a final stored block of length 0
  return b; // CRC32 and ISIZE of nothing: zeros
}

/** An OCI layout (tag `latest`) of eStargz layers made from these uncompressed layer tars. */
export async function writeEstargzLayout(dir: string, tars: Buffer[], chunkSize?: number): Promise<{ layers: EstargzLayer[]; manifestDigest: string }> {
  const blobs = join(dir, 'blobs', 'sha256');
  await mkdir(blobs, { recursive: true });
  const put = async (b: Buffer): Promise<string> => {
    const d = sha(b);
    await writeFile(join(blobs, d.slice(7)), b);
    return d;
  };
  const layers: EstargzLayer[] = [];
  for (const tar of tars) layers.push(await toEstargz(tar, chunkSize));
  const config = Buffer.from(JSON.stringify({
    architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) },
    config: { Env: ['PATH=/usr/bin:/bin'] }, history: layers.map(() => ({ created_by: 'estargz test writer' })),
  }));
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json',
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: await put(config), size: config.length },
    layers: await Promise.all(layers.map(async (l) => ({
      mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: await put(l.blob), size: l.blob.length,
      annotations: { 'containerd.io/snapshot/stargz/toc.digest': l.tocDigest },
    }))),
  }));
  const manifestDigest = await put(manifest);
  await writeFile(join(dir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
  await writeFile(join(dir, 'index.json'), JSON.stringify({
    schemaVersion: 2,
    manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: manifestDigest, size: manifest.length, annotations: { 'org.opencontainers.image.ref.name': 'latest' } }],
  }));
  return { layers, manifestDigest };
}

