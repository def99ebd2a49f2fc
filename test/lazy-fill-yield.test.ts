/**
 * The background fill yields to on-demand reads (storage/lazy/readDemand.ts):
 * a serving process's ReadDemandSignal closes the daemon's ReadDemandGate
 * through a real directory watch, the gate bounds its pauses, and a blob
 * download given the gate drops its answer when it closes and resumes with
 * Range once it opens — with the same bytes in the end.
 */
import { expect } from 'chai';
import { createHash } from 'node:crypto';
import http from 'node:http';
import { mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { type Digest } from '../storage/digest.js';
import { LazyLayerSource } from '../storage/lazy/lazyLayer.js';
import { ReadDemandGate, ReadDemandSignal } from '../storage/lazy/readDemand.js';
import { RegistryClient } from '../storage/registry/client.js';
import { ResumableBlobStream } from '../storage/registry/download.js';
import { waitFor } from './support/daemon.js';
import { scratch } from './support/env.js';

// The quiet time is four heartbeats: a loaded machine may delay one or two of them.
const TIMING = { quietMs: 1_000, maxPauseMs: 3_000, minRunMs: 1_200 };

describe('lazy fill yields to on-demand reads', function () {
  this.timeout(60_000);
  let work: { dir: string; remove(): Promise<void> };
  const gates: ReadDemandGate[] = [];

  beforeEach(async () => { work = await scratch('layerd-yield-'); });
  afterEach(async () => {
    for (const g of gates.splice(0)) g.stop();
    await work.remove();
  });

  async function startGate(dir: string, timing = TIMING): Promise<ReadDemandGate> {
    const gate = new ReadDemandGate(dir, timing);
    gates.push(gate);
    await gate.start();
    return gate;
  }

  it('closes while a read waits, stays closed while it does, opens once reads were quiet; removes files of dead processes', async () => {
    const dir = join(work.dir, 'demand');
    const gate0 = await startGate(dir);
    gate0.stop();
    await writeFile(join(dir, '999999999'), 'x'); // no such process
    const gate = await startGate(dir, { ...TIMING, maxPauseMs: 600_000 });
    expect(await readdir(dir)).to.deep.equal([]);
    expect(gate.open).to.equal(true);

    const signal = ReadDemandSignal.for(dir);
    const end = signal.begin();
    await waitFor('the gate to close', () => !gate.open, 10_000, 10);
    const closedAt = Date.now();
    // Heartbeats keep it closed past the quiet time.
    const pausesBefore = gate.stats.pauses;
    await waitFor('three times the quiet time', async () => Date.now() - closedAt > TIMING.quietMs * 3, 10_000, 50);
    expect(gate.open, 'closed while the read waits').to.equal(false);
    expect(gate.stats.pauses, 'one pause all along').to.equal(pausesBefore);
    end();
    const ended = Date.now();
    await waitFor('the gate to open', () => gate.open, 10_000, 10);
    expect(Date.now() - ended).to.be.at.least(TIMING.quietMs - 50);
    expect(gate.stats.pauses).to.equal(1);
    expect(await readdir(dir)).to.deep.equal([String(process.pid)]);
  });

  it('closes when a serving process opens a lazy layer (its reads are about to come), and opens once it was quiet', async () => {
    const diffId = `sha256:${createHash('sha256').update('a lazy layer').digest('hex')}` as Digest;
    const dir = join(work.dir, 'lazy', 'sha256', diffId.slice(7));
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'index.json'), JSON.stringify({ version: 1, id: diffId, entries: [], whiteouts: [], opaques: [] }));
    await writeFile(join(dir, 'lazy.json'), JSON.stringify({
      version: 1, diffId, registry: '127.0.0.1:9', repository: 'r', blobDigest: diffId, blobSize: 0, mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip',
      tocDigest: diffId, contentSize: 0, files: [],
    }));
    await writeFile(join(dir, 'content'), '');
    const gate = await startGate(join(work.dir, 'lazy', 'demand'));
    const source = await LazyLayerSource.open(dir);
    try {
      await waitFor('the gate to close', () => !gate.open, 10_000, 10);
      const closed = Date.now();
      await waitFor('the gate to open', () => gate.open, 10_000, 10);
      expect(Date.now() - closed).to.be.at.least(TIMING.quietMs - 100);
    } finally {
      await source.close();
    }
  });

  it('closes when the daemon expects reads (a container created on lazy layers), and opens once it was quiet', async () => {
    const gate = await startGate(join(work.dir, 'demand'));
    gate.expectReads();
    expect(gate.open).to.equal(false);
    const closed = Date.now();
    await waitFor('the gate to open', () => gate.open, 10_000, 10);
    expect(Date.now() - closed).to.be.at.least(TIMING.quietMs - 50);
  });

  it('pauses at most maxPauseMs at a time, then runs at least minRunMs, while reads never stop', async () => {
    const dir = join(work.dir, 'demand');
    const gate = await startGate(dir);
    const end = ReadDemandSignal.for(dir).begin();
    try {
      await waitFor('the gate to close', () => !gate.open, 10_000, 10);
      const closed = Date.now();
      await waitFor('the gate to open after the longest pause', () => gate.open, 10_000, 10);
      const opened = Date.now();
      expect(opened - closed).to.be.at.least(TIMING.maxPauseMs - 50);
      await waitFor('the gate to close again', () => !gate.open, 10_000, 10);
      expect(Date.now() - opened).to.be.at.least(TIMING.minRunMs - 50);
    } finally {
      end();
    }
  });

  it('a download drops its answer when the gate closes and fetches the rest with Range once it opens: the same bytes', async () => {
    const blob = Buffer.alloc(4 * 1024 * 1024);
    for (let i = 0; i < blob.length; i++) blob[i] = (i * 131 + (i >> 12)) & 0xff;
    const digest = `sha256:${createHash('sha256').update(blob).digest('hex')}` as const;
    const dir = join(work.dir, 'demand');
    const gate = await startGate(dir);
    let releaseFirst: () => void = () => undefined;
    const firstHeld = new Promise<void>((resolve) => { releaseFirst = resolve; });
    let firstClosedEarly: () => void = () => undefined;
    const firstClosed = new Promise<void>((resolve) => { firstClosedEarly = resolve; });
    const requests: { range: string | undefined; gateOpen: boolean }[] = [];
    const server = http.createServer((req, res) => {
      const n = requests.push({ range: req.headers.range, gateOpen: gate.open });
      const from = Number(/^bytes=(\d+)-$/.exec(req.headers.range ?? '')?.[1] ?? 0);
      res.writeHead(from > 0 ? 206 : 200, {
        'content-length': String(blob.length - from),
        ...(from > 0 ? { 'content-range': `bytes ${from}-${blob.length - 1}/${blob.length}` } : {}),
      });
      if (n === 1) {
        // The first answer: a quarter, then held until the test lets it go on.
        res.write(blob.subarray(0, blob.length / 4));
        res.on('close', () => { if (!res.writableFinished) firstClosedEarly(); });
        void firstHeld.then(() => { if (!res.destroyed) res.end(blob.subarray(blob.length / 4)); });
      } else res.end(blob.subarray(from));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const client = new RegistryClient({ registry: `127.0.0.1:${port}`, baseUrl: `http://127.0.0.1:${port}`, mirror: false });
    try {
      const stream = new ResumableBlobStream([client], 'r', digest, [], gate);
      const parts: Buffer[] = [];
      let received = 0;
      const done = new Promise<void>((resolve, reject) => {
        stream.on('data', (c: Buffer) => { parts.push(c); received += c.length; });
        stream.on('end', resolve);
        stream.on('error', reject);
      });
      await waitFor('the first quarter', () => received >= blob.length / 4, 10_000, 10);
      const end = ReadDemandSignal.for(dir).begin();
      // the download lets go of its answer when the gate closes
      await Promise.race([firstClosed, sleep(20_000).then(() => { throw new Error('the download kept its answer with the gate closed'); })]);
      expect(gate.open).to.equal(false);
      releaseFirst();
      end();
      await done;
      expect(Buffer.concat(parts).equals(blob), 'the same bytes').to.equal(true);
      expect(requests).to.have.length(2);
      expect(requests[1]!.gateOpen, 'no request while the gate is closed').to.equal(true);
      expect(requests[1]!.range).to.equal(`bytes=${blob.length / 4}-`);
    } finally {
      releaseFirst();
      client.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});
