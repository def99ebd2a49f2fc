/**
 * Lazy pull of unmodified gzip images through their gzip index (issue 16),
 * against a real registry (Debian's docker-registry 2.8.2 on 127.0.0.1,
 * which has no referrers API: the `sha256-<hex>` tag schema is used).
 *
 * debian-multi, pushed unchanged with skopeo, is indexed with `layerctl
 * index`; the artifact is read back with Debian's skopeo; `pull --lazy` finds
 * it and serves the bytes of a full pull, span by span; a relay that
 * corrupts range answers gives EIO, never wrong bytes, and so does a registry
 * that is gone (within the bound; reads work again once it is back); `layerctl push`
 * publishes the index itself, and the daemon's background fill completes
 * such a lazy layer into an ordinary stored one; the fill downloads only
 * what reads did not fetch already.
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, open, readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { type Digest } from '../storage/digest.js';
import { publishGzipIndexes } from '../storage/lazy/gzipArtifact.js';
import { type GzipIndex, parseGzipIndex, spanFetchStart } from '../storage/lazy/gzipIndex.js';
import { RegistryClient } from '../storage/registry/client.js';
import { EMPTY_CONFIG, endpointsFor } from '../storage/registry/config.js';
import { DEBIAN_MULTI, execFileAsync, layerctl, layerctlJson, scratch } from './support/env.js';
import { lazyAllocated, lazyStats, prng, readRange, walk } from './support/treeSample.js';
import { startDaemon, waitFor, type RunningDaemon } from './support/daemon.js';
import { writeLayout } from './support/layoutBuilder.js';
import { TestRegistry, layerctlR, startProxy } from './support/registry.js';
import { startLayerdServer, stopLayerdServer } from './fixtures/mount/harness.js';

interface LazyPulled { images: { id: string; refs: string[] }[]; lazyLayers: string[]; fallback?: string; gzipIndex?: string }
interface Indexed { ref: string; manifest: string; artifact?: string; layers: { digest: string; spans: number; tarSize: number }[] }
interface Inspect { Id: string; Layers: { diffId: string; digest: string | null; uncompressedSize: number; entries: number; state: string }[] }
interface OciDoc { artifactType?: string; subject?: { digest: string }; config?: { mediaType: string }; layers?: { mediaType: string; annotations?: Record<string, string> }[]; manifests?: { digest: string; artifactType?: string }[] }

const ARTIFACT_TYPE = 'application/vnd.layerd.gzip-index.v1';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';

async function skopeoRaw(ref: string): Promise<OciDoc> {
  const { stdout } = await execFileAsync('skopeo', ['inspect', '--tls-verify=false', '--raw', `docker://${ref}`]);
  return JSON.parse(stdout) as OciDoc;
}

describe('lazy pull of unmodified gzip images by their gzip index (docker-registry 2.8.2)', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let ref: string;
  let fullRoot: string;
  let fullTree: Awaited<ReturnType<typeof walk>>;
  let fullInspect: Inspect;
  let indexed: Indexed;
  const servers: { child: ChildProcess; mnt: string }[] = [];
  const fullMnt = (): string => join(work.dir, 'mnt-full');

  async function mountImage(root: string, image: string, name: string, env: NodeJS.ProcessEnv = {}): Promise<string> {
    const mnt = join(work.dir, `mnt-${name}`);
    const upper = join(work.dir, `upper-${name}`);
    await mkdir(mnt, { recursive: true });
    await mkdir(upper, { recursive: true });
    const child = await startLayerdServer(['--root', root, '--image', image, '--upper', upper], mnt, { ...process.env, ...env });
    servers.push({ child, mnt });
    return mnt;
  }

  async function registryGet(path: string, accept?: string): Promise<Buffer> {
    const res = await fetch(`http://${registry.host}/v2/${path}`, accept ? { headers: { accept } } : {});
    expect(res.status, path).to.equal(200);
    return Buffer.from(await res.arrayBuffer());
  }

  async function lazyPull(root: string, reference: string): Promise<LazyPulled> {
    const r = await layerctlR(['--root', root, 'pull', '--lazy', reference, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    return JSON.parse(r.stdout) as LazyPulled;
  }

  before(async () => {
    work = await scratch('layerd-lazygz-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    ref = `${registry.host}/gz/dm:v1`;
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', `oci:${DEBIAN_MULTI}:latest`, `docker://${ref}`]);
    fullRoot = join(work.dir, 'full');
    const pulled = await layerctlR(['--root', fullRoot, 'pull', ref]);
    expect(pulled.code, pulled.stderr).to.equal(0);
    fullInspect = await layerctlJson<Inspect>(['--root', fullRoot, 'inspect', ref]);
    await mountImage(fullRoot, ref, 'full');
    fullTree = await walk(fullMnt());
    const r = await layerctlR(['index', ref, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    indexed = JSON.parse(r.stdout) as Indexed;
  });

  after(async () => {
    for (const s of servers.reverse()) await stopLayerdServer(s.child, s.mnt).catch(() => undefined);
    await registry?.stop();
    await work?.remove();
  });

  it('without an index, pull --lazy pulls in full and says why', async () => {
    const plainRef = `${registry.host}/gz/plain:v1`;
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', `oci:${DEBIAN_MULTI}:latest`, `docker://${plainRef}`]);
    const r = await layerctlR(['--root', join(work.dir, 'no-index'), 'pull', '--lazy', plainRef, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const result = JSON.parse(r.stdout) as LazyPulled;
    expect(result.lazyLayers).to.deep.equal([]);
    expect(result.fallback).to.match(/no gzip index .*pulled in full/);
  });

  it('layerctl index publishes an artifact skopeo reads, listed by the sha256-<hex> referrers tag', async () => {
    expect(indexed.manifest).to.equal(fullInspect.Id);
    expect(indexed.layers).to.have.length(4);
    expect(indexed.artifact).to.match(/^sha256:[0-9a-f]{64}$/);
    const repo = `${registry.host}/gz/dm`;
    // What skopeo reads by the artifact's digest is the artifact (skopeo inspect without --raw refuses any
    // non-image artifact: "unsupported image-specific operation"); skopeo copy fetches and verifies its blobs.
    const { stdout } = await execFileAsync('skopeo', ['inspect', '--tls-verify=false', '--raw', `docker://${repo}@${indexed.artifact!}`]);
    expect(`sha256:${createHash('sha256').update(stdout).digest('hex')}`).to.equal(indexed.artifact);
    const copy = join(work.dir, 'artifact-copy');
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--src-tls-verify=false', `docker://${repo}@${indexed.artifact!}`, `oci:${copy}:a`]);
    const copied = JSON.parse(await readFile(join(copy, 'index.json'), 'utf8')) as { manifests: { digest: string }[] };
    expect(copied.manifests.map((m) => m.digest)).to.deep.equal([indexed.artifact]);
    const artifact = JSON.parse(stdout) as OciDoc;
    expect(artifact.artifactType).to.equal(ARTIFACT_TYPE);
    expect(artifact.subject?.digest).to.equal(indexed.manifest);
    expect(artifact.config?.mediaType).to.equal('application/vnd.oci.empty.v1+json');
    expect(artifact.layers?.map((l) => l.annotations?.['org.layerd.gzip-index.layer'])).to.deep.equal(indexed.layers.map((l) => l.digest));
    const tag = await skopeoRaw(`${repo}:sha256-${indexed.manifest.slice(7)}`);
    expect(tag.manifests?.filter((m) => m.artifactType === ARTIFACT_TYPE).map((m) => m.digest)).to.deep.equal([indexed.artifact]);
    // Someone else's referrer in the tag's index (an entry naming an existing manifest: distribution checks).
    const tagUrl = `http://${registry.host}/v2/gz/dm/manifests/sha256-${indexed.manifest.slice(7)}`;
    const image = Buffer.from(await (await fetch(`http://${registry.host}/v2/gz/dm/manifests/v1`, { headers: { accept: OCI_MANIFEST } })).arrayBuffer());
    const foreign = { mediaType: OCI_MANIFEST, digest: indexed.manifest, size: image.length, artifactType: 'application/vnd.example.other' };
    const put = await fetch(tagUrl, { method: 'PUT', headers: { 'content-type': OCI_INDEX }, body: JSON.stringify({ ...tag, manifests: [foreign, ...tag.manifests!] }) });
    expect(put.status).to.equal(201);
    // Indexing again merges: the other referrer stays, ours is listed once.
    const again = await layerctlR(['index', ref, '--json']);
    expect(again.code, again.stderr).to.equal(0);
    const merged = await skopeoRaw(`${repo}:sha256-${indexed.manifest.slice(7)}`);
    expect(merged.manifests?.map((m) => [m.digest, m.artifactType])).to.deep.equal([[indexed.manifest, foreign.artifactType], [indexed.artifact, ARTIFACT_TYPE]]);
  });

  it('pull --lazy finds the index, mounts at once and serves the bytes of a full pull', async () => {
    const root = join(work.dir, 'lazy-read');
    const pulled = await lazyPull(root, ref);
    expect(pulled.fallback).to.equal(undefined);
    expect(pulled.gzipIndex).to.equal('referrers tag');
    expect(pulled.lazyLayers).to.have.length(4);
    const info = await layerctlJson<Inspect>(['--root', root, 'inspect', ref]);
    expect(info.Id).to.equal(fullInspect.Id);
    expect(info.Layers.map((l) => l.state)).to.deep.equal(['lazy', 'lazy', 'lazy', 'lazy']);
    const fsck = await layerctl(['--root', root, 'fsck']);
    expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    expect(await lazyAllocated(root)).to.equal(0);

    const mnt = await mountImage(root, ref, 'lazy-read');
    const tree = await walk(mnt);
    expect(tree.listing).to.deep.equal(fullTree.listing);
    // What may be fetched: the spans a read covers (its range and the kernel's read-ahead in the file, up to 1 MiB
    // past it), and the span after each (the background prefetch), in the layer that serves the file (the topmost naming it).
    const artifact = JSON.parse((await registryGet(`gz/dm/manifests/${indexed.artifact!}`, OCI_MANIFEST)).toString()) as { layers: { digest: string }[] };
    const byLayer = new Map((await Promise.all(artifact.layers.map(async (l) => parseGzipIndex(await registryGet(`gz/dm/blobs/${l.digest}`), l.digest))))
      .map((index) => [index.layer.digest as string, index]));
    const topFirst = fullInspect.Layers.map((l) => byLayer.get(l.digest ?? '')!).reverse();
    const mayFetch = new Map<GzipIndex, Set<number>>();
    const allow = (path: string, from: number, to: number): void => {
      const index = topFirst.find((i) => i.index.entries.some((e) => e.path.replace(/^\/+/, '') === path));
      const entry = index?.index.entries.find((e) => e.path.replace(/^\/+/, '') === path && e.kind === 'file' && e.offset !== undefined);
      const spans = mayFetch.get(index!) ?? mayFetch.set(index!, new Set()).get(index!)!;
      index!.spans.forEach((span, k) => {
        const covers = entry === undefined || (span.checkpoint.out < entry.offset! + to && span.checkpoint.out + span.length > entry.offset! + from);
        if (covers) spans.add(k).add(k + 1); // (no entry of its own, a hard link: any span of its layer)
      });
    };
    const random = prng(1616);
    for (let i = 0; i < 40; i++) {
      const f = fullTree.files[Math.floor(random() * fullTree.files.length)]!;
      if (i % 2 === 0) {
        expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMnt(), f.path))), `/${f.path}`).to.equal(true);
        allow(f.path, 0, f.size);
      } else {
        const at = Math.floor(random() * f.size);
        const length = 1 + Math.floor(random() * Math.min(256 * 1024, f.size - at));
        expect((await readRange(join(mnt, f.path), at, length)).equals(await readRange(join(fullMnt(), f.path), at, length)), `/${f.path} [${at}, +${length})`).to.equal(true);
        allow(f.path, at, Math.min(f.size, at + length + (1 << 20)));
      }
    }
    // Spans, not layers: only those, and far less than the whole image.
    const total = fullInspect.Layers.reduce((n, l) => n + l.uncompressedSize, 0);
    const spanCount = [...mayFetch.values()].reduce((n, set) => n + set.size, 0);
    const bound = [...mayFetch].reduce((n, [index, set]) => n + [...set].reduce((m, k) => m + (index.spans[k]?.length ?? 0), 0), 0);
    const fetched = await lazyAllocated(root);
    expect(fetched).to.be.greaterThan(0);
    expect(fetched, `allocated, against ${spanCount} spans of ${bound} bytes`).to.be.at.most(bound + spanCount * 8192); // a block at each span's ends
    expect(fetched).to.be.lessThan(total * 0.75);
  });

  it('fetches the span after a read\'s own in the background: reading on through the tar then makes no range request', async () => {
    // The honest indexes as the registry has them: files lying wholly inside span 3 and span 4 of the biggest layer,
    // named by no other layer (so the mount reads them from that layer).
    const artifact = JSON.parse((await registryGet(`gz/dm/manifests/${indexed.artifact!}`, OCI_MANIFEST)).toString()) as { layers: { digest: string }[] };
    const indexes = await Promise.all(artifact.layers.map(async (l) => parseGzipIndex(await registryGet(`gz/dm/blobs/${l.digest}`), l.digest)));
    const biggest = [...indexes].sort((a, b) => b.spans.length - a.spans.length)[0]!;
    expect(biggest.spans.length, 'spans of the biggest layer').to.be.at.least(6);
    const elsewhere = new Set(indexes.filter((i) => i !== biggest).flatMap((i) => i.index.entries.map((e) => e.path)));
    const listed = new Map(fullTree.files.map((f) => [f.path, f.size]));
    const inSpan = (k: number): string => {
      const span = biggest.spans[k]!;
      const file = biggest.index.entries.find((e) => e.kind === 'file' && e.size > 0 && e.offset !== undefined && !elsewhere.has(e.path)
        && e.offset >= span.checkpoint.out && e.offset + e.size <= span.checkpoint.out + span.length
        && listed.get(e.path.replace(/^\/+/, '')) === e.size);
      expect(file, `a file inside span ${k}`).to.not.equal(undefined);
      return file!.path.replace(/^\/+/, '');
    };
    const [a, b] = [inSpan(3), inSpan(4)];
    const spanStart = (k: number): number => spanFetchStart(biggest.spans[k]!);
    /** Where each range request for the biggest layer's blob starts, in order. */
    const starts: number[] = [];
    const proxy = await startProxy(registry.host, {
      intercept: (req) => {
        const at = /^bytes=(\d+)-/.exec(req.headers.range ?? '')?.[1];
        if (at !== undefined && req.url?.endsWith(`/blobs/${biggest.layer.digest}`)) starts.push(Number(at));
        return false;
      },
    });
    try {
      const root = join(work.dir, 'lazy-next-span');
      const pulled = await lazyPull(root, `${proxy.host}/gz/dm:v1`);
      const mnt = await mountImage(root, pulled.images[0]!.refs[0]!, 'next-span');
      expect((await readFile(join(mnt, a))).equals(await readFile(join(fullMnt(), a))), `/${a}`).to.equal(true);
      await waitFor('the next span, prefetched', async () => (await lazyStats(root)).prefetchedChunks >= 1, 60_000);
      expect(starts, 'the read\'s own span, then the next one in the background').to.deep.equal([spanStart(3), spanStart(4)]);
      expect((await readFile(join(mnt, b))).equals(await readFile(join(fullMnt(), b))), `/${b}`).to.equal(true);
      // Reading into the prefetched span moves the prefetch on (span 5); span 4 is not asked for again.
      await waitFor('the span after that, asked for', () => starts.length >= 3, 60_000);
      expect(starts).to.deep.equal([spanStart(3), spanStart(4), spanStart(5)]);
    } finally {
      await proxy.close();
    }
  });

  /** The blob ranges a lazy layer's serving processes kept for the fill (its `fetched` file), merged. */
  async function keptRanges(root: string, diffId: string): Promise<[number, number][]> {
    const text = await readFile(join(root, 'lazy', 'sha256', diffId.slice(7), 'fetched'), 'utf8').catch(() => '');
    const ranges = text.split('\n').filter((l) => l !== '').map((l) => l.split(' ').map(Number) as [number, number]).sort((a, b) => a[0] - b[0]);
    const merged: [number, number][] = [];
    for (const [a, b] of ranges) {
      const last = merged.at(-1);
      if (last && a <= last[1]) last[1] = Math.max(last[1], b);
      else merged.push([a, b]);
    }
    return merged;
  }

  it('the fill downloads only what reads did not fetch: the gaps between the kept ranges, and falls back to the whole blob if kept bytes are wrong', async () => {
    /** Blob bytes the registry sent, per layer blob digest, and the Range headers asked. */
    const sent = new Map<string, { bytes: number; ranges: string[] }>();
    const layerDigests = new Set(fullInspect.Layers.map((l) => l.digest!));
    const counted = (req: { url?: string }): string | undefined => [...layerDigests].find((d) => req.url?.endsWith(`/blobs/${d}`));
    const proxy = await startProxy(registry.host, {
      intercept: (req) => {
        const d = counted(req);
        if (d !== undefined && req.method === 'GET') (sent.get(d) ?? sent.set(d, { bytes: 0, ranges: [] }).get(d)!).ranges.push(req.headers.range ?? '');
        return false;
      },
      mapChunk: (req, chunk) => {
        const d = counted(req);
        if (d !== undefined) sent.get(d)!.bytes += chunk.length;
        return chunk;
      },
    });
    try {
      for (const corruptKept of [false, true]) {
        sent.clear();
        const root = join(work.dir, `lazy-kept-${corruptKept}`);
        const pulled = await lazyPull(root, `${proxy.host}/gz/dm:v1`);
        const mnt = await mountImage(root, pulled.images[0]!.refs[0]!, `kept-${corruptKept}`);
        const random = prng(4242);
        for (let i = 0; i < 12; i++) {
          const f = fullTree.files[Math.floor(random() * fullTree.files.length)]!;
          expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMnt(), f.path))), `/${f.path}`).to.equal(true);
        }
        // Every range the reads (and their prefetch) fetched is kept, once the mount host recorded it.
        const askedByReads = new Map([...sent].map(([d, s]) => [d, s.ranges.map((r) => /^bytes=(\d+)-(\d+)$/.exec(r)!).map((m) => [Number(m[1]), Number(m[2]) + 1] as [number, number])]));
        const byDigest = new Map(fullInspect.Layers.map((l) => [l.digest!, l]));
        await waitFor('the fetched ranges recorded', async () => {
          for (const [d, asked] of askedByReads) {
            const kept = await keptRanges(root, byDigest.get(d)!.diffId);
            if (!asked.every(([a, b]) => kept.some(([x, y]) => x <= a && b <= y))) return false;
          }
          return true;
        }, 30_000);
        // The mount host gone (no prefetch under way), what it kept is what the fill finds.
        const server = servers.findIndex((x) => x.mnt === mnt);
        await stopLayerdServer(servers[server]!.child, mnt);
        servers.splice(server, 1);
        const kept = new Map(await Promise.all(fullInspect.Layers.map(async (l) => [l.digest!, await keptRanges(root, l.diffId)] as const)));
        const keptBytes = (d: string): number => kept.get(d)!.reduce((n, [a, b]) => n + b - a, 0);
        expect([...kept.values()].some((r) => r.length > 0), 'some ranges kept').to.equal(true);
        if (corruptKept) {
          // A kept byte that is wrong (as after a crash between writing it and the record): the blob does not verify
          // with it, so the fill downloads the whole blob once more; nothing unverified is stored.
          const [d, ranges] = [...kept].find(([, r]) => r.length > 0)!;
          const file = await open(join(root, 'lazy', 'sha256', byDigest.get(d)!.diffId.slice(7), 'blob'), 'r+');
          try {
            const at = ranges[0]![0] + 10;
            const byte = Buffer.alloc(1);
            await file.read(byte, 0, 1, at);
            byte[0] ^= 0xff;
            await file.write(byte, 0, 1, at);
          } finally {
            await file.close();
          }
        }
        sent.clear();
        const fill = await layerctlR(['--root', root, 'fill']);
        expect(fill.code, fill.stdout + fill.stderr).to.equal(0);
        const info = await layerctlJson<Inspect>(['--root', root, 'inspect', pulled.images[0]!.refs[0]!]);
        expect(info.Layers.map((l) => [l.diffId, l.state, l.uncompressedSize])).to.deep.equal(fullInspect.Layers.map((l) => [l.diffId, 'complete', l.uncompressedSize]));
        const fsck = await layerctl(['--root', root, 'fsck']);
        expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
        for (const l of fullInspect.Layers) {
          const got = sent.get(l.digest!)?.bytes ?? 0;
          const size = (await stat(join(fullRoot, 'blobs', 'sha256', l.digest!.slice(7)))).size;
          if (corruptKept && l.digest === [...kept].find(([, r]) => r.length > 0)![0]) {
            // Gaps until the wrong byte made the blob fail (at its end, or where it no longer inflates), then all of it.
            expect(got, `${l.digest}: gaps, then all of it`).to.be.within(size, size - keptBytes(l.digest!) + size);
          } else {
            expect(got, `${l.digest}: ${size} bytes, ${keptBytes(l.digest!)} kept`).to.equal(size - keptBytes(l.digest!));
          }
        }
      }
    } finally {
      await proxy.close();
    }
  });

  it('answers EIO, never wrong bytes, when a relay changes bytes of the ranges; serves them once it is honest', async () => {
    // One layer gzipped with stored (level-0) deflate blocks: a changed data byte still inflates,
    // to other bytes of the same length, so only the span digest can tell.
    const smallest = [...fullInspect.Layers].sort((a, b) => a.uncompressedSize - b.uncompressedSize).find((l) => l.uncompressedSize > 8 << 20)!;
    const tar = await readFile(join(fullRoot, 'layers', 'sha256', smallest.diffId.slice(7), 'layer.tar'));
    const layout = join(work.dir, 'stored-layout');
    await writeLayout(layout, { layers: [gzipSync(tar, { level: 0 })] });
    const storedRef = `${registry.host}/gz/stored:v1`;
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', `oci:${layout}:latest`, `docker://${storedRef}`]);
    const index = await layerctlR(['index', storedRef]);
    expect(index.code, index.stderr).to.equal(0);
    const fullStored = join(work.dir, 'stored-full');
    expect((await layerctlR(['--root', fullStored, 'pull', storedRef])).code).to.equal(0);
    const fullMntStored = await mountImage(fullStored, storedRef, 'stored-full');

    let corrupt = false;
    let corrupted = 0;
    const proxy = await startProxy(registry.host, {
      mapChunk: (req, chunk, offset) => {
        if (!corrupt || req.headers.range === undefined || !req.url?.includes('/blobs/') || offset > 1000 || offset + chunk.length <= 1000) return chunk;
        corrupted++;
        const bad = Buffer.from(chunk);
        bad[1000 - offset]! ^= 0x20; // past the block header (5 bytes) of the span's first stored block
        return bad;
      },
    });
    try {
      const root = join(work.dir, 'lazy-corrupt');
      const pulled = await lazyPull(root, `${proxy.host}/gz/stored:v1`);
      expect(pulled.lazyLayers).to.have.length(1);
      const mnt = await mountImage(root, pulled.images[0]!.refs[0]!, 'lazy-corrupt', { LAYERD_LAZY_READ_TIMEOUT_MS: '5000' });
      corrupt = true;
      // Files far apart (different spans, where there are several).
      const big = (await walk(fullMntStored)).files.filter((f) => f.size > 2000);
      const sample = [0, 1, 2, 3, 4].map((k) => big[Math.floor((k * big.length) / 5)]!);
      for (const f of sample) {
        const before = corrupted;
        let error: NodeJS.ErrnoException | undefined;
        try {
          await readFile(join(mnt, f.path));
        } catch (err) {
          error = err as NodeJS.ErrnoException;
        }
        expect(error?.code, `/${f.path}`).to.equal('EIO');
        // Refetched once after the first bad answer, then given up.
        expect(corrupted - before, `/${f.path}`).to.be.at.least(2);
      }
      corrupt = false;
      for (const f of sample) expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMntStored, f.path))), `/${f.path}`).to.equal(true);
    } finally {
      await proxy.close();
    }
  });

  it('fails a read with EIO within the bound while the registry is gone, and reads again once it is back', async () => {
    const root = join(work.dir, 'lazy-down');
    await lazyPull(root, ref);
    const mnt = await mountImage(root, ref, 'lazy-down', { LAYERD_LAZY_READ_TIMEOUT_MS: '3000' });
    // Nothing read yet, so nothing fetched: any file's bytes need the registry.
    const b = fullTree.files.filter((f) => f.size > 1000).at(-1)!;
    await registry.stop();
    try {
      const started = Date.now();
      let error: NodeJS.ErrnoException | undefined;
      try {
        await readFile(join(mnt, b.path));
      } catch (err) {
        error = err as NodeJS.ErrnoException;
      }
      expect(error?.code).to.equal('EIO');
      expect(Date.now() - started).to.be.lessThan(3000 + 5000);
      // The mount is alive: metadata needs no fetch.
      expect(await readdir(mnt)).to.include('etc');
      expect((await stat(join(mnt, b.path))).size).to.equal(b.size);
    } finally {
      await registry.restart();
    }
    expect((await readFile(join(mnt, b.path))).equals(await readFile(join(fullMnt(), b.path)))).to.equal(true);
  });

  it('layerctl push publishes the index; through the daemon the lazy layers serve reads and fill into ordinary stored layers', async () => {
    const pushedRef = `${registry.host}/gz/pushed:v1`;
    const push = await layerctlR(['--root', fullRoot, 'push', ref, pushedRef, '--json']);
    expect(push.code, push.stderr).to.equal(0);
    const result = JSON.parse(push.stdout) as { digest: string; gzipIndexes?: { manifest: string; artifact: string; layers: number }[] };
    expect(result.gzipIndexes).to.have.length(1);
    expect(result.gzipIndexes![0]).to.deep.include({ manifest: result.digest, layers: 4 });
    const tag = await skopeoRaw(`${registry.host}/gz/pushed:sha256-${result.digest.slice(7)}`);
    expect(tag.manifests?.map((m) => m.digest)).to.deep.equal([result.gzipIndexes![0]!.artifact]);

    const dir = join(work.dir, 'daemon');
    let daemon: RunningDaemon | undefined;
    let container: string | undefined;
    try {
      daemon = await startDaemon(dir);
      const socket = { LAYERD_SOCKET: daemon.socket };
      const pulled = await layerctl(['pull', '--lazy', pushedRef, '--json'], socket);
      expect(pulled.code, pulled.stderr).to.equal(0);
      expect((JSON.parse(pulled.stdout) as LazyPulled).lazyLayers).to.have.length(4);
      const created = await layerctl(['create', pushedRef, '--name', 'lazygz', '--json'], socket);
      expect(created.code, created.stderr).to.equal(0);
      container = 'lazygz';
      const mnt = (JSON.parse(created.stdout) as { mountpoint: string }).mountpoint;
      const random = prng(7);
      for (let i = 0; i < 10; i++) {
        const f = fullTree.files[Math.floor(random() * fullTree.files.length)]!;
        expect((await readFile(join(mnt, f.path))).equals(await readFile(join(fullMnt(), f.path))), `/${f.path}`).to.equal(true);
      }
      const inspect = async (): Promise<Inspect> => JSON.parse((await layerctl(['inspect', pushedRef], socket)).stdout) as Inspect;
      await waitFor('every layer complete', async () => (await inspect()).Layers.every((l) => l.state === 'complete'), 120_000, 250);
      const info = await inspect();
      expect(info.Layers.map(({ diffId, uncompressedSize, entries }) => ({ diffId, uncompressedSize, entries })))
        .to.deep.equal(fullInspect.Layers.map(({ diffId, uncompressedSize, entries }) => ({ diffId, uncompressedSize, entries })));
      const fsck = await layerctl(['fsck'], socket);
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    } finally {
      if (container && daemon) await layerctl(['rm', container], { LAYERD_SOCKET: daemon.socket });
      await daemon?.stop();
    }
  });

  it('a forged file table (a setuid bit the layer does not have) is caught by the fill: that layer is marked broken', async () => {
    const forgedRef = `${registry.host}/gz/forged:v1`;
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', `oci:${DEBIAN_MULTI}:latest`, `docker://${forgedRef}`]);
    // gz/dm's honest indexes, one entry of the first layer's file table changed, published for gz/forged.
    const get = async (path: string, accept?: string): Promise<Buffer> => {
      const res = await fetch(`http://${registry.host}/v2/${path}`, accept ? { headers: { accept } } : {});
      expect(res.status, path).to.equal(200);
      return Buffer.from(await res.arrayBuffer());
    };
    const artifact = JSON.parse((await get(`gz/dm/manifests/${indexed.artifact!}`, OCI_MANIFEST)).toString()) as { layers: { digest: string }[] };
    const indexes = await Promise.all(artifact.layers.map(async (l) => parseGzipIndex(await get(`gz/dm/blobs/${l.digest}`), l.digest)));
    const victim = indexes[0]!.index.entries.find((e) => e.kind === 'file' && e.size > 0)!;
    victim.mode |= 0o4000;
    const manifest = await get('gz/forged/manifests/v1', OCI_MANIFEST);
    const [endpoint] = await endpointsFor(EMPTY_CONFIG, registry.host, false);
    const client = new RegistryClient(endpoint!);
    const forgeDir = join(work.dir, 'forge');
    await mkdir(forgeDir);
    try {
      await publishGzipIndexes(client, 'gz/forged', { mediaType: OCI_MANIFEST, digest: indexed.manifest as Digest, size: manifest.length }, indexes, forgeDir);
    } finally {
      client.close();
    }

    const dir = join(work.dir, 'daemon-forged');
    let daemon: RunningDaemon | undefined;
    try {
      daemon = await startDaemon(dir);
      const socket = { LAYERD_SOCKET: daemon.socket };
      const pulled = await layerctl(['pull', '--lazy', forgedRef, '--json'], socket);
      expect(pulled.code, pulled.stderr).to.equal(0);
      expect((JSON.parse(pulled.stdout) as LazyPulled).lazyLayers).to.have.length(4);
      const inspect = async (): Promise<Inspect> => JSON.parse((await layerctl(['inspect', forgedRef], socket)).stdout) as Inspect;
      await waitFor('the forged layer broken, the others complete', async () => {
        const states = (await inspect()).Layers.map((l) => l.state);
        return states[0] === 'broken' && states.slice(1).every((s) => s === 'complete');
      }, 120_000, 250);
      const fsck = await layerctl(['fsck'], socket);
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(7);
      expect(fsck.stdout + fsck.stderr).to.match(/broken/);
    } finally {
      await daemon?.stop();
    }
  });
});
