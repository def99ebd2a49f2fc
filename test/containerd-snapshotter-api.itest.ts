/**
 * The proxy snapshotter's gRPC API, driven directly (no containerd): what
 * each call does to mounts, the store and the records, the error codes
 * containerd expects, the remote path's checks, Cleanup, and snapshot
 * mounts that outlive a daemon restart. Each test makes the snapshots it
 * uses and leaves none behind (checked after each).
 */
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { status } from '@grpc/grpc-js';
import { readFile, readdir, mkdir, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { BUSYBOX, scratch, daemonCli } from './support/env.js';
import { type RunningDaemon, startDaemon, waitFor } from './support/daemon.js';
import { type SnapshotsClient, grpcCode, snapshotsClient } from './support/containerd.js';
import { clearMountsUnder } from './support/store.js';
import { signalAndWait } from './support/processes.js';
import { abortFuseConnection } from './support/fusectl.js';

/** No containerd in these tests: layerd never asks one (a host's) for original layer blobs. */
const NO_CONTAINERD = ['--containerd-socket', 'none'];

interface WireMount { type: string; source: string; options: string[] }
interface InspectedImage { Layers: { diffId: string; digest: string | null }[] }

describe('containerd snapshotter: the gRPC API', function () {
  this.timeout(180_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;
  let client: SnapshotsClient;
  let busybox: InspectedImage;
  const socket = (): string => join(work.dir, 'snap.sock');
  /** Where each snapshot mount's FUSE operation counts are written (<id>.json). */
  const statsDir = (): string => join(work.dir, 'fuse-stats');
  /** While this file exists, background ingests wait (LAYERD_TEST_INGEST_GATE). */
  const ingestGate = (): string => join(work.dir, 'ingest-gate');

  const prepare = (key: string, parent = '', labels: Record<string, string> = {}) =>
    client.call<{ mounts: WireMount[] }>('Prepare', { snapshotter: 'layerd', key, parent, labels }).then((r) => r.mounts);
  const view = (key: string, parent: string) =>
    client.call<{ mounts: WireMount[] }>('View', { snapshotter: 'layerd', key, parent, labels: {} }).then((r) => r.mounts);
  const commit = (name: string, key: string, labels: Record<string, string> = {}) => client.call('Commit', { snapshotter: 'layerd', name, key, labels });
  const remove = (key: string) => client.call('Remove', { snapshotter: 'layerd', key });
  const statOf = (key: string) => client.call<{ info: { name: string; parent: string; kind: string; labels: Record<string, string> } }>('Stat', { snapshotter: 'layerd', key }).then((r) => r.info);
  const usage = (key: string) => client.call<{ size: number; inodes: number }>('Usage', { snapshotter: 'layerd', key });
  const codeOf = async (p: Promise<unknown>): Promise<number | undefined> => p.then(() => undefined, (err: unknown) => grpcCode(err));
  const mounted = async (path: string): Promise<boolean> => (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').some((l) => l.split(' ')[4] === path);
  const { cli } = daemonCli(() => daemon!.socket);
  const storeLayers = async (): Promise<string[]> => (JSON.parse(await cli('layers', '--json')) as { diffId: string }[]).map((l) => l.diffId);
  /** A committed snapshot `name` without parent holding etc/hello ("hello\n"), made through an active one. */
  const committedHello = async (name: string, labels: Record<string, string> = {}): Promise<void> => {
    const m = (await prepare(`${name}-active`, ''))[0]!.source;
    await mkdir(join(m, 'etc'));
    await writeFile(join(m, 'etc', 'hello'), 'hello\n');
    await commit(name, `${name}-active`, labels);
  };
  /** What several tests start from: committed c1 (labelled), a view v1 of it and an active a2 on it. */
  const c1WithChildren = async (): Promise<void> => {
    await committedHello('c1', { 'containerd.io/snapshot/committed': 'yes' });
    await view('v1', 'c1');
    await prepare('a2', 'c1');
  };
  /** busybox's base layer registered as a committed snapshot (the remote path); its name, the diffID. */
  const registerBusyboxBase = async (): Promise<string> => {
    const layer = busybox.Layers[0]!;
    const labels = { 'containerd.io/snapshot.ref': layer.diffId, 'containerd.io/snapshot/cri.layer-digest': layer.digest! };
    expect(await codeOf(prepare('extract base', '', labels)), 'registered').to.equal(status.ALREADY_EXISTS);
    return layer.diffId;
  };
  /** Remove every snapshot, children first; what cannot be removed is an error. */
  const removeAll = async (): Promise<void> => {
    let left = await client.list();
    for (let pass = 0; pass < 5 && left.length > 0; pass++) {
      for (const s of left) await remove(s.name).catch(() => undefined);
      left = await client.list();
    }
    expect(left.map((s) => s.name), 'snapshots left behind').to.deep.equal([]);
  };

  before(async () => {
    work = await scratch('layerd-snapapi-');
    await mkdir(statsDir());
    daemon = await startDaemon(work.dir, [...NO_CONTAINERD, '--snapshotter-socket', join(work.dir, 'snap.sock')], {
      LAYERD_SNAPSHOT_STATS_DIR: statsDir(), LAYERD_TEST_INGEST_GATE: ingestGate(), LAYERD_SNAPSHOT_WARMUP: '1',
    });
    client = snapshotsClient(socket());
    await cli('import', BUSYBOX);
    busybox = JSON.parse(await cli('inspect', 'busybox:latest')) as InspectedImage;
  });

  afterEach(async () => {
    if (daemon?.child.exitCode === null) await removeAll();
  });

  after(async () => {
    if (daemon) {
      client.close();
      await daemon.stop();
    }
    await clearMountsUnder(work.dir);
    await stopMountHostsUnder(work.dir);
    await work.remove();
  });

  it('prepares an empty writable snapshot as a bind mount of a FUSE mount, and commits it to a store layer', async () => {
    const mounts = await prepare('a1', '', { 'containerd.io/snapshot/x': 'y' });
    expect(mounts).to.have.length(1);
    expect(mounts[0]!.type).to.equal('bind');
    expect(mounts[0]!.options).to.deep.equal(['rbind', 'rw']);
    const mnt = mounts[0]!.source;
    expect(await mounted(mnt)).to.equal(true);
    expect(await readdir(mnt)).to.deep.equal([]);
    await mkdir(join(mnt, 'etc'));
    await writeFile(join(mnt, 'etc', 'hello'), 'hello\n');
    expect(await readFile(join(dirname(mnt), 'upper', 'etc', 'hello'), 'utf8'), 'the write is in the upper dir').to.equal('hello\n');
    expect((await statOf('a1')).kind).to.equal('ACTIVE');
    expect((await usage('a1')).inodes).to.equal(3);

    const before = await storeLayers();
    await commit('c1', 'a1', { 'containerd.io/snapshot/committed': 'yes' });
    const info = await statOf('c1');
    expect(info).to.include({ name: 'c1', parent: '', kind: 'COMMITTED' });
    expect(info.labels).to.deep.equal({ 'containerd.io/snapshot/committed': 'yes' });
    expect(await codeOf(statOf('a1'))).to.equal(status.NOT_FOUND);
    expect(await mounted(mnt), 'the active mount is gone').to.equal(false);
    const after = await storeLayers();
    expect(after).to.have.length(before.length + 1);
    await cli('prune');
    expect(await storeLayers(), 'store GC keeps the layers of committed snapshots').to.deep.equal(after);
    expect(await usage('c1')).to.deep.equal({ size: 6, inodes: 2 }); // the layer's entries: etc, etc/hello
  });

  it('views a committed snapshot read-only and prepares on top of it', async () => {
    await committedHello('c1');
    const v = await view('v1', 'c1');
    expect(v[0]!.options).to.deep.equal(['rbind', 'ro']);
    expect(await readFile(join(v[0]!.source, 'etc', 'hello'), 'utf8')).to.equal('hello\n');
    await writeFile(join(v[0]!.source, 'x'), 'x').then(() => expect.fail('a view is read-only'), (err: NodeJS.ErrnoException) => expect(err.code).to.equal('EROFS'));
    const a = await prepare('a2', 'c1');
    await writeFile(join(a[0]!.source, 'etc', 'hello'), 'changed\n');
    await writeFile(join(a[0]!.source, 'big'), Buffer.alloc(1024 * 1024, 1));
    expect(await readFile(join(v[0]!.source, 'etc', 'hello'), 'utf8'), 'the view does not see the change').to.equal('hello\n');
    const u = await usage('a2');
    expect(u.size).to.be.at.least(1024 * 1024);
    expect(u.inodes).to.equal(4);
    const mountsAgain = await client.call<{ mounts: WireMount[] }>('Mounts', { snapshotter: 'layerd', key: 'a2' });
    expect(mountsAgain.mounts).to.deep.equal(a.map((m) => ({ ...m })));
  });

  it('answers with the error codes containerd expects', async () => {
    await c1WithChildren();
    expect(await codeOf(statOf('nope'))).to.equal(status.NOT_FOUND);
    expect(await codeOf(prepare('a2', 'c1'))).to.equal(status.ALREADY_EXISTS);
    expect(await codeOf(prepare('a3', 'no-such-parent'))).to.equal(status.NOT_FOUND);
    expect(await codeOf(prepare('a3', 'a2'))).to.equal(status.INVALID_ARGUMENT);
    expect(await codeOf(prepare('', ''))).to.equal(status.INVALID_ARGUMENT);
    expect(await codeOf(commit('c1', 'a2'))).to.equal(status.ALREADY_EXISTS);
    expect(await codeOf(commit('c9', 'v1'))).to.equal(status.FAILED_PRECONDITION);
    expect(await codeOf(commit('c9', 'nope'))).to.equal(status.NOT_FOUND);
    expect(await codeOf(client.call('Mounts', { snapshotter: 'layerd', key: 'c1' }))).to.equal(status.FAILED_PRECONDITION);
    expect(await codeOf(remove('c1')), 'a parent with children').to.equal(status.FAILED_PRECONDITION);
    expect(await codeOf(remove('nope'))).to.equal(status.NOT_FOUND);
    expect(await codeOf(client.call('Update', { snapshotter: 'layerd', info: { name: 'c1', labels: {} }, update_mask: { paths: ['parent'] } }))).to.equal(status.INVALID_ARGUMENT);
    expect(await codeOf(client.list(['kind=="unterminated']))).to.equal(status.INVALID_ARGUMENT);
  });

  it('updates labels by field mask and lists with containerd filters', async () => {
    await c1WithChildren();
    const update = (labels: Record<string, string>, paths: string[]) =>
      client.call<{ info: { labels: Record<string, string> } }>('Update', { snapshotter: 'layerd', info: { name: 'c1', labels }, update_mask: { paths } }).then((r) => r.info.labels);
    expect(await update({ a: '1', b: '2' }, ['labels.a'])).to.deep.equal({ 'containerd.io/snapshot/committed': 'yes', a: '1' });
    expect(await update({}, ['labels.a'])).to.deep.equal({ 'containerd.io/snapshot/committed': 'yes' });
    expect(await update({ only: 'this' }, [])).to.deep.equal({ only: 'this' });
    expect(await update({ only: 'this', 'containerd.io/snapshot/committed': 'yes' }, ['labels'])).to.deep.equal({ only: 'this', 'containerd.io/snapshot/committed': 'yes' });

    const names = async (...filters: string[]): Promise<string[]> => (await client.list(filters)).map((s) => s.name).sort();
    expect(await names()).to.deep.equal(['a2', 'c1', 'v1']);
    expect(await names('kind==view', 'kind==active')).to.deep.equal(['a2', 'v1']);
    expect(await names('parent==c1,kind==active')).to.deep.equal(['a2']);
    expect(await names('labels.only==this')).to.deep.equal(['c1']);
    expect(await names('labels."containerd.io/snapshot/committed"')).to.deep.equal(['c1']);
    expect(await names('name~=^[av]')).to.deep.equal(['a2', 'v1']);
    const c1 = (await client.list(['name==c1']))[0]!;
    expect(c1.kind).to.equal('COMMITTED');
    expect(Number(c1.created_at!.seconds)).to.be.closeTo(Date.now() / 1000, 300);
  });

  it('registers a layer the store has as a committed snapshot for a labelled Prepare (the remote path)', async () => {
    const layer = busybox.Layers[0]!;
    const storeBefore = await storeLayers();
    // containerd's unpacker: snapshot.ref = the chain ID (for a base layer: its diffID)
    const labels = { 'containerd.io/snapshot.ref': layer.diffId, 'containerd.io/snapshot/cri.layer-digest': layer.digest! };
    expect(await codeOf(prepare('extract-1 base', '', labels))).to.equal(status.ALREADY_EXISTS);
    expect(await codeOf(statOf('extract-1 base')), 'no active snapshot was made').to.equal(status.NOT_FOUND);
    // what containerd's metadata layer then looks for
    const found = await client.list([`labels."containerd.io/snapshot.ref"==${layer.diffId},parent==""`]);
    expect(found).to.have.length(1);
    expect(found[0]!).to.include({ name: layer.diffId, kind: 'COMMITTED', parent: '' });
    expect(found[0]!.labels['containerd.io/snapshot/layerd.remote']).to.equal(layer.diffId);
    // asked again (another namespace): the same snapshot, no second one
    expect(await codeOf(prepare('extract-2 base', '', { 'containerd.io/snapshot.ref': layer.diffId, 'containerd.io/snapshot/layer.diffid': layer.diffId }))).to.equal(status.ALREADY_EXISTS);
    expect(await client.list([`labels."containerd.io/snapshot.ref"==${layer.diffId}`])).to.have.length(1);
    expect(await storeLayers(), 'nothing was unpacked or ingested').to.deep.equal(storeBefore);
    // and it is usable as a parent
    const v = await view('bb-view', layer.diffId);
    expect((await stat(join(v[0]!.source, 'bin', 'busybox'))).isFile()).to.equal(true);
    await remove('bb-view');
  });

  it('falls back to a normal Prepare when the labels do not fit (unknown layer, wrong chain ID)', async () => {
    const layer = busybox.Layers[0]!;
    await registerBusyboxBase();
    const bogus = `sha256:${'1'.repeat(64)}`;
    // a layer the store does not have: containerd must unpack
    // (an unpack: containerd applies the layer into the directory itself)
    const m1 = await prepare('unpack-1', '', { 'containerd.io/snapshot.ref': bogus, 'containerd.io/snapshot/layer.diffid': bogus });
    expect(m1[0]!.type).to.equal('overlay');
    // a layer the store has, but the target is not parent + layer: refuse the shortcut
    const m2 = await prepare('unpack-2', layer.diffId, { 'containerd.io/snapshot.ref': bogus, 'containerd.io/snapshot/layer.diffid': layer.diffId });
    expect(m2[0]!.type).to.equal('overlay');
    expect(await client.list([`labels."containerd.io/snapshot.ref"==${bogus}`])).to.have.length(2);
    expect((await client.list([`labels."containerd.io/snapshot.ref"==${bogus}`])).map((s) => s.kind)).to.deep.equal(['ACTIVE', 'ACTIVE']);
    await remove('unpack-1');
    await remove('unpack-2');
  });

  it('serves an unpack Prepare as a plain directory (no FUSE mount) and commits it as a layer, whiteouts and opaque directories included', async () => {
    const before = await storeLayers();
    const fuseMounts = async (): Promise<number> => (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => / - fuse/.test(l) && l.includes(work.dir)).length;
    const fuseBefore = await fuseMounts();
    const t1 = `sha256:${'a'.repeat(64)}`;
    const t2 = `sha256:${'b'.repeat(64)}`;
    // containerd's unpack key (`<namespace>/<n>/extract-<unique> <chainID>`), no label: what `ctr images import` sends
    const base = await prepare(`ns1/1/extract-1-x ${t1}`);
    expect(base).to.have.length(1);
    expect(base[0]!.type).to.equal('overlay');
    const upperOf = (m: WireMount[]): string => m[0]!.options.find((o) => o.startsWith('upperdir='))!.slice('upperdir='.length);
    expect(await fuseMounts(), 'no FUSE mount for an unpack').to.equal(fuseBefore);
    // what containerd's applier writes: files, and (for the next layer) overlayfs whiteouts and opaque directories
    const u1 = upperOf(base);
    await mkdir(join(u1, 'etc'));
    await writeFile(join(u1, 'etc', 'hello'), 'hello\n');
    await writeFile(join(u1, 'etc', 'gone'), 'deleted above\n');
    await mkdir(join(u1, 'opq'));
    await writeFile(join(u1, 'opq', 'old'), 'hidden above\n');
    await commit(`ns1/2/${t1}`, `ns1/1/extract-1-x ${t1}`);
    expect((await statOf(`ns1/2/${t1}`)).kind).to.equal('COMMITTED');
    const top = await prepare(`ns1/3/extract-2-y ${t2}`, `ns1/2/${t1}`);
    const u2 = upperOf(top);
    await mkdir(join(u2, 'etc'));
    execFileSync('mknod', [join(u2, 'etc', 'gone'), 'c', '0', '0']);
    await mkdir(join(u2, 'opq'));
    execFileSync('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', join(u2, 'opq')]);
    await writeFile(join(u2, 'opq', 'new'), 'new\n');
    await commit(`ns1/4/${t2}`, `ns1/3/extract-2-y ${t2}`);
    // (deleted in the background once Commit answered)
    await waitFor('the unpack directory deleted after Commit', () => stat(u2).then(() => false, () => true), 15_000, 50);
    const after = await storeLayers();
    expect(after).to.have.length(before.length + 2);
    // the union of the two layers, as a container sees it
    const v = (await view('unpacked-view', `ns1/4/${t2}`))[0]!.source;
    expect(await readFile(join(v, 'etc', 'hello'), 'utf8')).to.equal('hello\n');
    expect((await readdir(join(v, 'etc'))).sort(), 'the whiteout holds').to.deep.equal(['hello']);
    expect(await readdir(join(v, 'opq')), 'the opaque directory holds').to.deep.equal(['new']);
    await remove('unpacked-view');
    // the same chain unpacked in another containerd namespace: the stored layers are kept, none added
    const again = await prepare(`ns2/1/extract-3-z ${t1}`);
    await writeFile(join(upperOf(again), 'other'), 'what containerd wrote again\n');
    await commit(`ns2/2/${t1}`, `ns2/1/extract-3-z ${t1}`);
    const again2 = await prepare(`ns2/3/extract-4-w ${t2}`, `ns2/2/${t1}`);
    await commit(`ns2/4/${t2}`, `ns2/3/extract-4-w ${t2}`);
    expect(await storeLayers(), 'each layer stored once').to.deep.equal(after);
    expect(upperOf(again2)).to.not.equal(u2);
    // a labelled Prepare of that chain (containerd's pull unpacker) needs no unpack at all
    expect(await codeOf(prepare(`ns3/1/extract-5-v ${t1}`, '', { 'containerd.io/snapshot.ref': t1 }))).to.equal(status.ALREADY_EXISTS);
    expect(await client.list([`labels."containerd.io/snapshot.ref"==${t1},parent==""`])).to.have.length(1);
    // `layerctl layers` counts snapshot users
    const usedBy = new Map((JSON.parse(await cli('layers', '--json')) as { diffId: string; usedBy: number }[]).map((l) => [l.diffId, l.usedBy]));
    const added = after.filter((d) => !before.includes(d));
    expect(added.map((d) => usedBy.get(d)).sort()).to.deep.equal([2, 3]); // t2: ns1, ns2; t1: ns1, ns2, the registered one
    expect(await fuseMounts(), 'still no FUSE mount').to.equal(fuseBefore);
  });

  it('keeps the store\'s own layer when an unpack commits a chain the store has (an image layerd imported or pulled)', async () => {
    const layer = busybox.Layers[0]!; // a base layer: its chain ID is its diffID
    const before = await storeLayers();
    const m = await prepare(`ns1/1/extract-9-q ${layer.diffId}`);
    const upper = m[0]!.options.find((o) => o.startsWith('upperdir='))!.slice('upperdir='.length);
    await writeFile(join(upper, 'not-the-layer'), 'x');
    await commit(`ns1/2/${layer.diffId}`, `ns1/1/extract-9-q ${layer.diffId}`);
    expect(await storeLayers()).to.deep.equal(before);
    const v = (await view('bb-kept', `ns1/2/${layer.diffId}`))[0]!.source;
    expect((await stat(join(v, 'bin', 'busybox'))).isFile()).to.equal(true);
    await stat(join(v, 'not-the-layer')).then(() => expect.fail('the stored layer, not the directory, is the snapshot'), () => undefined);
    await remove('bb-kept');
    const usedBy = new Map((JSON.parse(await cli('layers', '--json')) as { diffId: string; usedBy: number }[]).map((l) => [l.diffId, l.usedBy]));
    expect(usedBy.get(layer.diffId), 'the image and the snapshot').to.equal(2);
  });

  it('removes snapshots: mounts go, a committed layer nothing else uses leaves the store, image layers stay', async () => {
    await c1WithChildren();
    const base = await registerBusyboxBase();
    const a2 = (await client.call<{ mounts: WireMount[] }>('Mounts', { snapshotter: 'layerd', key: 'a2' })).mounts[0]!.source;
    await remove('a2');
    await remove('v1');
    expect(await mounted(a2)).to.equal(false);
    // Remove deletes the directory after it answers (containerd need not wait for the files): gone soon after.
    await waitFor('the snapshot directory gone', async () => stat(dirname(a2)).then(() => false, () => true), 15_000, 50);
    const before = await storeLayers();
    await remove('c1');
    expect(await storeLayers()).to.have.length(before.length - 1);
    await remove(base);
    expect(await storeLayers(), 'the image still uses the busybox layer').to.include(base);
    expect(await client.list()).to.deep.equal([]);
  });

  it('warms a new container mount with what the last one of its image read at start: the second container finds it in the kernel\'s caches', async () => {
    const base = await registerBusyboxBase();
    /** A start-up: list etc, read two files, look up a name that is not there. */
    const startUp = async (m: string): Promise<string> => {
      const names = (await readdir(join(m, 'etc'))).sort().join(',');
      const text = await readFile(join(m, 'etc', 'passwd'), 'utf8') + await readFile(join(m, 'etc', 'group'), 'utf8');
      await stat(join(m, 'etc', 'no-such-file')).then(() => expect.fail('etc/no-such-file exists'), () => undefined);
      return `${names}\n${text}`;
    };
    const idOf = (m: string): string => /snapshots\/(\d+)\/mnt$/.exec(m)![1]!;
    /**
     * The FUSE requests of kinds the kernel's caches spare (opens always reach the server),
     * and the small files handed to its page cache at their first open (`prefill`, instead of READs).
     */
    const cacheable = async (m: string): Promise<Record<string, number>> => {
      const ops = JSON.parse(await readFile(join(statsDir(), `${idOf(m)}.json`), 'utf8').catch(() => '{}')) as Record<string, { count: number }>;
      return Object.fromEntries(['lookup', 'read', 'readdirplus', 'prefill'].map((op) => [op, ops[op]?.count ?? 0]));
    };

    const m1 = (await prepare('warm-1', base))[0]!.source;
    const seen = await startUp(m1);
    await remove('warm-1'); // its host hands the record of its accesses to the daemon
    const cold = await cacheable(m1);
    expect(cold.lookup, 'the first mount was cold').to.be.greaterThan(0);
    expect(cold.read + cold.prefill, 'file content brought in').to.be.greaterThan(0);

    const m2 = (await prepare('warm-2', base))[0]!.source;
    await waitFor('the warm-up of warm-2', async () => /"message":"snapshot mount warmed"[^\n]*"snapshot":"warm-2"/.test(daemon!.log()), 15_000, 50);
    // the host writes its counts every 2 s: wait for those of the warm-up
    await waitFor('the warm-up\'s requests counted', async () => {
      const now = await cacheable(m2);
      return now.lookup >= cold.lookup && now.read + now.prefill >= cold.read + cold.prefill && now.readdirplus >= cold.readdirplus;
    }, 15_000, 100);
    const warmed = await cacheable(m2);
    expect(await startUp(m2), 'the same content').to.equal(seen);
    await remove('warm-2');
    expect(await cacheable(m2), 'the start-up on the warmed mount sent no lookup, read or listing, and brought in no file').to.deep.equal(warmed);
    const line = daemon!.log().split('\n').find((l) => l.includes('"snapshot mount warmed"') && l.includes('"snapshot":"warm-2"'))!;
    const warmUp = JSON.parse(line) as { repeated: number; failed: number };
    expect(warmUp.repeated).to.be.greaterThan(0);
    expect(warmUp.failed, 'etc/no-such-file, looked up again (and cached as missing)').to.be.at.least(1);
    await remove(base);
  });

  it('once the last pending layer of a chain a container ran on is stored, the chain\'s host loads the stored layers before the next container asks', async () => {
    const target = `sha256:${'d'.repeat(64)}`;
    await writeFile(ingestGate(), '');
    const m = await prepare(`ns11/1/extract-11-p ${target}`);
    const upper = m[0]!.options.find((o) => o.startsWith('upperdir='))!.slice('upperdir='.length);
    await writeFile(join(upper, 'hello'), 'from the unpack\n');
    await commit(`ns11/2/${target}`, `ns11/1/extract-11-p ${target}`);
    const first = (await prepare('pre-1', `ns11/2/${target}`))[0]!.source; // reads the unpack directory
    expect(await readFile(join(first, 'hello'), 'utf8')).to.equal('from the unpack\n');
    await remove('pre-1');
    expect(daemon!.log()).not.to.contain('"message":"snapshot chain preloaded"');
    await rm(ingestGate());
    await waitFor('the chain preloaded', async () => daemon!.log().split('\n')
      .some((l) => l.includes('"message":"snapshot chain preloaded"') && l.includes(`"parent":"ns11/2/${target}"`)), 60_000, 100);
    const second = (await prepare('pre-2', `ns11/2/${target}`))[0]!.source; // the stored layer now
    expect(await readFile(join(second, 'hello'), 'utf8')).to.equal('from the unpack\n');
    await remove('pre-2');
    await remove(`ns11/2/${target}`);
  });

  it('Cleanup removes snapshot directories no record owns', async () => {
    const orphan = join(daemon!.root, 'snapshots', '999999');
    await mkdir(join(orphan, 'upper'), { recursive: true });
    await client.call('Cleanup', { snapshotter: 'layerd' });
    await stat(orphan).then(() => expect.fail('the orphan should be gone'), () => undefined);
  });

  it('serves a snapshot again within seconds when its mount host dies while the daemon runs', async () => {
    const m = (await prepare('supervised', ''))[0]!.source;
    await writeFile(join(m, 'kept'), 'in the upper\n');
    await stopMountHostsUnder(work.dir, 'SIGKILL');
    // served again by the daemon's supervisor, without a Mounts call or a restart
    await waitFor('the snapshot served again', async () => (await readFile(join(m, 'kept'), 'utf8').catch(() => '')) === 'in the upper\n', 15_000, 100);
    expect(daemon!.log()).to.match(/the mount host of a snapshot died; serving it again/);
    await writeFile(join(m, 'after'), 'still writable\n');
    await remove('supervised');
  });

  it('serves a snapshot again whose FUSE connection was aborted while its mount host runs', async () => {
    const m = (await prepare('aborted', ''))[0]!.source;
    await writeFile(join(m, 'kept'), 'in the upper\n');
    await abortFuseConnection(m);
    await waitFor('the snapshot served again', async () => (await readFile(join(m, 'kept'), 'utf8').catch(() => '')) === 'in the upper\n', 15_000, 100);
    expect(daemon!.log()).to.match(/a snapshot lost its mount while its host runs; serving it again/);
    await writeFile(join(m, 'after'), 'still writable\n');
    await remove('aborted');
  });

  it('keeps snapshot mounts served across a daemon restart, and serves again one whose server died', async () => {
    const m = (await prepare('live', ''))[0]!.source;
    await writeFile(join(m, 'before'), '1');
    client.close();
    expect(await daemon!.stop()).to.equal(0);
    expect(await mounted(m), 'still mounted while the daemon is down').to.equal(true);
    await writeFile(join(m, 'during'), '2');
    daemon = await startDaemon(work.dir, [...NO_CONTAINERD, '--snapshotter-socket', socket()]);
    client = snapshotsClient(socket());
    expect(daemon.log()).to.match(/snapshots restored.*"adopted":1|"adopted":1.*snapshots restored/);
    expect((await readdir(m)).sort()).to.deep.equal(['before', 'during']);

    // the mount's server dies while the daemon is down: the next daemon serves it again
    client.close();
    expect(await daemon.stop()).to.equal(0);
    await stopMountHostsUnder(work.dir, 'SIGKILL');
    daemon = await startDaemon(work.dir, [...NO_CONTAINERD, '--snapshotter-socket', socket()]);
    client = snapshotsClient(socket());
    expect(daemon.log()).to.match(/"remounted":1/);
    expect((await readdir(m)).sort()).to.deep.equal(['before', 'during']);
    await commit('live-c', 'live');
    const v = await view('live-v', 'live-c');
    expect((await readdir(v[0]!.source)).sort()).to.deep.equal(['before', 'during']);
    await remove('live-v');
    await remove('live-c');
  });
  it('answers an unpack\'s Commit before its layer is stored: a mount on top reads its directory meanwhile, and a daemon killed meanwhile ingests it at its next start', async () => {
    const target = `sha256:${'c'.repeat(64)}`;
    const before = await storeLayers();
    const m = await prepare(`ns7/1/extract-7-k ${target}`);
    const upper = m[0]!.options.find((o) => o.startsWith('upperdir='))!.slice('upperdir='.length);
    // enough data that ingesting it takes a while (~100 MiB, incompressible)
    await mkdir(join(upper, 'data'));
    for (let i = 0; i < 100; i++) await writeFile(join(upper, 'data', `f${i}`), randomBytes(1024 * 1024));
    const probe = await readFile(join(upper, 'data', 'f42'));
    await commit(`ns7/2/${target}`, `ns7/1/extract-7-k ${target}`);
    // committed at once (containerd goes on with the next layer); the daemon dies before the ingest ends
    expect((await statOf(`ns7/2/${target}`)).kind).to.equal('COMMITTED');
    daemon!.child.kill('SIGKILL');
    await daemon!.stop();
    client.close();
    expect(daemon!.log(), 'the kill came before the ingest ended').not.to.contain('unpack snapshot layer ingested');
    daemon = await startDaemon(work.dir, [...NO_CONTAINERD, '--snapshotter-socket', socket()]);
    client = snapshotsClient(socket());
    expect(daemon.log()).to.contain('resuming the ingest of committed snapshots');
    expect((await statOf(`ns7/2/${target}`)).kind).to.equal('COMMITTED');
    // a FUSE view on top shows what containerd wrote (from the directory while the layer is pending,
    // from the layer once stored: test/containerd-first-run.itest.ts holds the ingest to see the first)
    const v = (await view('pending-view', `ns7/2/${target}`))[0]!.source;
    expect((await readFile(join(v, 'data', 'f42'))).equals(probe)).to.equal(true);
    await waitFor('the layer ingested', async () => (await storeLayers()).length === before.length + 1, 60_000, 100);
    await remove('pending-view');
    await waitFor('the unpack directory deleted once ingested and no mount reads it', () => stat(upper).then(() => false, () => true), 15_000, 50);
    await remove(`ns7/2/${target}`);
    expect(await storeLayers(), 'the layer went with its only snapshot').to.deep.equal(before);
  });
  it('a Remove waiting for a pending layer is not held by the deferral of background ingests while containerd unpacks', async () => {
    const target = `sha256:${'e'.repeat(64)}`;
    const other = `sha256:${'f'.repeat(64)}`;
    const before = await storeLayers();
    const upperOf = (m: WireMount[]): string => m[0]!.options.find((o) => o.startsWith('upperdir='))!.slice('upperdir='.length);
    await writeFile(join(upperOf(await prepare(`ns10/1/extract-10-a ${target}`)), 'a'), 'a\n');
    await commit(`ns10/2/${target}`, `ns10/1/extract-10-a ${target}`);
    // containerd is unpacking another layer (for as long as it likes): background ingests wait for that
    await prepare(`ns10/3/extract-10-b ${other}`);
    const started = Date.now();
    await remove(`ns10/2/${target}`); // waits for the layer's ingest, which then goes ahead at once
    expect(Date.now() - started, 'the Remove was not held until the deferral ran out (30 s)').to.be.below(15_000);
    await remove(`ns10/3/extract-10-b ${other}`);
    expect(await storeLayers(), 'the layer went with its only snapshot').to.deep.equal(before);
  });
  it('an unpack of the same chain in another namespace, committed while the first one\'s layer is still being ingested, shares that layer', async () => {
    const target = `sha256:${'d'.repeat(64)}`;
    const before = await storeLayers();
    const upperOf = (m: WireMount[]): string => m[0]!.options.find((o) => o.startsWith('upperdir='))!.slice('upperdir='.length);
    const u1 = upperOf(await prepare(`ns8/1/extract-8-a ${target}`));
    for (let i = 0; i < 50; i++) await writeFile(join(u1, `f${i}`), randomBytes(1024 * 1024));
    await commit(`ns8/2/${target}`, `ns8/1/extract-8-a ${target}`);
    // containerd in another namespace unpacked the same chain (here: different bytes, to tell them apart)
    const u2 = upperOf(await prepare(`ns9/1/extract-9-b ${target}`));
    await writeFile(join(u2, 'other'), 'what containerd wrote again\n');
    await commit(`ns9/2/${target}`, `ns9/1/extract-9-b ${target}`);
    const v = (await view('twin-view', `ns9/2/${target}`))[0]!.source;
    expect((await readdir(v)).length, 'the first namespace\'s layer').to.equal(50);
    expect(await storeLayers()).to.have.length(before.length + 1);
    await remove('twin-view');
    const usedBy = new Map((JSON.parse(await cli('layers', '--json')) as { diffId: string; usedBy: number }[]).map((l) => [l.diffId, l.usedBy]));
    const added = (await storeLayers()).filter((d) => !before.includes(d));
    expect(added.map((d) => usedBy.get(d))).to.deep.equal([2]);
  });
});

/** Mount hosts serving mounts under `dir` (found by their socket path), stopped by PID and waited for (bounded). */
async function stopMountHostsUnder(dir: string, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  const pids: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes('mount-host') && cmdline.includes(dir)) pids.push(Number(name));
  }
  await signalAndWait(pids, signal, 15_000);
}
