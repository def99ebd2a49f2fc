/** The metadata database's schema versions: an older store is upgraded in place, a newer one refused. */
import { expect } from 'chai';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ErrorCodes, isLayerdError } from '../common/errors.js';
import { MetadataDb } from '../storage/metadata.js';

describe('metadata schema versions', () => {
  let dir: string;
  beforeEach(async () => { dir = await mkdtemp(join(tmpdir(), 'layerd-meta-')); });
  afterEach(async () => { await rm(dir, { recursive: true, force: true }); });

  const columns = (db: MetadataDb): string[] =>
    (db.db.prepare('PRAGMA table_info(containers)').all() as Array<{ name: string }>).map((c) => c.name);
  const version = (db: MetadataDb): string =>
    (db.db.prepare(`SELECT value FROM meta WHERE key = 'schema_version'`).get() as { value: string }).value;

  it('upgrades a schema-1 store in place (adds the live layer column)', () => {
    const path = join(dir, 'metadata.db');
    const old = new MetadataDb(path);
    old.db.exec(`ALTER TABLE containers DROP COLUMN layer_dir`);
    old.db.exec(`UPDATE meta SET value = '1' WHERE key = 'schema_version'`);
    expect(columns(old)).to.not.include('layer_dir');
    old.close();

    const db = new MetadataDb(path);
    try {
      expect(columns(db)).to.include('layer_dir');
      expect(version(db)).to.equal('3');
    } finally {
      db.close();
    }
  });

  it('upgrades a schema-2 store in place (adds the lazy_layers table)', () => {
    const path = join(dir, 'metadata.db');
    const old = new MetadataDb(path);
    old.db.exec(`DROP TABLE lazy_layers`);
    old.db.exec(`UPDATE meta SET value = '2' WHERE key = 'schema_version'`);
    old.close();

    const db = new MetadataDb(path);
    try {
      expect(db.listLazyLayers()).to.deep.equal([]);
      expect(version(db)).to.equal('3');
    } finally {
      db.close();
    }
  });

  it('refuses a store written by a newer layerd', () => {
    const path = join(dir, 'metadata.db');
    const db = new MetadataDb(path);
    db.db.exec(`UPDATE meta SET value = '99' WHERE key = 'schema_version'`);
    db.close();
    let code: string | undefined;
    try { new MetadataDb(path).close(); } catch (err) { code = isLayerdError(err) ? err.code : 'other'; }
    expect(code).to.equal(ErrorCodes.ECORRUPT);
  });
});

describe('metadata writes without fsync (writeUnsynced)', () => {
  let dir: string;
  beforeEach(async () => { dir = await mkdtemp(join(tmpdir(), 'layerd-meta-')); });
  afterEach(async () => { await rm(dir, { recursive: true, force: true }); });

  const synchronous = (db: MetadataDb): number => db.db.pragma('synchronous', { simple: true }) as number;

  it('commits for other connections to see, and leaves every later write synced (FULL), even when the change throws', () => {
    const path = join(dir, 'metadata.db');
    const db = new MetadataDb(path);
    const reader = new MetadataDb(path);
    try {
      expect(synchronous(db)).to.equal(2); // FULL
      db.writeUnsynced(() => db.db.prepare(`INSERT INTO meta (key, value) VALUES ('probe', 'one')`).run());
      expect(synchronous(db)).to.equal(2);
      expect((reader.db.prepare(`SELECT value FROM meta WHERE key = 'probe'`).get() as { value: string }).value).to.equal('one');
      expect(() => db.writeUnsynced(() => { throw new Error('no'); })).to.throw('no');
      expect(synchronous(db)).to.equal(2);
    } finally {
      reader.close();
      db.close();
    }
  });
});
