/**
 * The seekable gzip index (storage/lazy/gzipIndex.ts): inflating a span
 * from its checkpoint (window + primed bits, through the system zlib) gives
 * exactly the bytes a plain gunzip gives at that offset, for a real Debian
 * layer of the corpus (single gzip member, checkpoints at split bytes) and
 * for a multi-member gzip of the same tar; the file table is the one a full
 * import builds.
 */
import { expect } from 'chai';
import { createCipheriv, createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gunzipSync, gzipSync } from 'node:zlib';
import tarStream from 'tar-stream';
import { type Digest } from '../storage/digest.js';
import { DEFAULT_SPAN_BYTES, DEFAULT_SPAN_OUT_BYTES, EMPTY_WINDOW, buildGzipIndex, inflateSpan, parseGzipIndex, spanFetchStart, type GzipIndex } from '../storage/lazy/gzipIndex.js';
import { DEBIAN_MULTI } from './support/env.js';

/** The largest layer of debian-multi (gzip, ~14 MB compressed). */
async function corpusLayer(): Promise<{ blob: Buffer; digest: Digest }> {
  const index = JSON.parse(await readFile(join(DEBIAN_MULTI, 'index.json'), 'utf8')) as { manifests: { digest: string; annotations?: Record<string, string> }[] };
  const latest = index.manifests.find((m) => m.annotations?.['org.opencontainers.image.ref.name'] === 'latest')!;
  const blobPath = (d: string): string => join(DEBIAN_MULTI, 'blobs', 'sha256', d.slice(7));
  const manifest = JSON.parse(await readFile(blobPath(latest.digest), 'utf8')) as { layers: { digest: Digest; size: number }[] };
  const largest = manifest.layers.filter((l) => l.size < 20_000_000).sort((a, b) => b.size - a.size)[0]!;
  return { blob: await readFile(blobPath(largest.digest)), digest: largest.digest };
}

async function* chunks(bytes: Buffer, size: number): AsyncGenerator<Buffer> {
  for (let at = 0; at < bytes.length; at += size) yield bytes.subarray(at, at + size);
}

async function tarOf(files: [string, Buffer][]): Promise<Buffer> {
  const pack = tarStream.pack();
  const parts: Buffer[] = [];
  pack.on('data', (c: Buffer) => parts.push(c));
  const done = new Promise<void>((resolve, reject) => { pack.on('end', resolve); pack.on('error', reject); });
  for (const [name, bytes] of files) pack.entry({ name, type: 'file', mode: 0o644, mtime: new Date(0) }, bytes);
  pack.finalize();
  await done;
  return Buffer.concat(parts);
}

function sha256(bytes: Buffer): Digest {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

/** Every span inflated from its checkpoint equals the tar's bytes there and hashes to its digest. */
async function checkSpans(index: GzipIndex, blob: Buffer, tar: Buffer): Promise<void> {
  for (const span of index.spans) {
    const bytes = await inflateSpan(span.checkpoint, span.length, blob.subarray(spanFetchStart(span), span.end), 'test');
    const at = span.checkpoint.out;
    expect(bytes.equals(tar.subarray(at, at + span.length)), `span at ${at}`).to.equal(true);
    expect(sha256(bytes)).to.equal(span.digest);
  }
}

describe('seekable gzip index', function () {
  this.timeout(60_000);

  it('inflates every span of a real layer from its checkpoint to the bytes gunzip gives at that offset', async () => {
    const { blob, digest } = await corpusLayer();
    const tar = gunzipSync(blob);
    const index = await buildGzipIndex(chunks(blob, 100_000), 'corpus layer', { spanBytes: 512 * 1024, expected: { digest, size: blob.length } });
    expect(index.layer).to.deep.include({ digest, size: blob.length, tarSize: tar.length, diffId: sha256(tar) });
    expect(index.spans.length).to.be.greaterThan(10);
    // Deflate blocks rarely end on a byte: most checkpoints prime split bits.
    expect(index.spans.filter((s) => s.checkpoint.bits > 0).length).to.be.greaterThan(index.spans.length / 2);
    await checkSpans(index, blob, tar);
    // The document survives its round trip through JSON and its checks.
    const parsed = parseGzipIndex(Buffer.from(JSON.stringify(index)), 'round trip');
    expect(parsed.spans).to.deep.equal(index.spans);
    // The file table points at the files' bytes in the tar.
    const file = index.index.entries.find((e) => e.kind === 'file' && e.path === 'etc/passwd') ?? index.index.entries.find((e) => e.kind === 'file' && e.size > 100)!;
    expect(file.offset).to.be.a('number');
    expect(tar.subarray(file.offset!, file.offset! + file.size).length).to.equal(file.size);
  });

  it('by default: spans of ~2 MiB of tar, short in the blob where data compresses, without a window where it is stored', async () => {
    const { blob } = await corpusLayer();
    const text = gunzipSync(blob);
    // A file of incompressible bytes (deflate stores them) between two files holding a real layer's tar.
    const noise = createCipheriv('aes-128-ctr', Buffer.alloc(16, 7), Buffer.alloc(16)).update(Buffer.alloc(12 << 20));
    const tar = await tarOf([['a', text], ['noise', noise], ['b', text]]);
    const gz = gzipSync(tar);
    const index = await buildGzipIndex(chunks(gz, 1 << 20), 'mixed');
    await checkSpans(index, gz, tar);
    const compressed = (i: number): number => index.spans[i]!.end - index.spans[i]!.checkpoint.in;
    const inText = index.spans.map((_s, i) => i).filter((i) => index.spans[i]!.checkpoint.out + index.spans[i]!.length <= text.length && i + 1 < index.spans.length);
    const inNoise = index.spans.map((_s, i) => i).filter((i) => index.spans[i]!.checkpoint.out > text.length + 64 * 1024 && index.spans[i]!.checkpoint.out + index.spans[i]!.length < text.length + noise.length);
    // The text: spans end after ~2 MiB of tar, far less than DEFAULT_SPAN_BYTES of the blob; their windows are kept.
    expect(inText.length).to.be.greaterThan(5);
    for (const i of inText) {
      expect(index.spans[i]!.length, `span ${i}`).to.be.within(DEFAULT_SPAN_OUT_BYTES, DEFAULT_SPAN_OUT_BYTES + (1 << 20));
      expect(compressed(i), `span ${i}`).to.be.lessThan(DEFAULT_SPAN_BYTES / 2);
    }
    // (A layer holds incompressible files too, such as gzipped docs: a checkpoint stored blocks follow needs no window there either.)
    expect(inText.filter((i) => i > 0 && index.spans[i]!.checkpoint.window !== EMPTY_WINDOW).length).to.be.greaterThan(inText.length / 2);
    // The noise: spans of ~2 MiB of the blob too, but no window (stored blocks follow each checkpoint): the index stays small.
    expect(inNoise.length).to.be.at.least(3);
    for (const i of inNoise) {
      expect(compressed(i), `span ${i}`).to.be.within(DEFAULT_SPAN_OUT_BYTES, DEFAULT_SPAN_BYTES);
      expect(index.spans[i]!.checkpoint.window, `span ${i}`).to.equal(EMPTY_WINDOW);
    }
  });

  it('follows a span across gzip members', async () => {
    const { blob } = await corpusLayer();
    const tar = gunzipSync(blob);
    const cuts = [0, 1_234_567, 5_000_001, tar.length];
    const multi = Buffer.concat(cuts.slice(1).map((end, i) => gzipSync(tar.subarray(cuts[i], end))));
    const index = await buildGzipIndex(chunks(multi, 65_536), 'multi-member', { spanBytes: 1024 * 1024 });
    expect(index.layer.diffId).to.equal(sha256(tar));
    await checkSpans(index, multi, tar);
  });

  it('gives other bytes (caught by the span digest), or fails, for a corrupted range; never the original bytes silently', async () => {
    const { blob } = await corpusLayer();
    const index = await buildGzipIndex(chunks(blob, 1 << 20), 'corpus layer', { spanBytes: 512 * 1024 });
    const span = index.spans[3]!;
    const bad = Buffer.from(blob.subarray(spanFetchStart(span), span.end));
    bad[Math.floor(bad.length / 2)]! ^= 0x55;
    let outcome: string;
    try {
      outcome = sha256(await inflateSpan(span.checkpoint, span.length, bad, 'corrupt')) === span.digest ? 'verified' : 'mismatch';
    } catch {
      outcome = 'error';
    }
    expect(outcome).to.not.equal('verified');
  });

  it('refuses a blob that is not what was expected', async () => {
    const { blob } = await corpusLayer();
    let error: unknown;
    try {
      await buildGzipIndex(chunks(blob, 1 << 20), 'corpus layer', { expected: { size: blob.length + 1 } });
    } catch (err) {
      error = err;
    }
    expect((error as { code?: string }).code).to.equal('EDIGEST');
  });
});
