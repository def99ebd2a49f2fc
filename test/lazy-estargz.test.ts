/**
 * The eStargz reader (storage/lazy/estargz.ts) against the writer written
 * from the spec (test/support/estargz.ts): the footer and TOC are found and
 * verified, the index built from the TOC is the one a full pull builds from
 * the same blob (but for where file bytes are), and every chunk's blob range
 * inflates to its file's bytes with the digest the TOC gives.
 */
import { expect } from 'chai';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { gunzipSync } from 'node:zlib';
import tarStream from 'tar-stream';
import { ErrorCodes, isLayerdError } from '../common/errors.js';
import { type Digest } from '../storage/digest.js';
import { type LayerEntry } from '../storage/layerIndex.js';
import { LayerUnpacker } from '../storage/layerUnpack.js';
import { ESTARGZ_FOOTER_SIZE, TOC_NAME, parseFooter, parseToc, planLazyLayer, readTocMember } from '../storage/lazy/estargz.js';
import { layerDirSource } from '../storage/lazy/lazyLayer.js';
import { toEstargz } from './support/estargz.js';

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

async function sampleTar(big: Buffer): Promise<Buffer> {
  const pack = tarStream.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c: Buffer) => chunks.push(c));
  const done = new Promise<void>((resolve) => pack.on('end', () => resolve()));
  const mtime = new Date(1_700_000_000_000);
  pack.entry({ name: 'a/', type: 'directory', mode: 0o755, mtime });
  pack.entry({ name: 'a/big', mode: 0o644, mtime, uid: 1000, gid: 1000 }, big);
  pack.entry({ name: 'a/small', mode: 0o4755, mtime, pax: { 'SCHILY.xattr.user.note': 'hello' } }, 'small file\n');
  pack.entry({ name: 'a/empty', mode: 0o600, mtime }, '');
  pack.entry({ name: 'a/hard', type: 'link', linkname: 'a/small', mode: 0o4755, mtime });
  pack.entry({ name: 'a/sym', type: 'symlink', linkname: '../etc/passwd', mode: 0o777, mtime });
  // UTF-8 names beyond ASCII: a full pull reads them from tar fields, a lazy one from the TOC's JSON.
  pack.entry({ name: 'a/café', mode: 0o644, mtime }, 'crème\n');
  pack.entry({ name: 'a/naïve', type: 'symlink', linkname: 'café', mode: 0o777, mtime });
  pack.entry({ name: 'a/.wh.gone', mode: 0o600, mtime }, '');
  pack.entry({ name: 'b/', type: 'directory', mode: 0o700, mtime });
  pack.entry({ name: 'b/.wh..wh..opq', mode: 0o600, mtime }, '');
  pack.entry({ name: 'b/tail', mode: 0o644, mtime }, randomBytes(70_000));
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

async function fullIndex(tar: Buffer): Promise<{ entries: LayerEntry[]; whiteouts: string[]; opaques: string[] }> {
  const unpacker = new LayerUnpacker();
  await pipeline(Readable.from([tar]), unpacker.writable);
  return (await unpacker.done).index;
}

// A full pull's index also records each file's digest (its object's name); a TOC's index does not (yet).
const withoutOffsets = (entries: LayerEntry[]): Omit<LayerEntry, 'offset' | 'digest'>[] => entries.map(({ offset: _o, digest: _d, ...rest }) => rest);

describe('eStargz layers (storage/lazy/estargz.ts)', () => {
  it('finds and verifies the TOC, and builds the index a full pull builds from the same blob', async () => {
    const big = randomBytes(200 * 1024);
    const layer = await toEstargz(await sampleTar(big), 64 * 1024);
    const plain = gunzipSync(layer.blob);
    expect(sha(plain)).to.equal(layer.diffId); // an ordinary gzip layer to any other reader

    const tocOffset = parseFooter(layer.blob.subarray(layer.blob.length - ESTARGZ_FOOTER_SIZE), 'test');
    const member = await readTocMember(layer.blob.subarray(tocOffset, layer.blob.length - ESTARGZ_FOOTER_SIZE), 'test');
    expect(member.digest).to.equal(layer.tocDigest);
    const plan = planLazyLayer(parseToc(member.json, 'test'), member, tocOffset, layer.diffId as Digest, 'test');

    const full = await fullIndex(plain);
    expect(withoutOffsets(plan.index.entries)).to.deep.equal(withoutOffsets(full.entries));
    expect(plan.index.whiteouts).to.deep.equal(full.whiteouts);
    expect(plan.index.opaques).to.deep.equal(full.opaques);
    expect(plan.index.entries.map((e) => e.path)).to.include(TOC_NAME);
    // A hard link shares its target's bytes in the content file too.
    const byPath = new Map(plan.index.entries.map((e) => [e.path, e]));
    expect(byPath.get('a/hard')!.offset).to.equal(byPath.get('a/small')!.offset);
    expect(byPath.get('a/naïve')!.target).to.equal('café');
    expect(full.entries.map((e) => e.path)).to.include('a/café');

    // Every chunk's blob range inflates to the file's bytes there, with the TOC's digest.
    const fullByPath = new Map(full.entries.map((e) => [e.path, e]));
    let chunks = 0;
    for (const entry of plan.index.entries) {
      if (entry.kind !== 'file' || entry.size === 0 || entry.link !== undefined || entry.path === TOC_NAME) continue;
      const file = plan.files.find((f) => f.offset === entry.offset)!;
      const f = fullByPath.get(entry.path)!;
      const bytes = plain.subarray(f.offset!, f.offset! + f.size);
      expect(file.chunks.reduce((n, c) => n + c.length, 0)).to.equal(entry.size);
      for (const c of file.chunks) {
        const inflated = gunzipSync(layer.blob.subarray(c.start, c.end)).subarray(0, c.length);
        expect(inflated.equals(bytes.subarray(c.fileOffset, c.fileOffset + c.length)), `${entry.path}@${c.fileOffset}`).to.equal(true);
        expect(sha(inflated)).to.equal(c.digest);
        chunks++;
      }
    }
    expect(plan.files.find((f) => f.size === big.length)!.chunks).to.have.length(4);
    expect(chunks).to.equal(4 + 1 + 1 + 2); // big, small, café, tail
  });

  it('serves a lazy layer whose fill completed before it was opened from its complete directory', async () => {
    const root = await mkdtemp(join(tmpdir(), 'layerd-lazy-dir-'));
    try {
      const diffId = sha(Buffer.from('a layer')) as Digest;
      const complete = join(root, 'layers', 'sha256', diffId.slice(7));
      await mkdir(complete, { recursive: true });
      await writeFile(join(complete, 'index.json'), JSON.stringify({ version: 1, id: diffId, entries: [], whiteouts: [], opaques: [] }));
      await writeFile(join(complete, 'layer.tar'), Buffer.alloc(1024));
      const source = await layerDirSource(join(root, 'lazy', 'sha256', diffId.slice(7)));
      expect(source.index.id).to.equal(diffId);
      let failed = false;
      await layerDirSource(join(root, 'lazy', 'sha256', 'f'.repeat(64))).catch(() => { failed = true; });
      expect(failed).to.equal(true);
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  it('refuses a blob whose tail is no eStargz footer', () => {
    let code: string | undefined;
    try {
      parseFooter(randomBytes(ESTARGZ_FOOTER_SIZE), 'test');
    } catch (err) {
      code = isLayerdError(err) ? err.code : 'other';
    }
    expect(code).to.equal(ErrorCodes.EFORMAT);
  });
});
