/**
 * A randomized workload through a real layerd mount: several processes
 * each run thousands of seeded random operations (create, write, truncate,
 * link, symlink, rename, mkdir, mknod, sockets, xattrs, chmod, chown,
 * utimens, unlink, rmdir) over one shared set of names, some of them lower
 * content and some lookalikes of markers (`.wh.` names, overlay xattrs).
 * Then the tree (names, types, modes, owners, sizes, content hashes, xattrs,
 * nlink, mtimes in ns) must read the same live, after umount + mount, and
 * with the upper used as a lower of a new mount.
 *
 * Each worker's operations are reproducible from its seed (printed on
 * failure); their interleaving is not, and need not be: the views are
 * compared with each other, not with a prediction.
 */
import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { layerd, makeWorkspace, removeWorkspace, run, type MountedUnionUnderTest, type Workspace } from './fixtures/mount/harness.js';
import { listing } from './support/listing.js';

const WORKER = String.raw`
import errno, os, random, socket, stat, sys
root, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
DIRS = ['', 'etc', 'etc/dir', 'opq', 'del', 'ren', 'ren/sub', 'hl', 'w', 'w/x', 'w/.wh.y']
NAMES = ['f', 'g', 'h', 'keep', 'passwd', 'a', 'b', '.wh.f', '.wh..wh..opq', 'sub', 'x', 'y', 'z' * 255]
def path():
    return os.path.join(root, rnd.choice(DIRS), rnd.choice(NAMES))
def dirpath():
    return os.path.join(root, rnd.choice(DIRS))
def data():
    return rnd.randbytes(rnd.choice([0, 1, 100, 5000, 70000]))
# Opens never follow a symlink and never wait for a FIFO's other end; symlink targets stay inside the mount.
OPEN = os.O_NOFOLLOW | os.O_NONBLOCK
def op():
    k = rnd.randrange(20)
    p = path()
    if k <= 3:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | OPEN, 0o644)
        try: os.pwrite(fd, data(), rnd.choice([0, 10, 4096, 65536]))
        finally: os.close(fd)
    elif k == 4:
        fd = os.open(p, os.O_WRONLY | OPEN)
        try: os.ftruncate(fd, rnd.choice([0, 1, 3000, 100000]))
        finally: os.close(fd)
    elif k == 5: os.link(p, path(), follow_symlinks=False)
    elif k == 6: os.symlink(rnd.choice(['f', 'sub/g', 'passwd']), p)
    elif k == 7: os.rename(p, path())
    elif k == 8: os.mkdir(rnd.choice([p, dirpath() + '/' + rnd.choice(['w', 'x', 'sub'])]), 0o755)
    elif k == 9: os.mkfifo(p, 0o640)
    elif k == 10: os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, rnd.choice([3, 5])))
    elif k == 11:
        s = socket.socket(socket.AF_UNIX)
        try: s.bind(p)
        finally: s.close()
    elif k == 12: os.setxattr(p, rnd.choice(['user.a', 'user.b', 'trusted.overlay.opaque', 'user.overlay.opaque', 'trusted.t']), data()[:200] or b'y', follow_symlinks=False)
    elif k == 13: os.removexattr(p, rnd.choice(['user.a', 'trusted.overlay.opaque']), follow_symlinks=False)
    elif k == 14:
        fd = os.open(p, os.O_PATH | os.O_NOFOLLOW)
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode): os.chmod(f'/proc/self/fd/{fd}', rnd.choice([0o644, 0o600, 0o4755, 0o1777]))
        finally: os.close(fd)
    elif k == 15: os.chown(p, rnd.randrange(3), rnd.randrange(3), follow_symlinks=False)
    elif k == 16: os.utime(p, ns=(rnd.randrange(2**40), rnd.randrange(-2**40, 2**62)), follow_symlinks=False)
    elif k == 17: os.unlink(p)
    elif k == 18: os.rmdir(rnd.choice([p, dirpath()]))
    else: os.rename(dirpath(), dirpath() + '/' + rnd.choice(['w', 'moved']))
done = 0
for i in range(count):
    try:
        op()
        done += 1
    except OSError as e:
        if e.errno in (errno.EIO, errno.ENOTCONN): raise
print(done)
`;

const WORKERS = 3;
const OPS = 3000;

describe('mount workload: random operations, then the same tree live, remounted and as a lower', function () {
  this.timeout(600_000);
  let ws: Workspace;
  let mounted: MountedUnionUnderTest | undefined;

  beforeEach(async () => { ws = await makeWorkspace(); });
  afterEach(async () => {
    try {
      await mounted?.unmount();
    } finally {
      mounted = undefined;
      await removeWorkspace(ws);
    }
  });

  it('keeps every name, type, mode, owner, size, content, xattr, link count and ns time', async () => {
    const seeds = Array.from({ length: WORKERS }, (_, i) => 1000 + i);
    mounted = await layerd.mount(ws.lowers, ws.upper, ws.work, ws.mnt);
    await mkdir(join(ws.mnt, 'w'));
    const results = await Promise.all(seeds.map((seed) => run('python3', ['-c', WORKER, ws.mnt, String(seed), String(OPS)], 300_000)));
    results.forEach((res, i) => assert.equal(res.code, 0, `worker with seed ${seeds[i]} failed (an EIO or a dead mount): ${res.stderr}`));
    const succeeded = results.reduce((sum, res) => sum + Number(res.stdout.trim()), 0);
    assert.ok(succeeded > WORKERS * OPS / 20, `only ${succeeded} operations succeeded: the workload did not exercise the mount`);

    const live = await listing(ws.mnt);
    await mounted.unmount();
    mounted = await layerd.mount(ws.lowers, ws.upper, ws.work, ws.mnt);
    const remounted = await listing(ws.mnt);
    assert.deepEqual(remounted, live, `after umount + mount (seeds ${seeds.join(', ')})`);
    await mounted.unmount();
    mounted = undefined;
    const upper2 = join(ws.root, 'upper2');
    await mkdir(upper2);
    mounted = await layerd.mount([ws.upper, ...ws.lowers], upper2, ws.work, ws.mnt);
    const rotated = await listing(ws.mnt);
    assert.deepEqual(rotated, live, `with the upper as a lower (seeds ${seeds.join(', ')})`);
  });
});
