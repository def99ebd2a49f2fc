/**
 * A lazily pulled file becomes a content-addressed object (storage/objectStore.ts)
 * on its first open once every chunk of it is fetched and verified, so a lazy
 * layer's big files pass through (FUSE passthrough) as a stored layer's do.
 * The image is eStargz (test/support/estargz.ts, 64 KiB chunks) in a real
 * registry (docker-registry 2.8.2 on 127.0.0.1); the object is named by the
 * file's TOC digest. The server's operation counts (--stats-file) show which
 * way data went. Files on mounts are read by child processes only. Needs
 * root and Linux 6.9+ (passthrough).
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { type OpStatsSnapshot } from '../mount/opStats.js';
import { collectGarbage } from '../storage/gc.js';
import { listObjects, objectRelPath } from '../storage/objectStore.js';
import { Store } from '../storage/store.js';
import { mustRun, startLayerdServer, stopLayerdServer } from './fixtures/mount/harness.js';
import { waitFor } from './support/daemon.js';
import { execFileAsync, scratch } from './support/env.js';
import { writeEstargzLayout } from './support/estargz.js';
import { TestRegistry, layerctlR } from './support/registry.js';
import { dataDirTar } from './support/smallTar.js';

const sha = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

describe('lazy pull: a fetched file becomes a content-addressed object (passthrough)', function () {
  this.timeout(180_000);
  const big = randomBytes(1 << 20); // 16 chunks
  const unread = randomBytes(512 * 1024);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let root: string;
  let ref: string;
  const mnt = (): string => join(work.dir, 'mnt');
  const statsFile = (): string => join(work.dir, 'stats.json');
  let server: ChildProcess | undefined;

  const mount = async (): Promise<void> => {
    await rm(statsFile(), { force: true }); // counts of this mount only
    server = await startLayerdServer(['--root', root, '--image', ref, '--upper', join(work.dir, 'upper'), '--stats-file', statsFile()], mnt(),
      { ...process.env, LAYERD_FUSE_PASSTHROUGH: '1' });
  };
  /** Unmount; the server writes its final counts as it exits. */
  const unmountCounts = async (): Promise<Record<string, number>> => {
    await stopLayerdServer(server!, mnt());
    server = undefined;
    const snap = JSON.parse(await readFile(statsFile(), 'utf8')) as OpStatsSnapshot;
    return Object.fromEntries(Object.entries(snap).map(([op, c]) => [op, c.count]));
  };
  const shaOnMount = async (path: string): Promise<string> => `sha256:${(await mustRun('sha256sum', [join(mnt(), path)])).split(' ')[0]}`;

  before(async () => {
    work = await scratch('layerd-lazy-objects-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    const layout = join(work.dir, 'layout');
    await writeEstargzLayout(layout, [await dataDirTar([{ path: 'data/big.bin', bytes: big }, { path: 'data/unread.bin', bytes: unread }])], 64 * 1024);
    ref = `${registry.host}/lazy/objects:v1`;
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', '--preserve-digests', `oci:${layout}:latest`, `docker://${ref}`]);
    root = join(work.dir, 'store');
    const pulled = await layerctlR(['--root', root, 'pull', '--lazy', ref, '--json']);
    expect(pulled.code, pulled.stderr).to.equal(0);
    expect((JSON.parse(pulled.stdout) as { lazyLayers: string[] }).lazyLayers).to.have.length(1);
    await mkdir(mnt());
    await mkdir(join(work.dir, 'upper'));
  });

  after(async () => {
    if (server) await stopLayerdServer(server, mnt()).catch(() => undefined);
    await registry?.stop();
    await work?.remove();
  });

  it('is made on the first open after all its chunks were fetched, then its reads pass through; a file not read has none', async () => {
    await mount();
    expect(await shaOnMount('data/big.bin')).to.equal(sha(big)); // fetched chunk by chunk: no object yet (nothing to copy from)
    expect(listObjects(root)).to.deep.equal([]);
    expect(await shaOnMount('data/big.bin')).to.equal(sha(big)); // every chunk here and verified: this open makes the object
    await waitFor('the object of data/big.bin', () => listObjects(root).includes(sha(big)), 60_000); // one syncfs: slow on a busy disk
    expect(sha(await readFile(join(root, objectRelPath(sha(big))!)))).to.equal(sha(big));
    await unmountCounts();

    // A fresh mount host: nothing verified in this process yet, and nothing in the page cache; the object serves the file.
    await mount();
    expect(await shaOnMount('data/big.bin')).to.equal(sha(big));
    expect((await unmountCounts())['read'] ?? 0, 'reads of data/big.bin served by layerd').to.equal(0);
    expect(listObjects(root), 'only the file read').to.deep.equal([sha(big)]);
  });

  it('is kept by GC while the lazy layer names it', async () => {
    expect(listObjects(root)).to.include(sha(big));
    const store = await Store.open(root, { durability: 'none' });
    try {
      const result = await collectGarbage(store);
      expect(result.objects).to.equal(0);
    } finally {
      store.close();
    }
    expect(listObjects(root)).to.include(sha(big));
  });
});
