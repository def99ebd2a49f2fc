/** The layer unpacker on hand-made archives: what the index records. */
import { expect } from 'chai';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { PASSTHROUGH_MIN_LOWER_SIZE } from '../storage/layerIndex.js';
import { LayerUnpacker } from '../storage/layerUnpack.js';
import { scratch } from './support/env.js';
import { writeTar } from './support/tarBuilder.js';

describe('layer unpacker', () => {
  let work: { dir: string; remove(): Promise<void> };
  before(async () => { work = await scratch(); });
  after(async () => { await work?.remove(); });

  async function unpack(name: string, items: Parameters<typeof writeTar>[1]) {
    const tar = join(work.dir, `${name}.tar`);
    await writeTar(tar, items);
    const unpacker = new LayerUnpacker();
    await pipeline(createReadStream(tar), unpacker.writable);
    return { ...(await unpacker.done), tar };
  }

  it('records the sha256 of each file big enough to pass through (its object\'s name), hard links sharing it', async () => {
    const big = randomBytes(PASSTHROUGH_MIN_LOWER_SIZE);
    const { index } = await unpack('digests', [
      { header: { name: 'big', size: big.length }, content: big },
      { header: { name: 'big-link', type: 'link', linkname: 'big' } },
      { header: { name: 'small', size: PASSTHROUGH_MIN_LOWER_SIZE - 1 }, content: Buffer.alloc(PASSTHROUGH_MIN_LOWER_SIZE - 1, 1) },
    ]);
    const by = new Map(index.entries.map((e) => [e.path, e]));
    const digest = `sha256:${createHash('sha256').update(big).digest('hex')}`;
    expect(by.get('big')!.digest).to.equal(digest);
    expect(by.get('big-link')!.digest).to.equal(digest);
    expect(by.get('small')!.digest).to.equal(undefined);
  });

  it('indexes metadata and where the bytes of each file are in the tar, hard links sharing them', async () => {
    const { index, fileBytes, tar } = await unpack('basic', [
      { header: { name: './', type: 'directory', mode: 0o755 } },
      { header: { name: './bin/', type: 'directory', mode: 0o755 } },
      { header: { name: './bin/tool', type: 'file', mode: 0o4755, uid: 0, gid: 0, size: 5 }, content: 'hello' },
      { header: { name: './bin/alias', type: 'link', linkname: './bin/tool', mode: 0o644 } },
      { header: { name: './bin/sh', type: 'symlink', linkname: '/bin/busybox' } },
      { header: { name: './dev/null', type: 'character-device', devmajor: 1, devminor: 3, mode: 0o666 } },
      { header: { name: './empty', type: 'file', size: 0, uid: 1000, gid: 65534 } },
      { header: { name: './etc/.wh.motd', type: 'file', size: 0 } },
      { header: { name: './usr/share/doc/.wh..wh..opq', type: 'file', size: 0 } },
    ]);
    expect(fileBytes).to.equal(5);
    const by = new Map(index.entries.map((e) => [e.path, e]));
    expect(by.get('')?.kind).to.equal('dir');
    expect(by.get('bin/tool')).to.deep.include({ kind: 'file', mode: 0o4755, size: 5 });
    expect(by.get('bin/alias')).to.deep.include({ kind: 'file', mode: 0o4755, link: 'bin/tool', offset: by.get('bin/tool')!.offset });
    expect(by.get('bin/sh')).to.deep.include({ kind: 'symlink', target: '/bin/busybox' });
    expect(by.get('dev/null')).to.deep.include({ kind: 'char', devMajor: 1, devMinor: 3, mode: 0o666 });
    expect(by.get('empty')).to.deep.include({ uid: 1000, gid: 65534, size: 0 });
    expect(by.get('empty')!.offset).to.equal(undefined);
    expect(index.whiteouts).to.deep.equal(['etc/motd']);
    expect(index.opaques).to.deep.equal(['usr/share/doc']);
    const bytes = await readFile(tar);
    const offset = by.get('bin/tool')!.offset!;
    expect(bytes.subarray(offset, offset + 5).toString()).to.equal('hello');
  });

  it('keeps xattr values byte for byte (binary PAX records)', async () => {
    const cap = Buffer.from('0100000200200000000000000000000000000000', 'hex');
    const bin = Buffer.from([0x00, 0xff, 0x10, 0x80, 0x0a]);
    const tar = join(work.dir, 'binary-pax.tar');
    await writeFile(tar, Buffer.concat([
      paxHeader({ 'SCHILY.xattr.security.capability': cap, 'SCHILY.xattr.user.bin': bin }),
      ustarHeader('usr/bin/ping', '0', 1), block(Buffer.from('p')),
      Buffer.alloc(1024),
    ]));
    const unpacker = new LayerUnpacker();
    await pipeline(createReadStream(tar), unpacker.writable);
    const { index } = await unpacker.done;
    expect(index.entries[0]!.xattrs).to.deep.equal({
      'security.capability': cap.toString('base64'),
      'user.bin': bin.toString('base64'),
    });
  });

  it('records, and tolerates, a whiteout beneath a path the same layer made a symlink (umoci)', async () => {
    const { index } = await unpack('umoci', [
      { header: { name: 'etc/logrotate.d', type: 'symlink', linkname: '/usr/share/doc' } },
      { header: { name: 'etc/logrotate.d/.wh.apt', type: 'file', size: 0 } },
    ]);
    expect(index.whiteouts).to.deep.equal(['etc/logrotate.d/apt']);
  });

  it('resolves a hard link to a lower layer by name', async () => {
    const { index } = await unpack('lowerlink', [{ header: { name: 'new-name', type: 'link', linkname: 'usr/bin/dpkg-query' } }]);
    expect(index.entries[0]).to.deep.include({ path: 'new-name', link: 'usr/bin/dpkg-query' });
  });
});

/** A 512-byte ustar header with a correct checksum (for raw PAX tests). */
function ustarHeader(name: string, typeflag: string, size: number): Buffer {
  const h = Buffer.alloc(512);
  h.write(name, 0, 100, 'utf8');
  h.write('0000644\0', 100);
  h.write('0000000\0', 108);
  h.write('0000000\0', 116);
  h.write(size.toString(8).padStart(11, '0') + '\0', 124);
  h.write('14000000000\0', 136);
  h.write('        ', 148);
  h.write(typeflag, 156);
  h.write('ustar\0', 257);
  h.write('00', 263);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148);
  return h;
}

function block(data: Buffer): Buffer {
  return Buffer.concat([data, Buffer.alloc((512 - (data.length % 512)) % 512)]);
}

/** A PAX extended header whose values are raw bytes. */
function paxHeader(records: Record<string, Buffer>): Buffer {
  const body = Buffer.concat(Object.entries(records).map(([k, v]) => {
    const rest = Buffer.concat([Buffer.from(` ${k}=`), v, Buffer.from('\n')]);
    let len = rest.length + 1;
    while (String(len).length + rest.length !== len) len = String(len).length + rest.length;
    return Buffer.concat([Buffer.from(String(len)), rest]);
  }));
  return Buffer.concat([ustarHeader('PaxHeaders/x', 'x', body.length), block(body)]);
}
