/**
 * `layerd mount` run by an unprivileged user (nobody): mounted through
 * fusermount3 and served by layerd's own /dev/fuse binding (the descriptor
 * handed back over a socketpair), with that binding's semantics: a hard
 * link's other name shows new data and attributes at once, UTIME_OMIT is
 * honoured and times keep their nanoseconds. fuse-native, which served such
 * mounts before, showed stale attributes and data through the other name and
 * dropped single-time changes.
 *
 * The mount admits only its owner (no user_allow_other in /etc/fuse.conf),
 * so it is used from child processes running as that user. Needs root (to
 * become nobody and to clean up), /dev/fuse, fuse3 and util-linux.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { access, chmod, chown, link, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { findMount } from '../mount/deadMount.js';
import { MOUNT_COMMAND, cleanupEverything, run, stopLayerdServer, type RunResult } from './fixtures/mount/harness.js';

const NOBODY = 65534;
const AS_NOBODY = ['--reuid', String(NOBODY), '--regid', String(NOBODY), '--clear-groups'];

/** Run a shell script as nobody, with the mountpoint as $1. */
function asNobody(script: string, mnt: string): Promise<RunResult> {
  return run('setpriv', [...AS_NOBODY, 'sh', '-ec', script, 'sh', mnt]);
}

async function mustAsNobody(script: string, mnt: string): Promise<string> {
  const res = await asNobody(script, mnt);
  assert.equal(res.code, 0, `${script}: ${res.stderr}`);
  return res.stdout;
}

/** Start `layerd mount` as nobody; resolves once it printed `ready`, rejects with its stderr if it exits first. */
async function startAsNobody(args: string[], mountpoint: string): Promise<ChildProcess> {
  // setpriv execs node: the child's pid is the server's.
  const child = spawn('setpriv', [...AS_NOBODY, process.execPath, MOUNT_COMMAND, ...args, mountpoint], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
  try {
    await new Promise<void>((done, fail) => {
      let stdout = '';
      const timer = setTimeout(() => fail(new Error(`layerd mount not ready after 15s: ${stderr}`)), 15_000);
      child.stdout!.on('data', (chunk: Buffer) => {
        stdout += chunk.toString();
        if (stdout.includes(`ready ${resolve(mountpoint)}\n`)) { clearTimeout(timer); done(); }
      });
      child.once('exit', (code) => { clearTimeout(timer); fail(new Error(`layerd mount exited with ${code}: ${stderr}`)); });
    });
  } catch (err) {
    await stopLayerdServer(child, mountpoint);
    throw err;
  }
  return child;
}

function exitOf(child: ChildProcess, timeoutMs = 10_000): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((done, fail) => {
    const timer = setTimeout(() => fail(new Error('server did not exit')), timeoutMs);
    child.once('exit', (code) => { clearTimeout(timer); done(code); });
  });
}

async function userAllowOther(): Promise<boolean> {
  const conf = await readFile('/etc/fuse.conf', 'utf8').catch(() => '');
  return conf.split('\n').some((line) => line.trim() === 'user_allow_other');
}

describe('mount as a non-root user (fusermount3, own binding)', function () {
  this.timeout(60_000);
  let root: string;
  let lower: string;
  let upper: string;
  let mnt: string;
  let server: ChildProcess | undefined;

  before(async function () {
    if (process.getuid?.() !== 0) this.skip(); // becoming nobody needs root
    const fusermount = await run('fusermount3', ['-V']).catch(() => undefined);
    if (fusermount?.code !== 0) this.skip();
  });

  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'layerd-nonroot-'));
    await chmod(root, 0o755);
    [lower, upper, mnt] = [join(root, 'lower'), join(root, 'upper'), join(root, 'mnt')];
    for (const d of [lower, upper, mnt]) await mkdir(d);
    await mkdir(join(lower, 'hl'));
    await writeFile(join(lower, 'hl/a'), 'HL\n');
    await link(join(lower, 'hl/a'), join(lower, 'hl/b'));
    for (const p of [join(lower, 'hl'), join(lower, 'hl/a'), lower, upper, mnt]) await chown(p, NOBODY, NOBODY);
  });

  afterEach(async () => {
    if (server) await stopLayerdServer(server, mnt);
    server = undefined;
    await cleanupEverything(root);
    await rm(root, { recursive: true, force: true });
  });

  it('mounts with its own binding, serves the owner, and unmounts when the owner runs fusermount3 -u', async () => {
    server = await startAsNobody(['--lower', lower, '--upper', upper], mnt);
    const mount = await findMount(mnt);
    assert.equal(mount?.fstype, 'fuse.layerd');
    assert.equal(mount?.source, 'layerd');
    const options = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').find((l) => l.split(' ')[4] === resolve(mnt)) ?? '';
    assert.match(options, new RegExp(`\\buser_id=${NOBODY}\\b`)); // mounted for nobody, by fusermount3
    const maps = await readFile(`/proc/${server.pid}/maps`, 'utf8');
    assert.doesNotMatch(maps, /fuse\.node|fuse-native|libfuse\.so/); // no libfuse in the server

    // Without user_allow_other the mount is its owner's alone; root included.
    if (await userAllowOther()) await access(join(mnt, 'hl/a'));
    else await assert.rejects(access(join(mnt, 'hl/a')), { code: 'EACCES' });

    assert.equal(await mustAsNobody('echo written > "$1/new"; cat "$1/new"', mnt), 'written\n');
    assert.equal(await readFile(join(upper, 'new'), 'utf8'), 'written\n');

    const unmounted = await asNobody('fusermount3 -u "$1"', mnt);
    assert.equal(unmounted.code, 0, unmounted.stderr);
    assert.equal(await exitOf(server), 0);
    assert.equal(await findMount(mnt), undefined);
  });

  it('shows new data and attributes through the other name of a hard link at once', async () => {
    server = await startAsNobody(['--lower', lower, '--upper', upper], mnt);
    // Both names of a lower link group, and of a link made on the mount, read (and so cached) first.
    assert.equal(await mustAsNobody('cd "$1"; cat hl/b; stat -c %a:%s hl/b', mnt), 'HL\n644:3\n');
    assert.equal(await mustAsNobody('cd "$1"; printf new-data > hl/a; chmod 600 hl/a; stat -c %a:%s:%h hl/b; cat hl/b', mnt), '600:8:2\nnew-data');
    assert.equal(await mustAsNobody('cd "$1"; echo one > f; ln f g; cat g; stat -c %a:%s g', mnt), 'one\n644:4\n');
    assert.equal(await mustAsNobody('cd "$1"; echo changed > f; chmod 640 f; stat -c %a:%s g; cat g', mnt), '640:8\nchanged\n');
  });

  it('keeps atime when only mtime is set, and mtime when only atime is (UTIME_OMIT)', async () => {
    server = await startAsNobody(['--lower', lower, '--upper', upper], mnt);
    assert.equal(await mustAsNobody('cd "$1"; : > t; touch -d @1600000000 t; touch -m -d @1.5 t; stat -c %X:%Y t', mnt), '1600000000:1\n');
    assert.equal(await mustAsNobody('cd "$1"; touch -a -d @1500000000 t; stat -c %X:%Y t', mnt), '1500000000:1\n');
  });

  it('keeps the nanoseconds of a time it is given', async () => {
    server = await startAsNobody(['--lower', lower, '--upper', upper], mnt);
    assert.equal(await mustAsNobody('cd "$1"; : > t; touch -d @1700000000.123456789 t; TZ=UTC0 stat -c %y t', mnt), '2023-11-14 22:13:20.123456789 +0000\n');
  });

  it('unmounts through fusermount3 on SIGTERM and leaves no mount', async () => {
    server = await startAsNobody(['--lower', lower, '--upper', upper], mnt);
    server.kill('SIGTERM');
    assert.equal(await exitOf(server), 0);
    assert.equal(await findMount(mnt), undefined);
  });

  it('fails with fusermount3\'s reason, and mounts nothing, on a mountpoint the user may not use', async () => {
    await chown(mnt, 0, 0);
    await chmod(mnt, 0o755);
    await assert.rejects(startAsNobody(['--lower', lower, '--upper', upper], mnt), /cannot mount .*fusermount3/);
    assert.equal(await findMount(mnt), undefined);
  });
});
