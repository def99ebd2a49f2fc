/**
 * Containers through the real daemon: mounts with their own writable
 * layers, diff, commit, export/import round trip, mounts that outlive a
 * daemon restart while another process works in them, concurrent creates,
 * and bad container requests.
 */
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { DEBIAN_MULTI, execFileAsync, layerctl, scratch, daemonCli } from './support/env.js';
import { type RunningDaemon, http, startDaemon, waitFor } from './support/daemon.js';

describe('daemon: containers', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;
  let mountRoot: string;

  const { cli, json } = daemonCli(() => daemon!.socket);
  /** layerd_fuse_operations_total of one operation, summed over all mounts. */
  const fuseCount = async (op: string): Promise<number> => {
    const body = (await http(daemon!.socket, 'GET', '/metrics')).body;
    return Number(new RegExp(`^layerd_fuse_operations_total\\{op="${op}"\\} (\\d+)`, 'm').exec(body)?.[1] ?? 0);
  };

  before(async () => {
    work = await scratch();
    mountRoot = join(work.dir, 'mounts');
    daemon = await startDaemon(work.dir, ['--mount-root', mountRoot]);
    await cli('import', DEBIAN_MULTI);
  });
  after(async () => {
    if (daemon) {
      // remove whatever a failed test left mounted, then stop
      const list = await json<{ id: string }[]>('ps').catch(() => []);
      for (const c of list) await cli('rm', c.id).catch(() => undefined);
      await daemon.stop();
    }
    const { stdout } = await execFileAsync('sh', ['-c', `grep ' ${mountRoot}' /proc/self/mountinfo | wc -l`]);
    expect(stdout.trim(), 'no mount left behind').to.equal('0');
    await work?.remove();
  });

  it('gives each of three containers its own writable layer', async () => {
    const made = [];
    for (const id of ['a', 'b', 'c']) made.push(await json<{ id: string; mountpoint: string }>('create', 'debian-multi:latest', '--name', id));
    expect(made.map((m) => m.mountpoint)).to.deep.equal(['a', 'b', 'c'].map((id) => join(mountRoot, id)));
    for (const m of made) await writeFile(join(m.mountpoint, 'root', `only-${m.id}`), m.id);
    for (const m of made) {
      const names = await readdir(join(m.mountpoint, 'root'));
      expect(names.filter((n) => n.startsWith('only-'))).to.deep.equal([`only-${m.id}`]);
    }
    expect((await readFile(join(mountRoot, 'a', 'etc', 'os-release'), 'utf8'))).to.contain('bookworm');
    const ps = await json<{ id: string; state: string }[]>('ps');
    expect(ps.filter((c) => c.state === 'mounted').map((c) => c.id)).to.include.members(['a', 'b', 'c']);
  });

  it('diffs, commits, and mounts the committed image with the change', async () => {
    const mnt = join(mountRoot, 'a');
    await execFileAsync('sh', ['-c', `rm ${mnt}/etc/hostname && chmod 600 ${mnt}/etc/passwd && mkdir ${mnt}/opt/new-dir`]);
    const diff = await json<{ kind: string; path: string }[]>('diff', 'a');
    expect(diff).to.deep.include.members([
      { kind: 'D', path: '/etc/hostname' }, { kind: 'C', path: '/etc/passwd' },
      { kind: 'A', path: '/opt/new-dir' }, { kind: 'A', path: '/root/only-a' },
    ]);
    const text = await cli('diff', 'a');
    expect(text).to.match(/^D \/etc\/hostname$/m);

    const commit = await json<{ image: string; diffId: string; ref: string }>('commit', 'a', 'committed:v1');
    expect(commit.ref).to.equal('committed:v1');
    const info = await json<{ Layers: { diffId: string }[]; History: { created_by?: string }[] }>('inspect', 'committed:v1');
    expect(info.Layers).to.have.length(5);
    expect(info.Layers[4]!.diffId).to.equal(commit.diffId);
    expect(info.History.at(-1)!.created_by).to.equal('layerd commit a');

    const m = await json<{ mountpoint: string }>('create', 'committed:v1', '--name', 'from-commit');
    expect(await readFile(join(m.mountpoint, 'root', 'only-a'), 'utf8')).to.equal('a');
    expect((await stat(join(m.mountpoint, 'etc', 'passwd'))).mode & 0o777).to.equal(0o600);
    await stat(join(m.mountpoint, 'etc', 'hostname')).then(() => expect.fail('hostname should be deleted'), (err: NodeJS.ErrnoException) => expect(err.code).to.equal('ENOENT'));
    await cli('rm', 'from-commit');
  });

  it('exports the writable layer as an OCI tar that imports back to the same diffID', async () => {
    const tar = join(work.dir, 'a.tar');
    await cli('export', 'a', '-o', tar);
    const listing = (await execFileAsync('tar', ['-tf', tar])).stdout;
    expect(listing).to.contain('etc/.wh.hostname');
    const sha = `sha256:${createHash('sha256').update(await readFile(tar)).digest('hex')}`;
    const commit = await json<{ Layers: { diffId: string }[] }>('inspect', 'committed:v1');
    expect(sha, 'export and commit write the same bytes').to.equal(commit.Layers[4]!.diffId);
    await cli('import', tar, '--name', 'roundtrip');
    const back = await json<{ Layers: { diffId: string }[] }>('inspect', 'roundtrip');
    expect(back.Layers[0]!.diffId).to.equal(sha);
  });

  it('keeps serving mounts while the daemon restarts, and adopts them', async () => {
    const mnt = join(mountRoot, 'b');
    // A separate process keeps writing and reading in the mount throughout.
    const worker = spawn('sh', ['-c', `i=0; while [ $i -lt 60 ]; do echo $i >> ${mnt}/root/log || exit 11; cat ${mnt}/etc/os-release >/dev/null || exit 12; i=$((i+1)); sleep 0.05; done`]);
    const workerDone = new Promise<number | null>((resolve) => worker.on('exit', (code) => resolve(code)));
    await waitFor('the worker to start writing', () => readFile(join(mnt, 'root', 'log'), 'utf8').then((t) => t.length > 0, () => false), 10_000);
    expect(await daemon!.stop()).to.equal(0);
    expect((await readFile(`/proc/self/mountinfo`, 'utf8'))).to.contain(mnt);
    daemon = await startDaemon(work.dir, ['--mount-root', mountRoot]);
    expect(await workerDone, 'the worker saw no error').to.equal(0);
    expect((await readFile(join(mnt, 'root', 'log'), 'utf8')).trim().split('\n')).to.have.length(60);
    const ps = await json<{ id: string; state: string }[]>('ps');
    expect(ps.find((c) => c.id === 'b')!.state).to.equal('mounted');
    expect(daemon.log()).to.contain('"adopted":3');
  });

  it('mounts again a container whose server died while the daemon was down', async () => {
    const list = await json<{ id: string; serverPid: number }[]>('ps');
    const c = list.find((x) => x.id === 'c')!;
    // One mount host serves every container of an image: all of them go down with it.
    const sharing = list.filter((x) => x.serverPid === c.serverPid).length;
    // The dying host's last stats count the files made in a, b and c (it writes them every 2 s).
    // (Creates and lookups always reach the server; reads and writes of upper files pass through the kernel.)
    await waitFor('the creates in the FUSE metrics', async () => (await fuseCount('create')) >= 3, 15_000, 250);
    const before = { create: await fuseCount('create'), lookup: await fuseCount('lookup') };
    expect(await daemon!.stop()).to.equal(0);
    process.kill(c.serverPid, 'SIGKILL');
    daemon = await startDaemon(work.dir, ['--mount-root', mountRoot]);
    expect(daemon.log()).to.contain(`"remounted":${sharing}`);
    expect(await readFile(join(mountRoot, 'c', 'root', 'only-c'), 'utf8')).to.equal('c');
    // The new host counts on from the old one's stats: the sums never go back.
    await waitFor('the new host\'s stats', async () => (await fuseCount('lookup')) > before.lookup, 15_000, 250);
    expect(await fuseCount('create')).to.be.at.least(before.create);
    const after = await json<{ id: string; state: string; serverPid: number }[]>('ps');
    expect(after.every((x) => x.state === 'mounted')).to.equal(true);
    expect(after.find((x) => x.id === 'c')!.serverPid).to.not.equal(c.serverPid);
  });

  it('creates 50 containers concurrently; a duplicate id gets 409; metrics count the mounts', async () => {
    const ids = Array.from({ length: 50 }, (_, i) => `many-${i}`);
    const results = await Promise.all(ids.map((id) => http(daemon!.socket, 'POST', '/v1/containers',
      JSON.stringify({ id, image: 'debian-multi:l1-minbase', labels: { batch: 'x' } }), { 'content-type': 'application/json' })));
    expect(results.map((r) => r.status)).to.deep.equal(ids.map(() => 201));
    let removed = false;
    try {
      const dup = await http(daemon!.socket, 'POST', '/v1/containers', JSON.stringify({ id: 'many-0', image: 'debian-multi:latest' }), { 'content-type': 'application/json' });
      expect(dup.status).to.equal(409);
      expect(dup.json<{ code: string }>().code).to.equal('EEXIST');
      const createsBefore = await fuseCount('create');
      await execFileAsync('sh', ['-c', `echo x > ${join(mountRoot, 'many-0', 'written')}`]);
      // Mount hosts write their stats every 2 s: poll until this file's creation shows.
      await waitFor('the create in the FUSE metrics', async () => (await fuseCount('create')) > createsBefore, 15_000, 250);
      const metrics = await http(daemon!.socket, 'GET', '/metrics');
      expect(Number(/^layerd_mounts (\d+)/m.exec(metrics.body)![1])).to.be.at.least(53);
      expect(Number(/^layerd_fuse_operations_total\{op="getattr"\} (\d+)/m.exec(metrics.body)?.[1] ?? 0)).to.be.greaterThan(0);
      expect(metrics.body).to.match(/^layerd_fuse_operation_seconds_bucket\{op="create",le="\+Inf"\} [1-9]\d*/m);
      expect(Number(/^layerd_mount_hosts (\d+)/m.exec(metrics.body)?.[1])).to.be.at.least(2); // latest's, l1-minbase's (and the spare)
      expect(Number(/^layerd_mount_hosts_resident_bytes (\d+)/m.exec(metrics.body)?.[1])).to.be.greaterThan(10 * 1024 * 1024);
      const createsSeen = await fuseCount('create');
      for (const id of ids) expect((await http(daemon!.socket, 'DELETE', `/v1/containers/${id}`)).status).to.equal(200);
      removed = true;
      expect(await fuseCount('create'), 'a removed container\'s operations stay counted').to.be.at.least(createsSeen);
    } finally {
      // A failure here must not leave 50 mounts to the tests after it.
      if (!removed) for (const id of ids) await http(daemon!.socket, 'DELETE', `/v1/containers/${id}`).catch(() => undefined);
    }
  });

  it('creates and removes 100 containers at once, three times over: every rm succeeds and leaves nothing behind', async () => {
    const containersDir = join(daemon!.root, 'containers');
    const entries = (dir: string): Promise<string[]> => readdir(dir).catch(() => []);
    const before = new Set(await entries(containersDir));
    const mountsBefore = new Set(await entries(mountRoot));
    for (let round = 0; round < 3; round++) {
      const ids = Array.from({ length: 100 }, (_, i) => `cc${round}-${i}`);
      const outcomes = await Promise.all(ids.map(async (id) => {
        const made = await http(daemon!.socket, 'POST', '/v1/containers', JSON.stringify({ id, image: 'debian-multi:l1-minbase' }), { 'content-type': 'application/json' });
        if (made.status !== 201) return `create ${id}: ${made.status} ${made.body}`;
        // Something happens in the mount, so its host has stats to write.
        await readFile(join(mountRoot, id, 'etc', 'os-release'));
        const gone = await http(daemon!.socket, 'DELETE', `/v1/containers/${id}`);
        return gone.status === 200 ? 'ok' : `rm ${id}: ${gone.status} ${gone.body}`;
      }));
      expect(outcomes.filter((o) => o !== 'ok'), `round ${round}`).to.deep.equal([]);
      expect((await entries(containersDir)).filter((n) => !before.has(n)), 'no container directory left').to.deep.equal([]);
      expect((await entries(mountRoot)).filter((n) => !mountsBefore.has(n)), 'no mountpoint directory left').to.deep.equal([]);
    }
    expect(await readdir(join(daemon!.root, 'tmp')), 'no removal left in the ingest area').to.deep.equal([]);
    // The host of l1-minbase has no mount left and goes, with its memory: a, b, c's host and the spare remain.
    const hostsNow = async (): Promise<number> => Number(/^layerd_mount_hosts (\d+)/m.exec((await http(daemon!.socket, 'GET', '/metrics')).body)?.[1]);
    await waitFor('the idle host to leave', async () => (await hostsNow()) === 2, 30_000, 250);
  });

  it('removes a container although something keeps writing into its directory (a mount host finishing its stats)', async () => {
    await cli('create', 'debian-multi:l1-minbase', '--name', 'written-to');
    const dir = join(daemon!.root, 'containers', 'written-to');
    // New names all the time, as a late stats write adds one: a plain recursive delete then ends in ENOTEMPTY.
    const writer = spawn('sh', ['-c', `i=0; while [ $i -lt 200000 ]; do i=$((i+1)); echo x > "${dir}/late-$i" 2>/dev/null || exit 0; done`], { stdio: 'ignore' });
    const writerDone = new Promise<void>((resolve) => writer.on('exit', () => resolve()));
    try {
      await waitFor('the writer to start', () => readdir(dir).then((names) => names.some((n) => n.startsWith('late-')), () => false), 10_000, 20);
      const r = await http(daemon!.socket, 'DELETE', '/v1/containers/written-to');
      expect(r.status, r.body).to.equal(200);
    } finally {
      if (writer.exitCode === null) writer.kill('SIGKILL');
      await writerDone;
    }
    expect(await readdir(join(daemon!.root, 'containers'))).to.not.include('written-to');
  });

  it('refuses bad container requests with 4xx and stays up', async () => {
    const s = daemon!.socket;
    const post = (body: string) => http(s, 'POST', '/v1/containers', body, { 'content-type': 'application/json' });
    for (const [body, status] of [
      ['{"image": "debian-multi:latest", "id": "a/b"}', 400],
      ['{"image": "debian-multi:latest", "id": ".."}', 400],
      ['{"image": "debian-multi:latest", "id": "x\\u0000y"}', 400],
      ['{"image": "no-such:image"}', 404],
      ['{"image": 7}', 400],
      ['{"image": "debian-multi:latest", "labels": {"k": 1}}', 400],
      ['{"image": "debian-multi:latest", "mountpoint": "relative/dir"}', 400],
    ] as const) {
      const r = await post(body);
      expect(r.status, body).to.equal(status);
    }
    expect((await http(s, 'GET', '/v1/containers/nope')).status).to.equal(404);
    expect((await http(s, 'DELETE', '/v1/containers/nope')).status).to.equal(404);
    expect((await http(s, 'GET', '/v1/containers/a%2Fb')).status).to.equal(400);
    // an image a container uses cannot be removed
    const rmi = await http(s, 'DELETE', `/v1/images/${encodeURIComponent('committed:v1')}`);
    expect(rmi.status).to.equal(200); // committed:v1 is used by no container any more
    const busy = await layerctl(['--socket', s, 'rmi', '--force', 'sha256:92865d204ee2bff5d5f8811ded92a9c70145095b9b829dc1137bb5b668a745fd']);
    expect(busy.code).to.equal(4);
    expect(busy.stderr).to.contain('ECONFLICT');
  });
});
