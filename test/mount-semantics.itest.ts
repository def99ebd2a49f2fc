/**
 * Union-filesystem semantics, written once and run unchanged against layerd
 * (`mountCommand`, FUSE), kernel overlayfs and fuse-overlayfs, all mounting
 * the same freshly prepared lower directories (in overlayfs format: 0/0
 * character-device whiteouts, `trusted.overlay.opaque`). Where layerd
 * deliberately differs from its peers, the implementation's `differences`
 * entry says so and the test checks each side's documented behaviour.
 *
 * The mounts are only touched with async fs calls or from child processes.
 * Needs root, /dev/fuse, overlayfs, fuse-overlayfs, attr and util-linux.
 */
import assert from 'node:assert/strict';
import { access, appendFile, lstat, mkdir, readdir, readFile, readlink, rename, rmdir, stat, symlink, unlink, writeFile, chmod } from 'node:fs/promises';
import { join } from 'node:path';
import { clearDeadMount, findMount, isDeadMount } from '../mount/deadMount.js';
import {
  ALL_IMPLEMENTATIONS, FIXTURE_MTIME, FIXTURE_XATTR, hasWhiteout, makeWorkspace, mustRun, removeWorkspace, run,
  type MountedUnionUnderTest, type Workspace,
} from './fixtures/mount/harness.js';
import { CORPUS } from './support/env.js';

const LISTING_TOOL = join(CORPUS, 'tools/listing.py');

/** The merged tree after the scripted changes, as kernel overlayfs shows it (mtime column dropped). */
const EXPECTED_AFTER_SCRIPT: string[] = [
  ['path', 'type', 'mode', 'uid', 'gid', 'size', 'nlink', 'rdev', 'link', 'sha256', 'xattrs'],
  ['/a', 'd', '0755', '0', '0', '', '', '', '', '', ''],
  ['/a/b', 'd', '0755', '0', '0', '', '', '', '', '', ''],
  ['/a/b/c', 'd', '0755', '0', '0', '', '', '', '', '', ''],
  ['/a/b/special', 'f', '4750', '1234', '99', '16', '1', '', '', 'e168e0d24f43312c1b438f8f704b54fee3519f05a8398eba08017cc44e44b0aa', 'user.bin=00ff0a3d225c'],
  ['/a/fifo', 'p', '0600', '0', '0', '', '', '', '', '', ''],
  ['/a/sl', 'l', '0777', '0', '0', '', '', '', '../target', '', ''],
  ['/del', 'd', '0755', '0', '0', '', '', '', '', '', ''],
  ['/del/f1', 'f', '0644', '0', '0', '3', '1', '', '', 'd690916cdea320e620748799a2051a0f4e07d6d0c3e2bc199ea3c69e0c0b5e4f', ''],
  ['/etc', 'd', '0755', '0', '0', '', '', '', '', '', ''],
  ['/etc/dir', 'd', '0755', '0', '0', '', '', '', '', '', ''],
  ['/etc/dir/keep', 'f', '0644', '0', '0', '10', '1', '', '', 'd5b56c0bdfb7651142405bc56be4519f92525362dc80a24a84ca2820e68f50ab', ''],
  ['/etc/dir/new2', 'f', '0644', '1', '2', '5', '1', '', '', '07d7d3b7915dbc7aa2ef47d7526ff223f8efa908ec2507be7e820713f19345ff', ''],
  ['/etc/new-renamed', 'f', '0644', '0', '0', '5', '1', '', '', '6667b2d1aab6a00caa5aee5af8ad9f1465e567abf1c209d15727d57b3e8f6e5f', ''],
  ['/etc/passwd', 'f', '0600', '0', '0', '11', '1', '', '', '7cf1f940025c27c78e5e4a707519f0e06178702e6dc16722f3d48e13f5e60d9e', 'user.x=0102'],
  ['/etc/secret', 'f', '0600', '0', '0', '7', '1', '', '', '82ba9d712d21dc7585dd6a1f29790679985547f009baee10ea2e3edd41ce957d', ''],
  ['/hl', 'd', '0755', '0', '0', '', '', '', '', '', ''],
  ['/hl/a', 'f', '0644', '0', '0', '3', '2', '', '', '1366d3d1f1f106e9266cf68d20a6b7ecae0e89bbb090894336f81bc9056d1c83', ''],
  ['/hl/b', 'f', '0644', '0', '0', '3', '2', '', '', '1366d3d1f1f106e9266cf68d20a6b7ecae0e89bbb090894336f81bc9056d1c83', ''],
  ['/link', 'l', '0777', '0', '0', '', '', '', 'etc/passwd', '', ''],
  ['/opq', 'd', '0700', '0', '0', '', '', '', '', '', ''],
  ['/opq/sub', 'd', '0755', '0', '0', '', '', '', '', '', ''],
  ['/ren', 'd', '0755', '0', '0', '', '', '', '', '', ''],
  ['/ren/a', 'f', '0644', '0', '0', '2', '1', '', '', '06f961b802bc46ee168555f066d28f4f0e9afdf3f88174c1ee6f9de004fc30a0', ''],
].map((columns) => columns.join('\t'));

async function exists(path: string): Promise<boolean> {
  return lstat(path).then(() => true, () => false);
}

async function errnoOf(work: Promise<unknown>): Promise<string | undefined> {
  try {
    await work;
    return undefined;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code;
  }
}

async function sortedNames(dir: string): Promise<string[]> {
  return (await readdir(dir)).sort();
}

/** Every name under `dir`, recursively (relative paths). */
async function walk(dir: string, prefix = ''): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const rel = prefix + entry.name;
    out.push(rel);
    if (entry.isDirectory()) out.push(...(await walk(join(dir, entry.name), rel + '/')));
  }
  return out;
}

async function xattrHex(path: string, name: string): Promise<string | undefined> {
  const res = await run('getfattr', ['-h', '--only-values', '-e', 'hex', '-n', name, path]);
  if (res.code !== 0) return undefined;
  return (await mustRun('getfattr', ['-h', '-e', 'hex', '-n', name, '--absolute-names', path])).split('\n')
    .find((l) => l.startsWith(name + '='))?.slice(name.length + 1);
}

for (const impl of ALL_IMPLEMENTATIONS) {
  describe(`mount semantics: ${impl.name}`, function () {
    this.timeout(60_000);
    let ws: Workspace;
    let mounted: MountedUnionUnderTest | undefined;
    const at = (path: string): string => join(ws.mnt, path);

    const remount = async (): Promise<void> => {
      await mounted!.unmount();
      mounted = undefined;
      mounted = await impl.mount(ws.lowers, ws.upper, ws.work, ws.mnt);
    };

    beforeEach(async () => {
      ws = await makeWorkspace();
      mounted = await impl.mount(ws.lowers, ws.upper, ws.work, ws.mnt);
    });

    afterEach(async () => {
      try {
        await mounted?.unmount();
      } finally {
        mounted = undefined;
        await removeWorkspace(ws);
      }
    });

    it('hides whited-out files and directories', async () => {
      assert.equal(await exists(at('bye')), false);
      assert.equal(await exists(at('byedir')), false);
      assert.equal(await errnoOf(stat(at('byedir/child'))), 'ENOENT');
      assert.deepEqual(await sortedNames(ws.mnt), ['del', 'etc', 'hl', 'link', 'opq', 'ren', 'special']);
    });

    it('shows only the top layer in an opaque directory, merges others', async () => {
      assert.deepEqual(await sortedNames(at('opq')), ['new']);
      assert.deepEqual(await sortedNames(at('etc/dir')), ['gone', 'keep', 'new2']);
    });

    it('copies up on chmod keeping content, owner, times and xattrs', async () => {
      await chmod(at('special'), 0o4710);
      for (const path of [at('special'), join(ws.upper, 'special')]) {
        const st = await lstat(path);
        assert.equal(st.mode & 0o7777, 0o4710, path);
        assert.deepEqual([st.uid, st.gid, Math.floor(st.mtimeMs / 1000)], [1234, 99, FIXTURE_MTIME], path);
        assert.equal(await readFile(path, 'utf8'), 'special content\n');
        assert.equal(await xattrHex(path, 'user.bin'), '0x' + FIXTURE_XATTR.toString('hex'), path);
      }
    });

    it('copies up a hard-linked lower file per its documented link semantics', async () => {
      assert.equal(await readFile(at('hl/b'), 'utf8'), 'HL\n'); // now in the page cache, if cached
      await mustRun('python3', ['-c', 'import os,sys; fd = os.open(sys.argv[1], os.O_WRONLY); os.pwrite(fd, b"hl", 0); os.close(fd)', at('hl/a')]);
      if (impl.differences.hardLinkCopyUp === 'keeps-group') {
        assert.equal(await readFile(at('hl/b'), 'utf8'), 'hl\n', 'same-size change seen through the other name');
      }
      await appendFile(at('hl/a'), 'more\n');
      const [a, b] = [await stat(at('hl/a')), await stat(at('hl/b'))];
      if (impl.differences.hardLinkCopyUp === 'keeps-group') {
        // layerd (and fuse-overlayfs): every name of the group stays one inode.
        assert.equal(await readFile(at('hl/b'), 'utf8'), 'hl\nmore\n');
        assert.equal(a.ino, b.ino);
        assert.deepEqual([a.nlink, b.nlink], [2, 2]);
        if (impl.name.startsWith('layerd')) {
          // layerd's upper holds the group as real hard links.
          assert.equal((await lstat(join(ws.upper, 'hl/a'))).ino, (await lstat(join(ws.upper, 'hl/b'))).ino);
        }
      } else {
        // overlayfs without index=on: the copied-up name leaves the group.
        assert.equal(await readFile(at('hl/b'), 'utf8'), 'HL\n');
        assert.notEqual(a.ino, b.ino);
      }
    });

    it('renames a lower file, whiting out the old name', async () => {
      await rename(at('etc/passwd'), at('etc/passwd2'));
      assert.equal(await readFile(at('etc/passwd2'), 'utf8'), 'root:x:0:0\n');
      assert.equal(await exists(at('etc/passwd')), false);
      assert.equal(await hasWhiteout(ws.upper, 'etc/passwd'), true);
      await remount();
      assert.equal(await exists(at('etc/passwd')), false);
      assert.equal(await readFile(at('etc/passwd2'), 'utf8'), 'root:x:0:0\n');
    });

    it('renames a lower directory per its documented semantics', async () => {
      const result = await errnoOf(rename(at('ren'), at('ren2')));
      if (impl.differences.renameLowerDir === 'EXDEV') {
        // Peers without redirect_dir refuse; callers (mv) fall back to copying.
        assert.equal(result, 'EXDEV');
        return;
      }
      // layerd: the directory is copied up whole, renamed, and the old name whited out.
      assert.equal(result, undefined);
      assert.deepEqual(await sortedNames(at('ren2')), ['a', 'sub']);
      assert.equal(await readFile(at('ren2/sub/b'), 'utf8'), 'B\n');
      assert.equal(await exists(at('ren')), false);
      assert.equal(await hasWhiteout(ws.upper, 'ren'), true);
      await remount();
      assert.deepEqual(await sortedNames(at('ren2')), ['a', 'sub']);
      assert.equal(await exists(at('ren')), false);
    });

    it('renames new files and directories within the upper', async () => {
      await mkdir(at('newdir'));
      await writeFile(at('newdir/f'), 'f');
      await rename(at('newdir'), at('etc/moved'));
      await rename(at('etc/moved/f'), at('etc/moved/g'));
      assert.deepEqual(await sortedNames(at('etc/moved')), ['g']);
      assert.equal(await exists(at('newdir')), false);
    });

    it('records unlink and rmdir of lower content as whiteouts in the upper', async () => {
      await unlink(at('etc/dir/gone'));
      await unlink(at('del/f1'));
      await rmdir(at('del'));
      assert.equal(await hasWhiteout(ws.upper, 'etc/dir/gone'), true);
      assert.equal(await hasWhiteout(ws.upper, 'del'), true);
      assert.deepEqual(await sortedNames(at('etc/dir')), ['keep', 'new2']);
      assert.equal(await errnoOf(rmdir(at('etc'))), 'ENOTEMPTY');
      await remount();
      assert.equal(await exists(at('del')), false);
      assert.equal(await exists(at('etc/dir/gone')), false);
    });

    it('makes a directory recreated over a deleted lower one empty', async () => {
      await unlink(at('del/f1'));
      await rmdir(at('del'));
      await mkdir(at('del'));
      assert.deepEqual(await sortedNames(at('del')), []);
      await remount();
      assert.deepEqual(await sortedNames(at('del')), []);
    });

    it('never shows whiteout or opaque markers in readdir', async () => {
      await unlink(at('etc/dir/gone'));
      await unlink(at('del/f1'));
      await rmdir(at('del'));
      await mkdir(at('del'));
      const names = await walk(ws.mnt);
      assert.deepEqual(names.filter((n) => /(^|\/)\.wh\./.test(n)), []);
      assert.ok(names.includes('etc/dir/keep'));
    });

    it('round-trips binary xattr values exactly', async () => {
      const value = '0x00ff0a3d225c80';
      await writeFile(at('xnew'), 'x');
      for (const path of [at('xnew'), at('etc/dir/keep')]) {
        await mustRun('setfattr', ['-n', 'user.test', '-v', value, path]);
        assert.equal(await xattrHex(path, 'user.test'), value, path);
      }
      assert.equal(await xattrHex(at('etc/dir/keep'), 'user.nonexistent'), undefined);
      const missing = await run('getfattr', ['-n', 'user.nonexistent', at('etc/dir/keep')]);
      assert.match(missing.stderr, /No such attribute/);
      // Larger than Python's first 256-byte buffer: exercises ERANGE and the size query.
      const big = await mustRun('python3', ['-c', [
        'import os, sys',
        'value = bytes(range(256)) * 4',
        'os.setxattr(sys.argv[1], "user.big", value)',
        'assert os.getxattr(sys.argv[1], "user.big") == value',
        'assert "user.big" in os.listxattr(sys.argv[1])',
        'print("ok")',
      ].join('\n'), at('etc/dir/keep')]);
      assert.equal(big.trim(), 'ok');
    });

    it('reads and writes large files at offsets, also after a copy-up', async () => {
      const script = [
        'import hashlib, os, sys',
        'p = os.path.join(sys.argv[1], "big")',
        'data = os.urandom(5 * 1024 * 1024 + 123)',
        'open(p, "wb").write(data)',
        'assert open(p, "rb").read() == data',
        'fd = os.open(p, os.O_RDWR)',
        'os.pwrite(fd, b"X" * 70000, 3 * 1024 * 1024 + 7)',
        'assert os.pread(fd, 10, 3 * 1024 * 1024 + 5) == data[3*1024*1024+5:3*1024*1024+7] + b"X" * 8',
        'os.close(fd)',
        'q = os.path.join(sys.argv[1], "etc/dir/keep")',
        'fd = os.open(q, os.O_WRONLY)',
        'os.pwrite(fd, b"KE", 0)',
        'os.close(fd)',
        'assert open(q, "rb").read() == b"KEep\\n", open(q, "rb").read()',
        'print("ok")',
      ].join('\n');
      assert.equal((await mustRun('python3', ['-c', script, ws.mnt])).trim(), 'ok');
    });

    it('survives concurrent copy-ups and creates in the same lower directories', async () => {
      const script = [
        'cd "$1"',
        // each job's status counts: a bare `wait` returns 0 whatever the jobs did
        'pids=""',
        'for i in $(seq 1 20); do (echo "$i" >> etc/dir/keep && echo "$i" > etc/dir/n$i && touch ren/sub/t$i && chmod 0640 ren/a) & pids="$pids $!"; done',
        'status=0; for p in $pids; do wait "$p" || status=1; done; exit $status',
      ].join('\n');
      const res = await run('sh', ['-c', script, 'sh', ws.mnt]);
      assert.equal(res.code, 0, res.stderr);
      const lines = (await readFile(at('etc/dir/keep'), 'utf8')).split('\n').filter((l) => l !== '');
      assert.equal(lines.length, 21);
      assert.deepEqual(lines.slice(1).map(Number).sort((a, b) => a - b), Array.from({ length: 20 }, (_, i) => i + 1));
      assert.equal((await readdir(at('etc/dir'))).filter((n) => /^n\d+$/.test(n)).length, 20);
      assert.equal((await readdir(at('ren/sub'))).length, 21);
      assert.equal((await lstat(at('ren/a'))).mode & 0o7777, 0o640);
    });

    it('creates a fifo with mknod', async () => {
      await mustRun('mkfifo', ['-m', '0640', at('etc/fifo')]);
      const st = await lstat(at('etc/fifo'));
      assert.equal(st.isFIFO(), true);
      assert.equal(st.mode & 0o7777, 0o640);
    });

    it('creates and reads symlinks', async () => {
      assert.equal(await readlink(at('link')), 'etc/passwd');
      assert.equal(await readFile(at('link'), 'utf8'), 'root:x:0:0\n');
      await symlink('../special', at('etc/sl'));
      assert.equal(await readlink(at('etc/sl')), '../special');
      assert.equal((await lstat(at('etc/sl'))).isSymbolicLink(), true);
    });

    it('keeps inode numbers stable across a remount', async () => {
      await writeFile(at('etc/fresh'), 'fresh');
      const paths = ['etc', 'etc/passwd', 'etc/dir/keep', 'etc/dir/new2', 'hl/a', 'hl/b', 'link', 'etc/fresh'];
      const before = await Promise.all(paths.map(async (p) => (await lstat(at(p))).ino));
      assert.equal(before[4], before[5], 'hard links share an inode');
      assert.equal(new Set(before).size, paths.length - 1, 'different files differ');
      await remount();
      const after = await Promise.all(paths.map(async (p) => (await lstat(at(p))).ino));
      if (impl.differences.mergedDirInoAfterRemount === 'upper') {
        // fuse-overlayfs: 'etc' (copied up by the create) now reports its upper directory's number.
        assert.deepEqual(after.slice(1), before.slice(1));
        assert.notEqual(after[0], before[0]);
      } else {
        assert.deepEqual(after, before);
      }
    });

    it('lets a non-root user read a 0644 file and denies a 0600 root file', async () => {
      const asUser = (path: string) => run('setpriv', ['--reuid', '1000', '--regid', '1000', '--clear-groups', 'cat', path]);
      const ok = await asUser(at('etc/passwd'));
      assert.equal(ok.code, 0, ok.stderr);
      assert.equal(ok.stdout, 'root:x:0:0\n');
      const denied = await asUser(at('etc/secret'));
      assert.notEqual(denied.code, 0);
      assert.match(denied.stderr, /Permission denied/);
    });

    it('gives a new file to the user who created it', async () => {
      await mkdir(at('shared'));
      await chmod(at('shared'), 0o1777);
      const res = await run('setpriv', ['--reuid', '1000', '--regid', '1000', '--clear-groups', 'sh', '-c', ': > "$1"', 'sh', at('shared/mine')]);
      assert.equal(res.code, 0, res.stderr);
      const st = await lstat(at('shared/mine'));
      assert.deepEqual([st.uid, st.gid], [1000, 1000]);
    });

    it('sets atime and mtime (utimes, touch -d, touch -a/-m)', async () => {
      const seconds = async (path: string): Promise<[number, number]> => {
        const st = await lstat(path);
        return [Math.floor(st.atimeMs / 1000), Math.floor(st.mtimeMs / 1000)];
      };
      await mustRun('python3', ['-c', 'import os,sys; os.utime(sys.argv[1], (1600000000, 1500000000))', at('etc/passwd')]);
      assert.deepEqual(await seconds(at('etc/passwd')), [1_600_000_000, 1_500_000_000]);
      await mustRun('touch', ['-d', '@1700000000', at('etc/passwd')]);
      assert.deepEqual(await seconds(at('etc/passwd')), [1_700_000_000, 1_700_000_000]);
      await mustRun('touch', ['-m', '-d', '@1400000000', at('etc/passwd')]);
      assert.deepEqual(await seconds(at('etc/passwd')), [1_700_000_000, 1_400_000_000]);
    });

    it('shows the same tree as the reference after a script of changes', async () => {
      const sh = async (script: string): Promise<void> => {
        const res = await run('sh', ['-ec', script, 'sh', ws.mnt]);
        assert.equal(res.code, 0, `${script}: ${res.stderr}`);
      };
      await sh('cd "$1"; echo data > etc/new; echo more >> etc/dir/keep; chmod 0600 etc/passwd; chown 1:2 etc/dir/new2');
      await sh('cd "$1"; rm etc/dir/gone; mkdir -p a/b/c; rm ren/sub/b; rmdir ren/sub; mv etc/new etc/new-renamed');
      await sh('cd "$1"; ln -s ../target a/sl; setfattr -n user.x -v 0x0102 etc/passwd; mkfifo -m 0600 a/fifo');
      await sh('cd "$1"; mv special a/b/special; rm opq/new; mkdir opq/sub; chmod 0700 opq');
      const listing = await mustRun('python3', [LISTING_TOOL, ws.mnt]);
      // Times differ by nature (new files get "now"); everything else must match.
      const withoutTimes = listing.trimEnd().split('\n').map((line) => line.split('\t').slice(0, -1).join('\t'));
      const expected = impl.differences.renameCopyUpKeepsSetuid
        ? EXPECTED_AFTER_SCRIPT
        : EXPECTED_AFTER_SCRIPT.map((line) => line.replace(/^(\/a\/b\/special\tf\t)4750/, '$10750'));
      assert.deepEqual(withoutTimes, expected);
    });

    it('gives ENOTCONN once the server is killed, and the clear helper recovers the mountpoint', async function () {
      if (!impl.differences.hasServer || mounted?.serverPid === undefined) this.skip(); // kernel overlayfs has no server
      process.kill(mounted!.serverPid!, 'SIGKILL');
      let code: string | undefined;
      for (let i = 0; i < 50 && code !== 'ENOTCONN'; i++) {
        code = await errnoOf(stat(at('etc')));
        if (code !== 'ENOTCONN') await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(code, 'ENOTCONN');
      assert.equal(await isDeadMount(ws.mnt), true);
      assert.equal(await clearDeadMount(ws.mnt), true);
      assert.equal(await findMount(ws.mnt), undefined);
      await access(ws.mnt);
      assert.deepEqual(await readdir(ws.mnt), []);
    });
  });
}
