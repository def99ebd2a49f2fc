/**
 * Disks and limits: a full disk, a decompression bomb and a dead ingest
 * that filled the disk, each on a small tmpfs store (unmounted after, even
 * on failure). A full disk is ENOSPC and loses nothing; a bomb stops at the
 * disk reserve or the expansion ratio with ELIMIT naming the limit; start-up
 * frees dead ingests before the database needs room.
 */
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { open, mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { importRawLayer } from '../storage/importer.js';
import { DEFAULT_INGEST_LIMITS } from '../storage/layerIngest.js';
import { Store } from '../storage/store.js';
import { http, startDaemon } from './support/daemon.js';
import { scratch } from './support/env.js';
import { smallTmpfs } from './support/store.js';
import { writeTar } from './support/tarBuilder.js';

const MiB = 1024 * 1024;

async function failure(promise: Promise<unknown>): Promise<LayerdError> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof LayerdError) return err;
    throw err;
  }
  throw new Error('expected the operation to fail');
}

/** Fill the filesystem holding `path` (a new file there) until the kernel says ENOSPC. */
async function fillDisk(path: string): Promise<void> {
  const handle = await open(path, 'wx');
  const chunk = Buffer.alloc(256 * 1024, 1);
  try {
    for (;;) await handle.write(chunk);
  } catch (err) {
    if ((err as { code?: string }).code !== 'ENOSPC') throw err;
  } finally {
    await handle.close();
  }
}

describe('storage: full disks and decompression bombs', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  let random8: string;
  let zeros32: string;
  let small: string;

  before(async () => {
    work = await scratch();
    random8 = join(work.dir, 'random8.tar.gz');
    await writeTar(random8, [{ header: { name: 'noise', type: 'file', size: 8 * MiB }, content: randomBytes(8 * MiB) }], { gzip: true });
    zeros32 = join(work.dir, 'zeros32.tar.gz');
    await writeTar(zeros32, [{ header: { name: 'zeros', type: 'file', size: 32 * MiB }, content: Buffer.alloc(32 * MiB) }], { gzip: true });
    small = join(work.dir, 'small.tar');
    await writeTar(small, [{ header: { name: 'hello', type: 'file', size: 6 }, content: 'hello\n' }]);
  });
  after(async () => { await work?.remove(); });

  it('a full disk fails an import with ENOSPC and leaves the store usable', async () => {
    const fs = await smallTmpfs(6 * MiB);
    try {
      const store = await Store.open(join(fs.dir, 'store'), { durability: 'none', diskReserveBytes: 0 });
      try {
        const err = await failure(importRawLayer(store, random8, 'big'));
        expect(err.code, err.message).to.equal(ErrorCodes.ENOSPC);
        expect(await readdir(store.layout.tmpDir), 'the failed ingest is removed').to.deep.equal([]);
        await importRawLayer(store, small, 'small');
        expect(store.db.listImages().map((i) => i.id)).to.have.length(1);
      } finally {
        store.close();
      }
    } finally {
      await fs.remove();
    }
  });

  it('the daemon answers a full disk with 507 ENOSPC and stays up', async () => {
    const dir = join(work.dir, 'daemon-full');
    await mkdir(dir);
    const fs = await smallTmpfs(6 * MiB);
    const config = join(dir, 'config.json');
    await writeFile(config, JSON.stringify({ diskReserveBytes: 0 }));
    // The store on the tmpfs (the later --root wins over startDaemon's DIR/root).
    const daemon = await startDaemon(dir, ['--config', config, '--root', join(fs.dir, 'store')]).catch(async (err: unknown) => { await fs.remove(); throw err; });
    try {
      const r = await http(daemon.socket, 'POST', '/v1/images/import', JSON.stringify({ path: random8, name: 'big', format: 'layer' }), { 'content-type': 'application/json' });
      expect(r.status, r.body).to.equal(507);
      expect(r.json<{ code: string }>().code).to.equal(ErrorCodes.ENOSPC);
      const upload = await http(daemon.socket, 'POST', '/v1/images/import?name=up&format=layer', await readFile(random8), { 'content-type': 'application/x-tar' });
      expect(upload.status, upload.body).to.equal(507);
      expect(upload.json<{ code: string }>().code).to.equal(ErrorCodes.ENOSPC);
      const health = await http(daemon.socket, 'GET', '/v1/health');
      expect(health.status).to.equal(200);
      const ok = await http(daemon.socket, 'POST', '/v1/images/import', JSON.stringify({ path: small, name: 'small', format: 'layer' }), { 'content-type': 'application/json' });
      expect(ok.status, ok.body).to.equal(200);
    } finally {
      await daemon.stop();
      await fs.remove();
    }
  });

  it('a decompression bomb stops at the disk reserve with ELIMIT', async () => {
    const fs = await smallTmpfs(24 * MiB);
    try {
      const store = await Store.open(join(fs.dir, 'store'), { durability: 'none', diskReserveBytes: 8 * MiB });
      try {
        const limits = { ...DEFAULT_INGEST_LIMITS, maxExpansionRatio: 1e9 };
        const err = await failure(importRawLayer(store, zeros32, 'bomb', { limits }));
        expect(err.code, err.message).to.equal(ErrorCodes.ELIMIT);
        expect(err.message).to.contain('diskReserveBytes');
        expect(await readdir(store.layout.tmpDir)).to.deep.equal([]);
      } finally {
        store.close();
      }
    } finally {
      await fs.remove();
    }
  });

  it('an import is refused up front when the disk is already below the reserve', async () => {
    const fs = await smallTmpfs(8 * MiB);
    try {
      const store = await Store.open(join(fs.dir, 'store'), { durability: 'none', diskReserveBytes: 4 * MiB });
      try {
        await writeFile(join(fs.dir, 'filler'), Buffer.alloc(5 * MiB));
        const err = await failure(importRawLayer(store, small, 'small'));
        expect(err.code, err.message).to.equal(ErrorCodes.ELIMIT);
        expect(err.context['limit']).to.equal('diskReserveBytes');
      } finally {
        store.close();
      }
    } finally {
      await fs.remove();
    }
  });

  it('a layer that expands past the ratio limit is refused with ELIMIT', async () => {
    const root = join(work.dir, 'ratio-store');
    const store = await Store.open(root, { durability: 'none' });
    try {
      const limits = { ...DEFAULT_INGEST_LIMITS, maxExpansionRatio: 50, expansionSlackBytes: MiB };
      const err = await failure(importRawLayer(store, zeros32, 'bomb', { limits }));
      expect(err.code, err.message).to.equal(ErrorCodes.ELIMIT);
      expect(err.context['limit']).to.equal('maxExpansionRatio');
      // The same layer within the default limits is fine (32 MiB is under the slack).
      await importRawLayer(store, zeros32, 'zeros');
    } finally {
      store.close();
    }
  });

  it('start-up removes dead ingests before it opens the database, so a full disk heals', async () => {
    const fs = await smallTmpfs(4 * MiB);
    try {
      const root = join(fs.dir, 'store');
      (await Store.open(root, { durability: 'none' })).close();
      // A crashed import (its pid long gone) that filled the disk.
      const dead = join(root, 'tmp', '2147483646-deadbeef0000');
      await mkdir(dead);
      await fillDisk(join(dead, 'blob'));
      const store = await Store.open(root, { durability: 'none', diskReserveBytes: 0 });
      try {
        expect(await readdir(store.layout.tmpDir)).to.deep.equal([]);
        await importRawLayer(store, small, 'small');
      } finally {
        store.close();
      }
    } finally {
      await fs.remove();
    }
  });

  it('a database that cannot open on a full disk is ENOSPC, not ECORRUPT', async () => {
    const fs = await smallTmpfs(4 * MiB);
    try {
      const root = join(fs.dir, 'store');
      (await Store.open(root, { durability: 'none' })).close();
      await fillDisk(join(fs.dir, 'filler'));
      const err = await failure(Store.open(root, { durability: 'none' }).then((s) => s.close()));
      expect(err.code, err.message).to.equal(ErrorCodes.ENOSPC);
    } finally {
      await fs.remove();
    }
  });
});
