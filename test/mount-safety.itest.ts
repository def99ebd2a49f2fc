/**
 * The safe-filesystem checks (issue: no host file leaks, no silent loss,
 * every POSIX object, exact metadata), each through a real mount, run
 * against layerd and, where the behaviour is defined, kernel overlayfs (the
 * union-semantics suite's pattern and workspace).
 *
 * Mounts are only touched from child processes (python3), never with
 * synchronous calls from this process.
 */
import assert from 'node:assert/strict';
import { chmod, lstat, mkdir, readdir, readFile, rm, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  kernelOverlay, layerd, layerdPassthroughOff, layerdWriteback, makeWorkspace, mustRun, removeWorkspace, run, startLayerdServer, stopLayerdServer,
  type MountedUnionUnderTest, type UnionImplementation, type Workspace,
} from './fixtures/mount/harness.js';

/** Run a python3 snippet; `args` are its sys.argv[1:]. Resolves with stdout; rejects with stderr on failure. */
async function py(code: string, ...args: string[]): Promise<string> {
  const res = await run('python3', ['-c', code, ...args], 60_000);
  if (res.code !== 0) throw new Error(`python3 failed (${res.code}): ${res.stderr}`);
  return res.stdout;
}

/** The errno name a python snippet's single OS call fails with ("OK" when it does not). */
async function errnoOfPy(code: string, ...args: string[]): Promise<string> {
  return (await py(`import errno, os, sys, socket
try:
${code.split('\n').map((l) => '    ' + l).join('\n')}
    print('OK')
except OSError as e:
    print(errno.errorcode[e.errno])`, ...args)).trim();
}

/** lstat fields of a path in the mount, through python (ns times, nlink of every type). */
interface PyStat { mode: number; nlink: number; uid: number; gid: number; size: number; mtimeNs: string; atimeNs: string }

async function pyStat(path: string): Promise<PyStat> {
  const out = await py(`import os, sys, json
st = os.lstat(sys.argv[1])
print(json.dumps({'mode': st.st_mode, 'nlink': st.st_nlink, 'uid': st.st_uid, 'gid': st.st_gid, 'size': st.st_size,
  'mtimeNs': str(st.st_mtime_ns), 'atimeNs': str(st.st_atime_ns)}))`, path);
  return JSON.parse(out) as PyStat;
}

const NAME_255 = 'n'.repeat(255);

for (const impl of [layerd, layerdPassthroughOff, layerdWriteback, kernelOverlay]) {
  describe(`mount safety: ${impl.name}`, function () {
    this.timeout(120_000);
    let ws: Workspace;
    let mounted: MountedUnionUnderTest | undefined;
    const at = (path: string): string => join(ws.mnt, path);
    const isLayerd = impl.name.startsWith('layerd');

    const mount = async (lowers = ws.lowers, upper = ws.upper, work = ws.work, impl2: UnionImplementation = impl): Promise<void> => {
      mounted = await impl2.mount(lowers, upper, work, ws.mnt);
    };
    const unmount = async (): Promise<void> => {
      const m = mounted;
      mounted = undefined;
      await m?.unmount();
    };
    const remount = async (): Promise<void> => {
      await unmount();
      await mount();
    };

    beforeEach(async () => {
      ws = await makeWorkspace();
      await writeFile(join(ws.lowers[1]!, NAME_255), 'long name\n');
      await mount();
    });

    afterEach(async () => {
      try {
        await unmount();
      } finally {
        await removeWorkspace(ws);
      }
    });

    it('never reads back a name or xattr a user made as a whiteout or opaque marker', async () => {
      await py(`import os, sys
m = sys.argv[1]
open(os.path.join(m, '.wh..wh..opq'), 'w').write('mine')
open(os.path.join(m, 'etc/.wh.passwd'), 'w').write('mine too')
os.mkdir(os.path.join(m, 'etc/.wh.dir'))
os.setxattr(os.path.join(m, 'etc'), 'trusted.overlay.opaque', b'y')
os.setxattr(os.path.join(m, 'etc/dir'), 'user.overlay.opaque', b'y')`, ws.mnt);
      assert.equal(await errnoOfPy(`os.mknod(sys.argv[1], 0o600 | 0o020000, os.makedev(0, 0))`, at('etc/wh')), 'EPERM',
        'a 0/0 character device is a whiteout: nobody may make one');
      const check = async (when: string): Promise<void> => {
        assert.deepEqual((await readdir(ws.mnt)).sort(), ['.wh..wh..opq', 'del', 'etc', 'hl', 'link', NAME_255, 'opq', 'ren', 'special'].sort(), when);
        assert.deepEqual((await readdir(at('etc'))).sort(), ['.wh.dir', '.wh.passwd', 'dir', 'passwd', 'secret'], when);
        assert.deepEqual((await readdir(at('etc/dir'))).sort(), ['gone', 'keep', 'new2'], when);
        assert.equal(await readFile(at('etc/passwd'), 'utf8'), 'root:x:0:0\n', when);
        assert.equal(await readFile(at('.wh..wh..opq'), 'utf8'), 'mine', when);
        assert.equal((await py(`import os, sys; print(os.getxattr(sys.argv[1], 'trusted.overlay.opaque').decode())`, at('etc'))).trim(), 'y', when);
      };
      await check('live');
      await remount();
      await check('after a remount');
      if (isLayerd) {
        // The upper as a lower of a new mount (how a container's layer is rotated): still names, not markers.
        await unmount();
        const upper2 = join(ws.root, 'upper2');
        await mkdir(upper2);
        await mount([ws.upper, ...ws.lowers], upper2);
        await check('with the upper as a lower');
      }
    });

    it('creates Unix sockets that work and behave like any node, across a remount', async () => {
      const out = await py(`import os, sys, socket, stat
m = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(os.path.join(m, 'sock'))
srv.listen(1)
cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
cli.connect(os.path.join(m, 'sock'))
conn, _ = srv.accept()
cli.sendall(b'ping')
got = conn.recv(4)
os.link(os.path.join(m, 'sock'), os.path.join(m, 'sock2'))
os.rename(os.path.join(m, 'sock2'), os.path.join(m, 'etc/sock3'))
os.chown(os.path.join(m, 'sock'), 12, 34)
os.utime(os.path.join(m, 'sock'), ns=(5, 1500000000123456789), follow_symlinks=False)
st = os.lstat(os.path.join(m, 'etc/sock3'))
print(got.decode(), stat.S_ISSOCK(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, st.st_mtime_ns)`, ws.mnt);
      assert.equal(out.trim(), 'ping True 2 12 34 1500000000123456789');
      await remount();
      const st = await pyStat(at('sock'));
      assert.equal(st.mode & 0o170000, 0o140000, 'still a socket after a remount');
      assert.deepEqual([st.nlink, st.uid, st.gid, st.mtimeNs], [2, 12, 34, '1500000000123456789']);
      await py(`import os, sys; os.unlink(sys.argv[1]); os.unlink(sys.argv[2])`, at('sock'), at('etc/sock3'));
      assert.equal(await errnoOfPy(`os.lstat(sys.argv[1])`, at('sock')), 'ENOENT');
    });

    it('keeps nanosecond times exactly, and UTIME_OMIT leaves a time alone', async () => {
      await py(`import os, sys
os.utime(sys.argv[1], ns=(100000000, 1700000000123456789))
os.utime(sys.argv[2], ns=(1, -1500000000))`, at('etc/passwd'), at('del/f1'));
      let st = await pyStat(at('etc/passwd'));
      assert.deepEqual([st.atimeNs, st.mtimeNs], ['100000000', '1700000000123456789']);
      await mustRun('touch', ['-m', '-d', '@1600000000.5', at('etc/passwd')]); // mtime only: atime omitted
      st = await pyStat(at('etc/passwd'));
      assert.deepEqual([st.atimeNs, st.mtimeNs], ['100000000', '1600000000500000000']);
      await remount();
      st = await pyStat(at('etc/passwd'));
      assert.deepEqual([st.atimeNs, st.mtimeNs], ['100000000', '1600000000500000000'], 'after a remount');
      assert.equal((await pyStat(at('del/f1'))).mtimeNs, '-1500000000', 'a time before 1970');
    });

    it('shows lower directory times to the nanosecond', async () => {
      await unmount();
      await py(`import os, sys; os.utime(sys.argv[1], ns=(7, 1234567890987654321), follow_symlinks=False)`, join(ws.lowers[1]!, 'ren/a'));
      await mount();
      assert.equal((await pyStat(at('ren/a'))).mtimeNs, '1234567890987654321');
    });

    it('counts links: hard-linked symlinks, and an open file unlinked has nlink 0', async () => {
      await unmount();
      await py(`import os, sys; os.link(sys.argv[1], sys.argv[2], follow_symlinks=False)`, join(ws.lowers[1]!, 'link'), join(ws.lowers[1]!, 'link2'));
      await mount();
      assert.equal((await pyStat(at('link'))).nlink, 2, 'a hard-linked symlink in a lower');
      const out = await py(`import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b'x')
fd2 = os.open(sys.argv[2], os.O_RDONLY)
os.unlink(sys.argv[1])
os.unlink(sys.argv[2])
os.fchmod(fd, 0o600)
print(os.fstat(fd).st_nlink, os.fstat(fd2).st_nlink, oct(os.fstat(fd).st_mode & 0o777), os.pread(fd, 1, 0).decode(), os.pread(fd2, 3, 0).decode())`,
      at('new'), at('ren/a'));
      // overlayfs answers fstat of a lower file opened read-only from the lower inode itself, which keeps its link.
      assert.equal(out.trim(), isLayerd ? '0 0 0o600 x A' : '0 1 0o600 x A');
      assert.deepEqual((await readdir(ws.mnt)).filter((n) => n.startsWith('.')), [], 'no stand-in name is left in the namespace');
      if (isLayerd) {
        // Directories: 2 + subdirectories, as on any Linux filesystem (overlayfs reports 1 for merged directories).
        assert.equal((await pyStat(at('ren'))).nlink, 3);
        assert.equal((await pyStat(at('etc'))).nlink, 3);
        assert.equal((await pyStat(ws.mnt)).nlink, 2 + 5, 'del, etc, hl, opq, ren');
      }
    });

    it('deletes a 255-byte name for good, refuses 256 with ENAMETOOLONG, and serves 4095-byte paths', async () => {
      await py(`import os, sys; os.unlink(sys.argv[1])`, at(NAME_255));
      assert.equal(await errnoOfPy(`open(sys.argv[1], 'w')`, at('n'.repeat(256))), 'ENAMETOOLONG');
      assert.equal(await errnoOfPy(`os.lstat(sys.argv[1])`, at('n'.repeat(256))), 'ENAMETOOLONG');
      // A path of exactly 4095 bytes (PATH_MAX less the NUL) from the root of the host.
      const deep = await py(`import os, sys
m = sys.argv[1]
p = m
while len(p) + 1 + 200 + 1 + 10 < 4095:
    p = os.path.join(p, 'd' * 200)
    os.mkdir(p)
last = 4095 - len(p) - 1
f = os.path.join(p, 'f' * last)
assert len(f) == 4095, len(f)
open(f, 'w').write('deep')
print(f)`, ws.mnt);
      const file = deep.trim();
      assert.equal(file.length, 4095);
      await remount();
      assert.equal(await readFile(file, 'utf8'), 'deep');
      await mustRun('rm', ['-rf', at('d'.repeat(200))]); // in the upper its path would pass PATH_MAX: removed through the mount
      assert.equal(await errnoOfPy(`os.lstat(sys.argv[1])`, at(NAME_255)), 'ENOENT', 'still deleted after a remount');
      // Deeper than PATH_MAX, through directory descriptors: the union has no path limit of its own.
      const beyond = await py(`import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
for i in range(30):
    os.mkdir('e' * 200, dir_fd=fd)
    nfd = os.open('e' * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = nfd
f = os.open('leaf', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
os.write(f, b'beyond')
os.close(f)
g = os.open('leaf', os.O_RDONLY, dir_fd=fd)
print(os.read(g, 10).decode())`, ws.mnt);
      assert.equal(beyond.trim(), 'beyond');
      await mustRun('rm', ['-rf', at('e'.repeat(200))]); // coreutils removes trees deeper than PATH_MAX (Node's rm cannot)
      assert.equal(await errnoOfPy(`os.lstat(sys.argv[1])`, at('e'.repeat(200))), 'ENOENT');
    });

    it('never reads a name that is not UTF-8 back as another name', async () => {
      // Two names that decode to one string ('a' + U+FFFD) if their bytes are read as UTF-8.
      const made = await py(`import errno, os, sys
m = os.fsencode(sys.argv[1])
out = []
def attempt(call):
    try:
        call()
        out.append('made')
    except OSError as e:
        out.append(errno.errorcode[e.errno])
def write(name, data):
    with open(os.path.join(m, name), 'wb') as f:
        f.write(data)
attempt(lambda: write(b'a\\xff', b'first'))
attempt(lambda: write(b'a\\xfe', b'second'))
attempt(lambda: os.mkdir(os.path.join(m, b'd\\xff')))
attempt(lambda: os.symlink(b't\\xff', os.path.join(m, b'link2')))
attempt(lambda: os.rename(os.path.join(m, b'etc/passwd'), os.path.join(m, b'etc/p\\xff')))
print(' '.join(out))`, ws.mnt);
      const listing = await py(`import os, sys
m = os.fsencode(sys.argv[1])
names = sorted(n for n in os.listdir(m) + [b'etc/' + e for e in os.listdir(os.path.join(m, b'etc'))] if not n.isascii())
print(repr([(n, open(os.path.join(m, n), 'rb').read() if os.path.isfile(os.path.join(m, n)) else None) for n in names]))
print(repr(os.readlink(os.path.join(m, b'link2')) if os.path.lexists(os.path.join(m, b'link2')) else None))`, ws.mnt);
      if (isLayerd) {
        assert.equal(made.trim(), 'EILSEQ EILSEQ EILSEQ EILSEQ EILSEQ', 'refused, not made under another name');
        assert.equal(listing.trim(), '[]\nNone');
        assert.equal(await errnoOfPy(`os.lstat(os.fsencode(sys.argv[1]) + b'/a\\xff')`, ws.mnt), 'ENOENT');
        assert.equal(await readFile(at('etc/passwd'), 'utf8'), 'root:x:0:0\n', 'the refused rename moved nothing');
      } else {
        assert.equal(made.trim(), 'made made made made made');
        assert.equal(listing.trim(), "[(b'a\\xfe', b'second'), (b'a\\xff', b'first'), (b'd\\xff', None), (b'etc/p\\xff', b'root:x:0:0\\n')]\nb't\\xff'");
      }
    });

    it('passes real errnos through (mknod, mkfifo, ENOSPC for a non-root writer)', async () => {
      assert.equal(await errnoOfPy(`os.mkfifo(sys.argv[1])`, at('etc/passwd')), 'EEXIST');
      assert.equal(await errnoOfPy(`os.mknod(sys.argv[1], 0o600 | 0o010000)`, at('nodir/fifo')), 'ENOENT');
      assert.equal(await errnoOfPy(`os.mknod(sys.argv[1], 0o600 | 0o010000)`, at('etc/passwd/fifo')), 'ENOTDIR');
      // A small upper filesystem, filled by an unprivileged writer.
      await unmount();
      const small = join(ws.root, 'small');
      await mkdir(small);
      await mustRun('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', small]);
      try {
        await mkdir(join(small, 'upper'));
        await mkdir(join(small, 'work'));
        await mount(ws.lowers, join(small, 'upper'), join(small, 'work'));
        await mkdir(at('scratch'));
        await chmod(at('scratch'), 0o777);
        const res = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', '/usr/bin/python3', '-c', `import errno, os, sys
try:
    with open(sys.argv[1], 'wb') as f:
        for i in range(64):
            f.write(b'x' * 65536)
            f.flush()
            os.fsync(f.fileno())
    print('OK')
except OSError as e:
    print(errno.errorcode[e.errno])`, at('scratch/big')]);
        assert.equal(res.stdout.trim(), 'ENOSPC', res.stderr);
        await unmount();
      } finally {
        await unmount();
        await run('umount', [small]);
      }
    });
  });
}

describe('mount safety: a hostile layer-directory owner (layerd)', function () {
  this.timeout(120_000);
  let ws: Workspace;
  let server: Awaited<ReturnType<typeof startLayerdServer>> | undefined;

  beforeEach(async () => { ws = await makeWorkspace(); });
  afterEach(async () => {
    try {
      if (server) await stopLayerdServer(server, ws.mnt);
    } finally {
      server = undefined;
      await removeWorkspace(ws);
    }
  });

  /** Bytes of the host's secret must never come back, through a read, an append or a copy-up. */
  async function assertNoLeak(path: string, secret: string): Promise<void> {
    const read = await run('python3', ['-c', 'import sys; print(open(sys.argv[1]).read())', path]);
    assert.equal(read.stdout.includes(secret), false, `read of ${path} returned the host file`);
    assert.notEqual(read.code, 0, 'the read fails');
    const append = await run('python3', ['-c', 'import sys; open(sys.argv[1], "a").write("x")', path]);
    assert.notEqual(append.code, 0, 'the append (a copy-up) fails');
    const upperFiles = await mustRun('grep', ['-rl', secret, ws.upper]).catch(() => '');
    assert.equal(upperFiles, '', 'no host bytes were copied into the upper');
  }

  it('a plain lower directory: a scanned subdirectory swapped for a symlink to a host directory', async () => {
    const host = join(ws.root, 'host-etc');
    await mkdir(host);
    await writeFile(join(host, 'keep'), 'HOST-SECRET\n');
    server = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt);
    const lowerDir = join(ws.lowers[1]!, 'etc/dir');
    await rm(lowerDir, { recursive: true });
    await symlink(host, lowerDir);
    await assertNoLeak(join(ws.mnt, 'etc/dir/keep'), 'HOST-SECRET');
  });

  it('a plain lower directory holding a name that is not UTF-8: refused with EILSEQ, never served as another name', async () => {
    await mustRun('python3', ['-c', `import os, sys; open(os.fsencode(sys.argv[1]) + b'/x\\xff', 'w').write('owner')`, join(ws.lowers[1]!, 'etc')]);
    await assert.rejects(startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt), /EILSEQ.*etc\/x\\\\xff/);
  });

  it('a live layer directory: no host byte before or after its rescan', async () => {
    // sub -> ../../secret resolves (for the server) to a host directory beside the layer, but not from the mount.
    const live = join(ws.root, 'a/b/live');
    await mkdir(join(live, 'sub'), { recursive: true });
    await writeFile(join(live, 'sub/shadow'), 'layer content\n');
    await mkdir(join(ws.root, 'a/secret'));
    await writeFile(join(ws.root, 'a/secret/shadow'), 'HOST-SHADOW\n');
    await utimes(join(live, 'sub/shadow'), 1, 1);
    server = await startLayerdServer(['--lower', ws.lowers.join(':'), '--live-layer', live, '--upper', ws.upper], ws.mnt);
    assert.equal(await readFile(join(ws.mnt, 'sub/shadow'), 'utf8'), 'layer content\n');
    await rm(join(live, 'sub'), { recursive: true });
    await symlink('../../secret', join(live, 'sub'));
    await assertNoLeak(join(ws.mnt, 'sub/shadow'), 'HOST-SHADOW');
    // Once rescanned, `sub` is the symlink the owner made: it resolves inside the mount's view, not beside the layer.
    for (let i = 0; i < 100 && !(await lstat(join(ws.mnt, 'sub')).then((s) => s.isSymbolicLink(), () => false)); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    await assertNoLeak(join(ws.mnt, 'sub/shadow'), 'HOST-SHADOW');
  });
});
