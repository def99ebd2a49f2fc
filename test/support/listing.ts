/**
 * A tree as a sorted list of lines, one per path below a root: what a union
 * must show the same way before and after a remount. Read from a child
 * process (the root may be a FUSE mount this process serves).
 */
import { run } from '../fixtures/mount/harness.js';

/**
 * Every path below `root` with type, mode, owner, size, content digest,
 * xattrs (hex), nlink and mtime in ns: what must survive a remount.
 */
const LISTING = `import hashlib, os, stat, sys
root = sys.argv[1]
out = []
for dp, dns, fns in os.walk(root):
    for n in sorted(dns + fns):
        p = os.path.join(dp, n)
        st = os.lstat(p)
        m = st.st_mode
        digest = ''
        if stat.S_ISREG(m):
            with open(p, 'rb') as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        link = os.readlink(p) if stat.S_ISLNK(m) else ''
        try:
            names = sorted(os.listxattr(p, follow_symlinks=False))
            xs = ','.join(f'{x}={os.getxattr(p, x, follow_symlinks=False).hex()}' for x in names)
        except OSError:
            xs = '?'
        rdev = f'{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}' if stat.S_ISCHR(m) or stat.S_ISBLK(m) else ''
        out.append('\\t'.join([os.path.relpath(p, root), '%o' % m, str(st.st_uid), str(st.st_gid),
            str(st.st_size) if not stat.S_ISDIR(m) else '', str(st.st_nlink), str(st.st_mtime_ns), rdev, link, digest, xs]))
print('\\n'.join(sorted(out)))`;

export async function listing(root: string): Promise<string[]> {
  const res = await run('python3', ['-c', LISTING, root], 120_000);
  if (res.code !== 0) throw new Error(`listing ${root} failed: ${res.stderr}`);
  return res.stdout.split('\n').filter((l) => l !== '');
}

