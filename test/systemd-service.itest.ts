/**
 * The systemd service under a real systemd: a Debian bookworm machine
 * booted with systemd-nspawn (test/support/nspawn.ts), the built repository
 * installed in it with `make install`, and the unit driven with systemctl
 * as an admin would: start, status, journal, restart and stop while a
 * container writes, a crash, the hardening, and `make uninstall`.
 *
 * The tests run in order on one machine (each step starts where the last
 * one left the service). The machine gets the host's node binary (the one
 * CI built and tested with), the repository and the corpus read-only, and a
 * scratch /var/lib/layerd.
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { realpath, stat } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { http, waitFor } from './support/daemon.js';
import { CORPUS, REPO, execFileAsync, scratch } from './support/env.js';
import { type Bind, Machine, machineRoot, whyNspawnCannotRun } from './support/nspawn.js';
import { stopChild, waitForExit } from './support/processes.js';

const SRC = '/src/layerd';
const SOCKET = '/run/layerd/layerd.sock';
const UNIT_CGROUP = '/sys/fs/cgroup/system.slice/layerd.service';
const WRITER_STOP = '/run/layerd-test-writer-stop';

interface ContainerInfo { id: string; image: string; mountpoint: string; state: string; serverPid: number | null }
interface JournalRecord { MESSAGE?: string; PRIORITY?: string; CONTAINER?: string; DIGEST?: string; _TRANSPORT?: string; _PID?: string }

describe('layerd as a systemd service, under a real systemd (systemd-nspawn)', function () {
  this.timeout(120_000);
  let machine: Machine | undefined;
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let writer: ChildProcess | undefined;
  let writerErrors = '';
  let mountpoint = '';

  const m = (): Machine => {
    if (!machine) throw new Error('no machine');
    return machine;
  };
  const show = async (...properties: string[]): Promise<Record<string, string>> => {
    const out = await m().check(['systemctl', 'show', 'layerd', ...properties.map((p) => `--property=${p}`)]);
    return Object.fromEntries(out.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
  };
  const api = (method: string, path: string): ReturnType<typeof http> => http(m().hostPath(SOCKET), method, path);
  const container = async (id: string): Promise<ContainerInfo> => {
    const r = await api('GET', `/v1/containers/${id}`);
    expect(r.status, r.body).to.equal(200);
    return r.json<ContainerInfo>();
  };
  const journal = async (...args: string[]): Promise<JournalRecord[]> => {
    const out = await m().check(['journalctl', '--no-pager', '-o', 'json', '-u', 'layerd', ...args]);
    return out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as JournalRecord);
  };
  const writes = async (): Promise<number> => Number((await m().check(['sh', '-c', `wc -l < ${mountpoint}/writes`])).trim());
  const serviceProcesses = async (): Promise<number[]> => {
    const out = await m().exec(['cat', `${UNIT_CGROUP}/cgroup.procs`]);
    return out.stdout.split('\n').filter((l) => l !== '').map(Number).sort((a, b) => a - b);
  };
  /** The writer keeps writing: `more` new lines arrive (bounded), and it has reported no error. */
  const writerKeepsWriting = async (more: number, what: string): Promise<void> => {
    const from = await writes();
    await waitFor(`${more} more writes ${what}`, async () => {
      if (writer?.exitCode !== null) throw new Error(`the writer stopped (${writer?.exitCode}): ${writerErrors}`);
      return (await writes()) >= from + more;
    }, 30_000, 200);
    expect(writerErrors, 'write errors').to.equal('');
  };

  before(async function () {
    this.timeout(15 * 60_000);
    const reason = await whyNspawnCannotRun();
    if (reason) {
      console.log(`      skipped: ${reason}`);
      this.skip();
    }
    const root = await machineRoot((line) => console.log(`      ${line}`));
    work = await scratch('layerd-nspawn-');
    const node = await realpath(process.execPath);
    const binds: Bind[] = [
      { host: node, machine: '/usr/bin/node', readOnly: true },
      { host: REPO, machine: SRC, readOnly: true },
      { host: CORPUS, machine: '/corpus', readOnly: true },
      { host: work.dir, machine: '/var/lib/layerd' },
    ];
    // node_modules shared from elsewhere (a worktree's symlink): the same path inside, so the link resolves.
    const modules = await realpath(join(REPO, 'node_modules'));
    if (relative(REPO, modules).startsWith('..')) binds.push({ host: modules, readOnly: true });
    machine = await Machine.boot(root, binds);
  });

  after(async function () {
    this.timeout(120_000);
    if (writer) await stopChild(writer, { signal: 'SIGKILL', what: 'the writer' }).catch(() => undefined);
    try {
      await machine?.shutdown();
    } finally {
      await work?.remove();
    }
  });

  it('make install puts layerd, its unit and its default configuration in place', async () => {
    await m().check(['make', '-C', SRC, 'install', 'SKIP_BUILD=1'], { timeoutMs: 180_000 });
    for (const path of ['/usr/local/bin/layerd', '/usr/local/bin/layerctl', '/etc/systemd/system/layerd.service', '/etc/layerd/config.json', '/usr/local/lib/layerd/node_modules/koffi/package.json']) {
      expect((await m().exec(['test', '-e', path])).code, path).to.equal(0);
    }
    const unit = await show('Type', 'NotifyAccess', 'KillMode', 'LoadState');
    expect(unit).to.deep.equal({ Type: 'notify', NotifyAccess: 'main', KillMode: 'process', LoadState: 'loaded' });
  });

  it('systemctl enable --now is active only once the socket serves, with READY=1 from the daemon itself and a useful status', async () => {
    await m().check(['systemctl', 'enable', '--now', 'layerd'], { timeoutMs: 90_000 });
    // enable --now returns once the unit is active (Type=notify: READY=1 was received): the socket must answer now.
    const health = await api('GET', '/v1/health');
    expect(health.status).to.equal(200);
    const state = await show('ActiveState', 'SubState', 'MainPID', 'StatusText');
    expect(state['ActiveState']).to.equal('active');
    expect(state['SubState']).to.equal('running');
    // NotifyAccess=main: systemd accepted READY=1 only from the main PID, the daemon (node) itself.
    expect((await m().check(['cat', `/proc/${state['MainPID']}/comm`])).trim()).to.equal('node');
    expect(state['StatusText']).to.equal(`serving ${SOCKET}: 0 images, 0 containers, 0 mounts`);

    await m().check(['layerctl', 'import', '/corpus/oci/debian-multi'], { timeoutMs: 90_000 });
    const created = JSON.parse(await m().check(['layerctl', 'create', 'debian-multi:latest', '--name', 'c1', '--json'])) as { mountpoint: string };
    mountpoint = created.mountpoint;
    const images = (JSON.parse(await m().check(['layerctl', 'images', '--json'])) as unknown[]).length;
    const expected = `serving ${SOCKET}: ${images} image${images === 1 ? '' : 's'}, 1 container, 1 mount`;
    await waitFor('STATUS= to count the container', async () => (await show('StatusText'))['StatusText'] === expected, 10_000, 100);
    const status = await m().exec(['systemctl', 'status', '--no-pager', 'layerd']);
    expect(status.stdout).to.contain(`Status: "${expected}"`);
    expect(status.stdout).to.match(/Active: active \(running\)/);
  });

  it('logs reach journald with their priority and their metadata as fields', async () => {
    // A warning naming a container: its mount host dies, the daemon notices and mounts it again.
    await m().check(['layerctl', 'import', '/corpus/oci/busybox'], { timeoutMs: 90_000 });
    await m().check(['layerctl', 'create', 'busybox:latest', '--name', 'c2', '--json']);
    const host = (await container('c2')).serverPid;
    expect(host).to.be.a('number');
    await m().check(['sh', '-c', `kill -KILL ${host}`]);
    await waitFor('the warning about c2 in the journal', async () =>
      (await journal('-p', 'warning', 'CONTAINER=c2')).some((r) => /mount host .* died/.test(r.MESSAGE ?? '')), 30_000, 250);

    const warnings = await journal('-p', 'warning');
    expect(warnings.length).to.be.greaterThan(0);
    for (const r of warnings) expect(Number(r.PRIORITY), `priority of ${r.MESSAGE}`).to.be.at.most(4);
    const all = await journal();
    const ready = all.find((r) => r.MESSAGE === 'layerd is ready');
    expect(ready, 'the info record "layerd is ready"').to.include({ PRIORITY: '6', _TRANSPORT: 'journal' });
    expect(warnings.map((r) => r.MESSAGE)).not.to.include('layerd is ready');

    const mounted = await journal('CONTAINER=c1');
    expect(mounted.map((r) => r.MESSAGE)).to.include('container mounted');
    const digest = (JSON.parse(await m().check(['layerctl', 'inspect', 'debian-multi:latest'])) as { Id?: string; id?: string });
    const id = digest.Id ?? digest.id;
    expect(id).to.match(/^sha256:/);
    expect((await journal(`DIGEST=${id}`)).map((r) => r.MESSAGE)).to.include('image imported');
    await m().check(['layerctl', 'rm', 'c2']);
  });

  it('systemctl restart while a container writes every 100 ms: no write error, the same mount keeps serving', async () => {
    writer = m().spawn(['sh', '-c', `i=0; while [ ! -e ${WRITER_STOP} ]; do i=$((i+1)); echo $i >> ${mountpoint}/writes || { echo "write $i failed" >&2; exit 1; }; sleep 0.1; done`]);
    writer.stderr!.on('data', (d: Buffer) => { writerErrors += d.toString(); });
    writer.stdout!.resume();
    await waitFor('the first writes', async () => (await m().exec(['test', '-s', `${mountpoint}/writes`])).code === 0, 20_000, 100);
    const before = { main: (await show('MainPID'))['MainPID'], host: (await container('c1')).serverPid, mount: await m().check(['findmnt', '-n', '-o', 'ID,FSTYPE', mountpoint]) };
    expect(before.mount).to.contain('fuse.layerd');

    await m().check(['systemctl', 'restart', 'layerd'], { timeoutMs: 90_000 });
    const after = await show('ActiveState', 'MainPID');
    expect(after['ActiveState']).to.equal('active');
    expect(after['MainPID']).not.to.equal(before.main);
    await writerKeepsWriting(10, 'after the restart');
    // The same mount (mount ID), served by the same host, seen in the machine's own mount namespace.
    expect(await m().check(['findmnt', '-n', '-o', 'ID,FSTYPE', mountpoint])).to.equal(before.mount);
    expect((await container('c1'))).to.include({ state: 'mounted', serverPid: before.host });
  });

  it('systemctl stop exits cleanly within the unit\'s timeout, keeps the container served and leaves no spare mount host', async () => {
    const host = (await container('c1')).serverPid!;
    // A spare mount host waits beside the daemon (started with it), for the next image's first mount.
    const spare = m().hostPath('/var/lib/layerd/hosts/spare.sock');
    await waitFor('the spare mount host', async () => (await stat(spare).catch(() => undefined))?.isSocket() === true, 30_000, 200);
    expect((await serviceProcesses()).length, 'daemon, c1\'s host and the spare').to.be.at.least(3);
    const started = Date.now();
    await m().check(['systemctl', 'stop', 'layerd'], { timeoutMs: 60_000 });
    const seconds = (Date.now() - started) / 1000;
    expect(seconds, 'stop time (TimeoutStopSec=30s)').to.be.below(30);
    expect(await show('ActiveState', 'Result', 'ExecMainCode', 'ExecMainStatus')).to.deep.equal({ ActiveState: 'inactive', Result: 'success', ExecMainCode: '1', ExecMainStatus: '0' });
    // KillMode=process: the host serving c1 stays; the spare host went with the daemon.
    await waitFor('only the mount host of c1 to be left in the unit\'s cgroup', async () => {
      const left = await serviceProcesses();
      return left.length === 1 && left[0] === host;
    }, 15_000, 200).catch(async (err: Error) => { throw new Error(`${err.message}: ${(await serviceProcesses()).join(' ')}`); });
    expect((await m().exec(['test', '-d', '/run/layerd/mounts'])).code, 'the runtime directory preserved').to.equal(0);
    await writerKeepsWriting(5, 'while the daemon is stopped');

    await m().check(['systemctl', 'start', 'layerd'], { timeoutMs: 90_000 });
    expect(await container('c1')).to.include({ state: 'mounted', serverPid: host });
  });

  it('a SIGKILL of the main process is restarted by systemd (Restart=on-failure) and the containers are adopted again', async () => {
    const before = await show('MainPID', 'NRestarts');
    const host = (await container('c1')).serverPid;
    await m().check(['sh', '-c', `kill -KILL ${before['MainPID']!}`]);
    await waitFor('systemd to restart layerd', async () => {
      const now = await show('ActiveState', 'MainPID', 'NRestarts');
      return now['ActiveState'] === 'active' && now['MainPID'] !== before['MainPID'] && now['MainPID'] !== '0'
        && Number(now['NRestarts']) === Number(before['NRestarts']) + 1;
    }, 30_000, 200);
    expect((await api('GET', '/v1/health')).status).to.equal(200);
    expect(await container('c1')).to.include({ state: 'mounted', serverPid: host });
    await writerKeepsWriting(5, 'after the crash');
  });

  it('hardening: only /dev/fuse opens, device nodes can still be made in writable layers, mounts are the host\'s; systemd-analyze security', async () => {
    const unit = await show('DevicePolicy', 'NoNewPrivileges', 'ProtectSystem', 'PrivateTmp');
    expect(unit).to.deep.equal({ DevicePolicy: 'closed', NoNewPrivileges: 'yes', ProtectSystem: 'no', PrivateTmp: 'no' });
    // A device node made through the container's mount: its host (in the unit's cgroup) makes it in the writable layer.
    await m().check(['mknod', `${mountpoint}/null-copy`, 'c', '1', '3']);
    expect((await m().check(['stat', '-c', '%F %t,%T', `${mountpoint}/null-copy`])).trim()).to.equal('character special file 1,3');
    // In the unit's cgroup a device outside DeviceAllow= does not open (outside it does), /dev/fuse does.
    await m().check(['mknod', '/root/kmsg', 'c', '1', '11']);
    expect((await m().exec(['sh', '-c', 'exec 3</root/kmsg'])).code, 'kmsg opens outside the unit').to.equal(0);
    const inUnit = (open: string): Promise<{ code: number | null; stderr: string }> =>
      m().exec(['sh', '-c', `echo $$ > ${UNIT_CGROUP}/cgroup.procs && exec ${open}`]);
    const kmsg = await inUnit('3</root/kmsg');
    expect(kmsg.code).not.to.equal(0);
    expect(kmsg.stderr).to.match(/Operation not permitted/);
    expect((await inUnit('3<>/dev/fuse')).code, '/dev/fuse opens in the unit').to.equal(0);

    const security = await m().exec(['systemd-analyze', 'security', '--no-pager', 'layerd'], { timeoutMs: 60_000 });
    const score = /Overall exposure level for layerd\.service: ([\d.]+) (\S+)/.exec(security.stdout);
    expect(score, security.stdout + security.stderr).not.to.equal(null);
    console.log(`      systemd-analyze security layerd: ${score![1]} ${score![2]}`);
    // 6.6 MEDIUM with the unit's hardening (bookworm's systemd 252); 9.8 UNSAFE without it.
    expect(Number(score![1])).to.be.below(7);
  });

  it('make uninstall removes everything it installed', async () => {
    await m().check(['touch', WRITER_STOP]);
    expect(await waitForExit(writer!, 10_000, 'the writer')).to.deep.equal({ code: 0, signal: null });
    expect(writerErrors).to.equal('');
    const lines = (await m().check(['cat', `${mountpoint}/writes`])).trim().split('\n');
    expect(lines.every((l, i) => l === String(i + 1)), 'every write, in order').to.equal(true);
    await m().check(['layerctl', 'rm', 'c1']);

    await m().check(['make', '-C', SRC, 'uninstall'], { timeoutMs: 90_000 });
    for (const path of ['/usr/local/bin/layerd', '/usr/local/bin/layerctl', '/usr/local/lib/layerd', '/etc/systemd/system/layerd.service',
      '/etc/systemd/system/multi-user.target.wants/layerd.service', '/etc/layerd']) {
      expect((await m().exec(['test', '-e', path])).code, `${path} removed`).to.equal(1);
    }
    expect((await show('LoadState'))['LoadState']).to.equal('not-found');
    await waitFor('the unit\'s last mount host to leave', async () => (await serviceProcesses()).length === 0, 20_000, 200);
    expect((await execFileAsync('findmnt', ['-n', '-N', String(m().leader), '-t', 'fuse.layerd']).catch(() => ({ stdout: '' }))).stdout).to.equal('');
  });
});
