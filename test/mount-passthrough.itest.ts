/**
 * FUSE passthrough (mount/kernelFuse.ts): the data of upper files goes
 * between the kernel and the upper directory without crossing into the
 * server, and still means what it meant when the server carried it. The
 * server's own operation counts (--stats-file) show which way data went.
 *
 * Files are touched only from child processes (never synchronous I/O on a
 * mount from the process that could serve it). Needs root and Linux 6.9+.
 */
import { expect } from 'chai';
import { type ChildProcess } from 'node:child_process';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { type OpStatsSnapshot } from '../mount/opStats.js';
import { makeWorkspace, mustRun, removeWorkspace, startLayerdServer, stopLayerdServer, type Workspace } from './fixtures/mount/harness.js';

const PY = 'python3';

/** Passthrough, the kernel's writeback cache (what a mount without passthrough takes), and neither. */
const MODES = [
  { name: 'on', passthrough: true, writeback: false, env: { LAYERD_FUSE_PASSTHROUGH: '1' } },
  { name: 'off, writeback cache (LAYERD_FUSE_PASSTHROUGH=0)', passthrough: false, writeback: true, env: { LAYERD_FUSE_PASSTHROUGH: '0' } },
  { name: 'off, no writeback cache (LAYERD_FUSE_WRITEBACK=0 too)', passthrough: false, writeback: false, env: { LAYERD_FUSE_PASSTHROUGH: '0', LAYERD_FUSE_WRITEBACK: '0' } },
];

for (const { name, passthrough, writeback, env } of MODES) {
  describe(`mount passthrough: ${name}`, function () {
    this.timeout(60_000);
    let ws: Workspace;
    let server: ChildProcess | undefined;
    let statsFile: string;
    const at = (path: string): string => join(ws.mnt, path);

    const mount = async (): Promise<void> => {
      server = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper, '--stats-file', statsFile], ws.mnt,
        { ...process.env, LAYERD_FUSE_WRITEBACK: '1', ...env });
    };
    /** Unmount; the server writes its final counts as it exits. */
    const unmountCounts = async (): Promise<Record<string, number>> => {
      await stopLayerdServer(server!, ws.mnt);
      server = undefined;
      const snap = JSON.parse(await readFile(statsFile, 'utf8')) as OpStatsSnapshot;
      return Object.fromEntries(Object.entries(snap).map(([op, c]) => [op, c.count]));
    };
    const py = (code: string): Promise<string> => mustRun(PY, ['-c', code]);

    beforeEach(async () => {
      ws = await makeWorkspace();
      statsFile = join(ws.root, 'stats.json');
    });
    afterEach(async () => {
      if (server) await stopLayerdServer(server, ws.mnt);
      server = undefined;
      await removeWorkspace(ws);
    });

    it(passthrough ? 'reads and writes of upper files never reach the server' : 'the server carries every read and write', async () => {
      await writeFile(join(ws.upper, 'before'), 'x'.repeat(3 << 20)); // an upper file from an earlier mount
      await mount();
      await mustRun('dd', ['if=/dev/urandom', `of=${at('new')}`, 'bs=1M', 'count=4', 'status=none']);
      await mustRun('dd', [`if=${at('before')}`, 'of=/dev/null', 'bs=1M', 'status=none']);
      const viaMount = await mustRun('sha256sum', [at('new')]);
      const counts = await unmountCounts();
      expect(viaMount.split(' ')[0]).to.equal((await mustRun('sha256sum', [join(ws.upper, 'new')])).split(' ')[0]);
      if (passthrough) {
        expect(counts['write'] ?? 0, 'writes served').to.equal(0);
        expect(counts['read'] ?? 0, 'reads served').to.equal(0);
      } else {
        expect(counts['write'] ?? 0).to.be.greaterThan(0);
        expect(counts['read'] ?? 0).to.be.greaterThan(0);
      }
    });

    it('keeps positions, appends, truncation, mmap and sizes right', async () => {
      await mount();
      const out = await py(`
import mmap, os
p = ${JSON.stringify(at('f'))}
a = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
b = os.open(p, os.O_RDWR)
for i in range(50):
    os.write(a, b'A%02d' % i)             # appends, whatever b did
    os.pwrite(b, b'bb', 0)                # overwrites the start
os.ftruncate(b, 100)
size_after_truncate = os.fstat(a).st_size
with open(p, 'r+b') as f:
    m = mmap.mmap(f.fileno(), 100)
    m[10:15] = b'MMAP!'
    m.flush(); m.close()
os.close(a); os.close(b)
print(size_after_truncate, os.stat(p).st_size)
print(open(p, 'rb').read()[:20])
`);
      expect(out.trim().split('\n')).to.deep.equal(['100 100', "b'bb0A01A02AMMAP!A05A0'"]);
      const upper = await readFile(join(ws.upper, 'f'));
      expect(upper.length).to.equal(100);
      expect(upper.subarray(0, 20).toString()).to.equal('bb0A01A02AMMAP!A05A0');
      expect((await stat(at('f'))).size).to.equal(100);
    });

    it('serves a lower file read before its copy-up, and both names of a hard link written at once', async () => {
      await mount();
      const out = await py(`
import os
p = ${JSON.stringify(at('etc/passwd'))}
r = open(p, 'rb')                  # a page-cached open of the lower file
first = r.read()
with open(p, 'ab') as w:           # copies it up while that open lasts (passthrough must wait)
    w.write(b'appended\\n')
r.close()
with open(p, 'r+b') as w:          # no page-cached open is left: this one may pass through
    w.seek(0, 2); w.write(b'more\\n')
print(first, open(p, 'rb').read())
os.link(${JSON.stringify(at('etc/passwd'))}, ${JSON.stringify(at('etc/passwd2'))})
x = os.open(${JSON.stringify(at('etc/passwd'))}, os.O_RDWR)
y = os.open(${JSON.stringify(at('etc/passwd2'))}, os.O_RDWR)
os.pwrite(x, b'XX', 0)
os.pwrite(y, b'YY', 2)
print(os.pread(x, 4, 0), os.pread(y, 4, 0))
os.close(x); os.close(y)
`);
      expect(out.trim().split('\n')).to.deep.equal([
        "b'root:x:0:0\\n' b'root:x:0:0\\nappended\\nmore\\n'",
        "b'XXYY' b'XXYY'",
      ]);
      expect((await readFile(join(ws.upper, 'etc/passwd'), 'utf8'))).to.equal('XXYY:x:0:0\nappended\nmore\n');
    });

    it('clears setuid when a user writes, and keeps the union\'s metadata for the writes', async () => {
      await mount();
      await mustRun('sh', ['-c', `echo data > ${at('s')} && chmod 4777 ${at('s')}`]);
      await mustRun('setpriv', ['--reuid=1000', '--regid=1000', '--clear-groups', 'sh', '-c', `echo more >> ${at('s')}`]);
      const st = await stat(at('s'));
      expect(st.mode & 0o7777).to.equal(0o777);
      expect(st.size).to.equal(10);
      expect((await stat(join(ws.upper, 's'))).mode & 0o7777).to.equal(0o777);
    });

    it('a write-only open that covers part of a page keeps the rest of it, and mtime and size are the writes\' ', async () => {
      // Not in the page cache: the kernel must read the page's rest (with writeback caching, through this write-only open).
      await writeFile(join(ws.upper, 'p'), 'a'.repeat(10000));
      await mount();
      const out = await py(`
import os
p = ${JSON.stringify(at('p'))}
fd = os.open(p, os.O_WRONLY)
os.pwrite(fd, b'XY', 100)
os.pwrite(fd, b'Z', 12000)
os.utime(fd, ns=(5_000_000_007, 7_000_000_009))
os.close(fd)
st = os.stat(p)
print(st.st_size, st.st_mtime_ns)
`);
      expect(out.trim()).to.equal('12001 7000000009');
      const upper = await readFile(join(ws.upper, 'p'), 'latin1');
      expect(upper).to.equal(`${'a'.repeat(100)}XY${'a'.repeat(9898)}${'\0'.repeat(2000)}Z`);
      expect((await stat(join(ws.upper, 'p'), { bigint: true })).mtimeNs).to.equal(7_000_000_009n);
    });

    if (writeback) {
      it('gathers small writes into few WRITE requests (writeback cache)', async () => {
        await mount();
        await py(`
import os
fd = os.open(${JSON.stringify(at('small'))}, os.O_WRONLY | os.O_CREAT, 0o644)
for i in range(500):
    os.write(fd, b'%07d\\n' % i)
os.close(fd)
`);
        const counts = await unmountCounts();
        expect((await readFile(join(ws.upper, 'small'), 'utf8')).split('\n')[499]).to.equal('0000499');
        // Without it, one WRITE per write() (500).
        expect(counts['write'] ?? 0).to.be.within(1, 10);
      });
    }

    it('clears setuid, and setgid of group-executable files, when a user truncates and on every chown', async () => {
      await mount();
      await mustRun('sh', ['-c', `for f in t c g k; do echo data > ${at('$f')}; done && chmod 4777 ${at('t')} ${at('c')} && chmod 2775 ${at('g')} && chmod 2765 ${at('k')}`]);
      await mustRun('setpriv', ['--reuid=1000', '--regid=1000', '--clear-groups', 'truncate', '-s', '2', at('t')]);
      await mustRun('chown', ['0:0', at('c'), at('g'), at('k')]);
      // chown(f, -1, -1) by its owner changes no id and still clears suid (as on ext4).
      await mustRun('sh', ['-c', `echo data > ${at('o')} && chown 1000:1000 ${at('o')} && chmod 4755 ${at('o')}`]);
      await mustRun('setpriv', ['--reuid=1000', '--regid=1000', '--clear-groups', '/usr/bin/python3', '-c', `import os; os.chown(${JSON.stringify(at('o'))}, -1, -1)`]);
      const modes = await Promise.all(['t', 'c', 'g', 'k', 'o'].map(async (f) => [(await stat(at(f))).mode & 0o7777, (await stat(join(ws.upper, f))).mode & 0o7777]));
      // k: setgid without group execute is a mandatory-locking mark, kept (as on ext4 and overlayfs).
      expect(modes).to.deep.equal([[0o777, 0o777], [0o777, 0o777], [0o775, 0o775], [0o2765, 0o2765], [0o755, 0o755]]);
      expect((await stat(at('t'))).size).to.equal(2);
    });

    it('a new file or directory inherits its directory\'s default ACL; one in a directory without it has no xattrs', async () => {
      await mount();
      // The union answers "no xattrs" for a new file from memory when its directory has no default ACL,
      // so it must look at the directory's: a file made under one has the ACL it inherited on the disk.
      await mustRun('mkdir', [at('acl')]);
      await mustRun('setfacl', ['-d', '-m', 'u:1234:rw', at('acl')]);
      await py(`
import os
for p in ['${at('acl/f')}', '${at('plain')}']:
    with open(p, 'wb') as f: f.write(b'x')
os.mkdir('${at('acl/sub')}')
open('${at('acl/sub/g')}', 'wb').close()
`);
      for (const path of ['acl/f', 'acl/sub', 'acl/sub/g']) {
        expect(await mustRun('getfacl', ['-cp', at(path)]), path).to.include('user:1234:rw-');
      }
      expect(await mustRun('getfattr', ['-d', '-m', '-', at('plain')])).to.equal('');
    });

    it('answers the routine "no"s as the syscalls expect: ENOTTY to a terminal ioctl, ENODATA to a missing xattr', async () => {
      await mount();
      // Answered without an error object (kernelFuse.ts answerHot): still the errno each caller gets.
      const out = await py(`
import errno, fcntl, os, termios
p = '${at('f')}'
open(p, 'wb').close()
fd = os.open(p, os.O_RDONLY)
print(os.isatty(fd))
try:
    fcntl.ioctl(fd, termios.TCGETS, bytes(64))
except OSError as e:
    print(errno.errorcode[e.errno])
try:
    os.getxattr(p, 'security.capability')
except OSError as e:
    print(errno.errorcode[e.errno])
os.setxattr(p, 'user.k', b'v')
print(os.getxattr(p, 'user.k').decode())
`);
      expect(out.trim().split('\n')).to.deep.equal(['False', 'ENOTTY', 'ENODATA', 'v']);
    });

    it('is asked for security.capability once per written file, not before every write, and chown asks no GETATTR', async () => {
      await mount();
      // 20 files, each written with three write() calls and then chowned (what tar does per file).
      await py(`
import os
for i in range(20):
    fd = os.open('${at('w')}%d' % i, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    for _ in range(3):
        os.write(fd, b'x' * 10240)
    os.fchown(fd, 0, 0)
    os.close(fd)
`);
      const counts = await unmountCounts();
      // Without FUSE_HANDLE_KILLPRIV_V2: one GETXATTR per write() and per chown (80), and a GETATTR per
      // chown beside the parent directory's one per create (whose attributes a create drops): 41.
      expect(counts['getxattr'] ?? 0, 'getxattr').to.be.at.most(40);
      expect(counts['getattr'] ?? 0, 'getattr').to.be.below(30);
    });
  });
}
