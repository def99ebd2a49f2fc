/**
 * The image of the lazy-pull benchmark: debian-multi's first three real
 * Debian layers (l3-whiteouts: containerd cannot unpack layer 4, see
 * docs/containerd.md) plus a fourth layer of FILLER_FILES incompressible files
 * (AES-CTR keystream, fixed key) under opt/filler/ that the benchmark's
 * command never reads, as an OCI layout in one of two forms:
 *
 *  - `estargz`: eStargz layers (test/support/estargz.ts) with the given chunk size;
 *  - `gzip`: unmodified gzip layers — debian-multi's own blobs for the first
 *    three (as Debian's tools made them), the filler layer gzipped by node —
 *    served lazily through their gzip index (the benchmark publishes it).
 *
 * Built once and cached under $LAYERD_BENCH_CACHE (default
 * /var/tmp/layerd-bench-lazy)/v<VERSION>-c<chunk size> or gz<VERSION>; a run
 * that finds the cache complete reuses it. Bump LAZY_IMAGE_VERSION whenever
 * the content changes.
 */
import { createCipheriv } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { gzip } from 'node:zlib';
import tarStream from 'tar-stream';
import { writeEstargzLayout } from '../test/support/estargz.js';
import { writeLayout } from '../test/support/layoutBuilder.js';
import { DEBIAN_MULTI, layerctlJson } from '../test/support/env.js';

export const LAZY_IMAGE_VERSION = 2;
const FILLER_FILES = 8;
const FILLER_BYTES = 32 * 1024 * 1024;
const MTIME = new Date(1_700_000_000_000);

export interface LazyImage {
  layout: string;
  /** Compressed bytes of the layers (what a full pull downloads). */
  layerBytes: number;
  layers: number;
}

function keystream(index: number, length: number): Buffer {
  const iv = Buffer.alloc(16);
  iv.writeUInt32BE(index, 0);
  return createCipheriv('aes-128-ctr', Buffer.alloc(16, 0x16), iv).update(Buffer.alloc(length));
}

async function fillerTar(): Promise<Buffer> {
  const pack = tarStream.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c: Buffer) => chunks.push(c));
  const done = new Promise<void>((resolve, reject) => { pack.on('end', resolve); pack.on('error', reject); });
  for (const name of ['opt/', 'opt/filler/']) pack.entry({ name, type: 'directory', mode: 0o755, mtime: MTIME });
  for (let i = 0; i < FILLER_FILES; i++) {
    pack.entry({ name: `opt/filler/blob-${String(i).padStart(2, '0')}.bin`, type: 'file', mode: 0o644, mtime: MTIME }, keystream(i, FILLER_BYTES));
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

async function summary(layout: string): Promise<LazyImage> {
  const index = JSON.parse(await readFile(join(layout, 'index.json'), 'utf8')) as { manifests: { digest: string }[] };
  const manifest = JSON.parse(await readFile(join(layout, 'blobs', 'sha256', index.manifests[0]!.digest.slice(7)), 'utf8')) as { layers: { size: number }[] };
  return { layout, layerBytes: manifest.layers.reduce((n, l) => n + l.size, 0), layers: manifest.layers.length };
}

/** debian-multi's first three layer blobs as the corpus has them (gzip, made by Debian's tools). */
async function debianGzipBlobs(): Promise<Buffer[]> {
  const blob = (digest: string): Promise<Buffer> => readFile(join(DEBIAN_MULTI, 'blobs', 'sha256', digest.slice(7)));
  const index = JSON.parse(await readFile(join(DEBIAN_MULTI, 'index.json'), 'utf8')) as { manifests: { digest: string; annotations?: Record<string, string> }[] };
  const l3 = index.manifests.find((m) => m.annotations?.['org.opencontainers.image.ref.name'] === 'l3-whiteouts');
  if (!l3) throw new Error(`${DEBIAN_MULTI} has no l3-whiteouts`);
  const manifest = JSON.parse((await blob(l3.digest)).toString('utf8')) as { layers: { digest: string }[] };
  return Promise.all(manifest.layers.map((l) => blob(l.digest)));
}

export type LazyImageFormat = 'estargz' | 'gzip';

/** The cached layout, built first if it is not there. */
export async function lazyBenchImage(chunkSize: number, format: LazyImageFormat = 'estargz'): Promise<LazyImage> {
  const base = process.env['LAYERD_BENCH_CACHE'] ?? '/var/tmp/layerd-bench-lazy';
  const dir = join(base, format === 'estargz' ? `v${LAZY_IMAGE_VERSION}-c${chunkSize}` : `gz${LAZY_IMAGE_VERSION}`);
  if (existsSync(join(dir, 'COMPLETE'))) return summary(join(dir, 'layout'));
  await rm(dir, { recursive: true, force: true });
  await mkdir(base, { recursive: true });
  const building = await mkdtemp(`${dir}.building-`);
  try {
    if (format === 'gzip') {
      const blobs = await debianGzipBlobs();
      blobs.push(await promisify(gzip)(await fillerTar()));
      await writeLayout(join(building, 'layout'), { layers: blobs });
    } else {
      // debian-multi's layer tars, as a store keeps them.
      const src = join(building, 'store');
      await layerctlJson(['--root', src, 'import', DEBIAN_MULTI]);
      const info = await layerctlJson<{ RootFS: { Layers: string[] } }>(['--root', src, 'inspect', 'debian-multi:latest']);
      const tars: Buffer[] = await Promise.all(info.RootFS.Layers.slice(0, 3).map((d) => readFile(join(src, 'layers', 'sha256', d.slice(7), 'layer.tar'))));
      tars.push(await fillerTar());
      await writeEstargzLayout(join(building, 'layout'), tars, chunkSize);
      await rm(src, { recursive: true, force: true });
    }
    await writeFile(join(building, 'COMPLETE'), `${new Date().toISOString()}\n`);
    await rename(building, dir);
  } catch (err) {
    await rm(building, { recursive: true, force: true });
    throw err;
  }
  await stat(join(dir, 'COMPLETE'));
  return summary(join(dir, 'layout'));
}
