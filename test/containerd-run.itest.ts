/**
 * A stock containerd (Debian's 1.6) running containers whose root
 * filesystems are layerd snapshots, through the proxy snapshotter: `ctr
 * images import` + `ctr run` of busybox and debian-multi, the unpacked tree
 * checked against the corpus oracle, writes landing in the snapshot's
 * writable layer, parallel containers, `ctr snapshots` commands, containerd's
 * GC removing snapshots, and a layerd restart under a running container.
 *
 * containerd, the shims, ctr and layerd run in a private mount namespace
 * (see test/support/containerd.ts); skipped only if containerd or runc are
 * not installed. Each test imports what it runs (once per suite) and starts
 * and removes its own containers.
 */
import { expect } from 'chai';
import { lstat, mkdir, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { digestOf } from '../storage/digest.js';
import { BUSYBOX, CORPUS, DEBIAN_MULTI, scratch } from './support/env.js';
import { ContainerdEnv, type SnapshotsClient, missingTools, ociArchive, ok, snapshotsClient, closeContainerdTest } from './support/containerd.js';

const DEBIAN = 'corpus/debian-multi:l3-whiteouts';
const BB = 'corpus/busybox:latest';

/** The chain IDs of an image of an OCI layout (as containerd names its committed snapshots). */
async function chainIds(layout: string, tag: string): Promise<string[]> {
  const index = JSON.parse(await readFile(join(layout, 'index.json'), 'utf8')) as { manifests: Array<{ digest: string; annotations?: Record<string, string> }> };
  const blob = (d: string): Promise<string> => readFile(join(layout, 'blobs', 'sha256', d.slice('sha256:'.length)), 'utf8');
  const desc = index.manifests.find((m) => m.annotations?.['org.opencontainers.image.ref.name'] === tag)!;
  const manifest = JSON.parse(await blob(desc.digest)) as { config: { digest: string } };
  const config = JSON.parse(await blob(manifest.config.digest)) as { rootfs: { diff_ids: string[] } };
  const chain: string[] = [];
  for (const diffId of config.rootfs.diff_ids) chain.push(chain.length === 0 ? diffId : digestOf(`${chain.at(-1)!} ${diffId}`));
  return chain;
}

describe('containerd: containers on layerd snapshots', function () {
  this.timeout(600_000);
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let env: ContainerdEnv | undefined;
  let client: SnapshotsClient | undefined;
  const reason = missingTools();

  const ctr = (...args: string[]): Promise<string> => env!.ctrOk(args, { timeoutMs: 300_000 });
  const snap = (...args: string[]): Promise<string> => ctr('snapshots', '--snapshotter', 'layerd', ...args);
  /** A container's run of a shell script: its standard output (ContainerdEnv.runScript: not through ctr's stdout, which can lose it). */
  const runIn = (image: string, id: string, script: string): Promise<string> => env!.runScript(image, id, script, { timeoutMs: 300_000 });
  /** layerd's own record of the snapshot containerd made for container `id`. */
  const layerdSnapshotOf = async (id: string): Promise<{ name: string; mountpoint: string; upper: string } | undefined> => {
    const found = (await client!.list([`name~="/${id}$",kind==active`]))[0];
    if (!found) return undefined;
    const m = await client!.call<{ mounts: { source: string }[] }>('Mounts', { snapshotter: 'layerd', key: found.name });
    return { name: found.name, mountpoint: m.mounts[0]!.source, upper: join(dirname(m.mounts[0]!.source), 'upper') };
  };
  /** A client of containerd's snapshots API holding a lease (what the snapshots it makes are kept by). */
  const leasedClient = async (name: string): Promise<{ client: SnapshotsClient; release(): Promise<void> }> => {
    const lease = `${name}-${process.pid}`;
    await ctr('leases', 'create', '--id', lease);
    const leased = snapshotsClient(env!.containerdSocket, { namespace: env!.namespace, lease });
    return { client: leased, release: async () => { leased.close(); await ctr('leases', 'rm', lease); } };
  };
  /** `ctr images import` of each image, done once, by the first test that needs it; ctr's output. */
  const imports = new Map<string, Promise<string>>();
  const importOnce = (baseName: string, archive: string): Promise<string> => {
    let done = imports.get(baseName);
    if (!done) {
      done = ctr('images', 'import', '--snapshotter', 'layerd', '--base-name', baseName, join(work!.dir, archive));
      imports.set(baseName, done);
    }
    return done;
  };
  const importBusybox = (): Promise<string> => importOnce('corpus/busybox', 'busybox.tar');
  const importDebian = (): Promise<string> => importOnce('corpus/debian-multi', 'debian.tar');
  /** A detached debian container that writes /root/inside.txt, deletes /etc/issue and sleeps; its layerd snapshot. */
  const startWriter = async (id: string): Promise<{ name: string; mountpoint: string; upper: string }> => {
    await importDebian();
    await ctr('run', '-d', '--null-io', '--snapshotter', 'layerd', DEBIAN, id, 'sh', '-c', 'echo written-inside > /root/inside.txt && rm /etc/issue && sleep 600');
    return poll(`${id}'s snapshot`, () => layerdSnapshotOf(id));
  };
  const poll = async <T>(what: string, fn: () => Promise<T | undefined>, ms = 30_000): Promise<T> => {
    const deadline = Date.now() + ms;
    for (;;) {
      const v = await fn();
      if (v !== undefined) return v;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  };

  before(async function () {
    if (reason) {
      console.warn(`      skipped: ${reason}`);
      this.skip();
    }
    work = await scratch('layerd-ctrd-');
    env = new ContainerdEnv(work.dir);
    await env.start();
    client = snapshotsClient(env.snapshotterSocket);
    await ociArchive(BUSYBOX, ['latest'], join(work.dir, 'busybox.tar'));
    // containerd 1.6 cannot apply debian-multi's layer 4 (whiteouts under a path the same layer
    // made a file: "mkparent …/etc/cron.d: not a directory", with any snapshotter), so layers 1-3.
    await ociArchive(DEBIAN_MULTI, ['l3-whiteouts'], join(work.dir, 'debian.tar'));
  });

  after(async function () {
    client?.close();
    await closeContainerdTest(this, { env, work, containerdLog: true });
  });

  it('imports busybox with `ctr images import --snapshotter layerd` and runs it', async () => {
    expect(await importBusybox()).to.contain('unpacking corpus/busybox:latest');
    expect(await runIn(BB, 'bb-1', 'echo hello from busybox on layerd')).to.equal('hello from busybox on layerd\n');
    const [chain] = await chainIds(BUSYBOX, 'amd64');
    expect(await snap('ls')).to.match(new RegExp(`^${chain}\\s+Committed`, 'm'));
  });

  it('imports debian-multi and runs python3 and cat /etc/os-release; layer 3\'s whiteouts hold; a non-root user reads /etc/passwd', async () => {
    expect(await importDebian()).to.contain('unpacking corpus/debian-multi:l3-whiteouts');
    const script = [
      '/usr/bin/python3 -c "import sys; print(6 * 7, sys.version_info[0])"',
      'cat /etc/os-release',
      // layer 3 deletes these (files of layers 1 and 2, and whole directories)
      'for p in /etc/motd /etc/issue.net /usr/bin/c_rehash /usr/share/info /usr/share/locale /usr/share/ca-certificates/mozilla/Hongkong_Post_Root_CA_3.crt; do [ -e $p ] && echo "STILL THERE $p"; done',
      // and makes /usr/share/doc opaque, with new content
      'echo "doc: $(ls /usr/share/doc | tr "\\n" " ")"', 'echo "doc/apt: $(ls /usr/share/doc/apt)"',
      'setpriv --reuid 65534 --regid 65534 --clear-groups sh -c \'echo "uid $(id -u)"; head -1 /etc/passwd\'',
    ].join('; ');
    const out = await runIn(DEBIAN, 'deb-1', script);
    expect(out).to.contain('42 3\n');
    expect(out).to.contain('VERSION_CODENAME=bookworm');
    expect(out).not.to.contain('STILL THERE');
    expect(out).to.contain('doc: README.corpus apt corpus \n');
    expect(out).to.contain('doc/apt: NEW\n');
    expect(out).to.contain('uid 65534\nroot:x:0:0:root:/root:/bin/bash\n');
  });

  it('the image as containerd unpacked it into layerd is the corpus\'s intended tree (directory mtimes aside)', async () => {
    await importDebian();
    const chain = await chainIds(DEBIAN_MULTI, 'l3-whiteouts');
    const leased = await leasedClient('oracle');
    try {
      await leased.client.call('View', { snapshotter: 'layerd', key: 'oracle-view', parent: chain.at(-1)!, labels: {} });
      const mountLine = await snap('mounts', '/x', 'oracle-view');
      const source = /^mount -t bind (\S+) \/x -o rbind,ro/m.exec(mountLine)?.[1];
      expect(source, mountLine).to.be.a('string');
      const listing = ok('listing.py', await env!.ns('/usr/bin/python3', [join(CORPUS, 'tools', 'listing.py'), source!], { timeoutMs: 300_000 }));
      const intended = await readFile(join(CORPUS, 'expected', 'debian-multi.l3-whiteouts.intended.tsv'), 'utf8');
      // containerd's tar applier leaves some directories it created entries in with the time of the
      // import (its native snapshotter does the same, for more of them): compare directories without mtime.
      const normalize = (text: string): string[] => text.split('\n').filter(Boolean).map((l) => {
        const f = l.split('\t');
        return f[1] === 'd' ? f.slice(0, 11).join('\t') : l;
      });
      const got = normalize(listing);
      const want = normalize(intended);
      const missing = want.filter((l) => !got.includes(l));
      const extra = got.filter((l) => !want.includes(l));
      expect({ missing: missing.slice(0, 10), extra: extra.slice(0, 10) }).to.deep.equal({ missing: [], extra: [] });
    } finally {
      await snap('rm', 'oracle-view');
      await leased.release();
    }
  });

  it('a write inside the container lands in the snapshot\'s writable layer', async () => {
    try {
      const s = await startWriter('writer');
      // The shell creates the file before it writes to it: an empty file is "not yet", not an answer.
      const content = await poll('the write in the upper dir', () => readFile(join(s.upper, 'root', 'inside.txt'), 'utf8').then((t) => t || undefined, () => undefined));
      expect(content).to.equal('written-inside\n');
      // A whiteout in the upper is a 0/0 character device under the deleted name (overlayfs format).
      await poll('the whiteout of /etc/issue', () => lstat(join(s.upper, 'etc', 'issue')).then((st) => (st.isCharacterDevice() && st.rdev === 0) || undefined, () => undefined));
      expect((await env!.mountinfo()).split('\n').some((l) => l.split(' ')[4] === s.mountpoint && / - fuse/.test(l)), 'its FUSE mount').to.equal(true);
    } finally {
      await env!.removeContainer('writer');
    }
  });

  it('runs three containers of one image in parallel, each seeing only its own writes', async () => {
    await importDebian();
    // Overlap is shown by order, not time: each container marks its start in a directory all three
    // share and exits only once it has seen the other two start (or fails after a bound), so a run
    // of one container after another cannot pass.
    const shared = join(work!.dir, 'parallel-markers');
    await mkdir(shared);
    const script = 'echo $0 > /root/mine-$0; : > /markers/started-$0; n=0; '
      + 'until [ "$(ls /markers | grep -c started-)" -eq 3 ]; do n=$((n+1)); [ $n -le 1200 ] || { echo "$0 ran alone"; exit 3; }; sleep 0.1; done; '
      + 'echo "$0 sees: $(ls /root | grep mine- | tr "\\n" " ")"';
    const outs = await Promise.all(['p1', 'p2', 'p3'].map((id) => env!.runScript(DEBIAN, id, script.replaceAll('$0', id),
      { timeoutMs: 300_000, mounts: [`type=bind,src=${shared},dst=/markers,options=rbind:rw`] })));
    expect(outs).to.deep.equal(['p1 sees: mine-p1 \n', 'p2 sees: mine-p2 \n', 'p3 sees: mine-p3 \n']);
    expect((await readdir(shared)).sort()).to.deep.equal(['started-p1', 'started-p2', 'started-p3']);
  });

  it('`ctr snapshots` ls, info, usage, tree, label, mounts and rm give sensible answers (Prepare, Commit, View through containerd)', async () => {
    const chain = await chainIds(DEBIAN_MULTI, 'l3-whiteouts');
    try {
      await snapshotCommands(chain);
    } finally {
      await env!.removeContainer('labelled');
    }
    // containerd's GC then removes them from layerd too
    await env!.gc();
    await poll('layerd to drop by-hand-*', async () => ((await client!.list(['name~="/by-hand"'])).length === 0 ? true : undefined));
  });

  /** The `ctr snapshots` checks, on a container 'labelled' of their own. */
  const snapshotCommands = async (chain: string[]): Promise<void> => {
    const writer = await startWriter('labelled');
    const ls = await snap('ls');
    for (const c of chain) expect(ls).to.match(new RegExp(`^${c}\\s`, 'm'));
    expect(ls).to.match(new RegExp(`^labelled\\s+${chain[2]}\\s+Active`, 'm'));

    const info = JSON.parse(await snap('info', 'labelled')) as { Kind: string; Name: string; Parent: string };
    expect(info).to.include({ Kind: 'Active', Name: 'labelled', Parent: chain[2] });

    const usage = await snap('usage', 'labelled');
    expect(usage).to.match(/^labelled\s+\d+(\.\d+)? (B|KiB)\s+\d+/m);
    const base = await snap('usage', chain[0]!);
    expect(Number(/(\d+)\s*$/.exec(base.trim())![1]), 'inodes of the base layer').to.be.greaterThan(6000);

    const tree = await snap('tree');
    expect(tree).to.match(new RegExp(`^ ${chain[0]}\\n  \\\\_ ${chain[1]}\\n    \\\\_ ${chain[2]}\\n`, 'm'));

    await snap('label', 'labelled', 'containerd.io/snapshot/owner=itest', 'note=hello');
    const labelled = JSON.parse(await snap('info', 'labelled')) as { Labels: Record<string, string> };
    expect(labelled.Labels).to.include({ 'containerd.io/snapshot/owner': 'itest', note: 'hello' });
    const inLayerd = await client!.call<{ info: { labels: Record<string, string> } }>('Stat', { snapshotter: 'layerd', key: writer.name });
    expect(inLayerd.info.labels['containerd.io/snapshot/owner'], 'inherited labels reach layerd').to.equal('itest');

    // a snapshot's life by hand, through containerd's API under a lease (ctr's snapshots
    // prepare/commit/view take none, so containerd's GC may take their results at any time)
    const leased = await leasedClient('by-hand');
    try {
      await leased.client.call('Prepare', { snapshotter: 'layerd', key: 'by-hand', parent: chain[2], labels: {} });
      const handMount = /^mount -t bind (\S+) \/x -o rbind,rw/m.exec(await snap('mounts', '/x', 'by-hand'))?.[1];
      expect(handMount).to.be.a('string');
      ok('write into by-hand', await env!.ns('sh', ['-c', `echo by-hand > ${handMount}/etc/by-hand && rm ${handMount}/etc/hostname`]));
      await leased.client.call('Commit', { snapshotter: 'layerd', name: 'by-hand-c', key: 'by-hand', labels: {} });
      await leased.client.call('View', { snapshotter: 'layerd', key: 'by-hand-v', parent: 'by-hand-c', labels: {} });
      const viewMount = /^mount -t bind (\S+) \/x -o rbind,ro/m.exec(await snap('mounts', '/x', 'by-hand-v'))?.[1];
      expect(ok('read the view', await env!.ns('sh', ['-c', `cat ${viewMount}/etc/by-hand; [ -e ${viewMount}/etc/hostname ] || echo hostname-gone`]))).to.equal('by-hand\nhostname-gone\n');
      expect(await snap('usage', 'by-hand-c')).to.match(/^by-hand-c\s+8\.0 B\s+2\s*$/m); // "by-hand\n"; etc, etc/by-hand (the whiteout is no inode)
      const refused = await env!.ctr(['snapshots', '--snapshotter', 'layerd', 'rm', 'by-hand-c']);
      expect(refused.code).to.not.equal(0);
      expect(refused.stderr).to.match(/child|precondition/i);
      await snap('rm', 'by-hand-v');
      await snap('rm', 'by-hand-c');
      expect(await snap('ls')).not.to.match(/by-hand/);
    } finally {
      await leased.release();
    }
  };

  it('containerd\'s GC removes deleted containers\' snapshots, and layerd unmounts them', async () => {
    const s = await startWriter('to-collect');
    await env!.removeContainer('to-collect');
    await env!.gc();
    await poll('layerd to remove the snapshot', async () => ((await client!.list([`name==${JSON.stringify(s.name)}`])).length === 0 ? true : undefined));
    await poll('the mount to go', async () => ((await env!.mountinfo()).includes(s.mountpoint) ? undefined : true));
    // (deleted just after Remove answers: containerd's GC holds its lock through Remove)
    await poll('the writable layer to be deleted', () => stat(s.upper).then(() => undefined, () => true));
    expect(env!.layerd!.log()).to.contain(`"snapshot":${JSON.stringify(s.name)}`);
    // and so those of every other container (the tests remove theirs): only committed image layers are left
    expect((await client!.list()).filter((i) => i.kind !== 'COMMITTED').map((i) => i.name)).to.deep.equal([]);
    expect((await env!.mountinfo()).split('\n').filter((l) => / - fuse/.test(l) && l.includes(env!.layerdRoot))).to.deep.equal([]);
  });

  it('a running container keeps working while layerd restarts', async () => {
    await importDebian();
    await importBusybox();
    // The container works in a loop until the test tells it to stop (a file in a bind-mounted
    // directory), so the test can see it make progress while layerd is down and after, whatever
    // the machine's speed; the loop's bound ends it if the test never does.
    const control = join(work!.dir, 'restart-control');
    await mkdir(control);
    const script = 'i=0; while [ ! -e /control/stop ]; do [ $i -lt 2000 ] || exit 14; echo $i >> /root/log || exit 11; '
      + 'cat /etc/os-release > /dev/null || exit 12; /usr/bin/python3 -c "pass" || exit 13; i=$((i+1)); sleep 0.05; done; wc -l < /root/log > /control/lines';
    const running = env!.ctr(['run', '--rm', '--snapshotter', 'layerd', '--mount', `type=bind,src=${control},dst=/control,options=rbind:rw`,
      DEBIAN, 'restart-1', 'sh', '-c', script], { timeoutMs: 300_000 });
    let stopped = false;
    try {
      const s = await poll('the container\'s snapshot', () => layerdSnapshotOf('restart-1'));
      const log = join(s.upper, 'root', 'log');
      const lines = (): Promise<number> => readFile(log, 'utf8').then((t) => t.split('\n').length - 1, () => 0);
      /** The log grows by a few lines from now on: the container keeps running its loop. */
      const progresses = async (what: string): Promise<void> => {
        const from = await lines();
        await poll(what, async () => ((await lines()) >= from + 3 ? true : undefined), 60_000);
      };
      // running (containerd is done with the snapshotter for it): its first lines are in the writable layer
      await progresses('the container to run');
      client!.close();
      expect(await env!.stopLayerd()).to.equal(0);
      expect((await env!.mountinfo()).includes(s.mountpoint), 'the mount stays while layerd is down').to.equal(true);
      await progresses('the container to work while layerd is down');
      const layerd = await env!.startLayerd();
      client = snapshotsClient(env!.snapshotterSocket);
      expect(layerd.log()).to.match(/snapshots restored/);
      await progresses('the container to work after layerd is back');
      const seen = await lines();
      await writeFile(join(control, 'stop'), '');
      stopped = true;
      const result = await running;
      expect(result.stderr).to.equal('');
      expect(result.code, 'the container saw no error').to.equal(0);
      // (through the control directory: ctr's own stdout can lose a task's last output, ContainerdEnv.runScript)
      expect(Number((await readFile(join(control, 'lines'), 'utf8')).trim()), 'lines the container wrote').to.be.at.least(seen);
    } finally {
      if (!stopped) {
        await writeFile(join(control, 'stop'), '');
        await running;
      }
    }
    // and the restarted layerd still serves containerd, once containerd's gRPC connection to the
    // proxy snapshotter has left the backoff it entered while layerd was down (up to seconds,
    // growing with the downtime: containerd's behaviour, not layerd's)
    await poll('containerd to reach the restarted snapshotter', async () => (
      (await env!.ctr(['snapshots', '--snapshotter', 'layerd', 'ls'])).code === 0 ? true : undefined), 120_000);
    expect(await runIn(BB, 'bb-after-restart', 'echo still here')).to.equal('still here\n');
  });
});
