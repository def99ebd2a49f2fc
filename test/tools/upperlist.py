#!/usr/bin/python3
"""List a writable layer (an upper directory) as the change it records, in a
form that does not depend on who wrote it: OCI whiteouts (.wh.<name>) and
overlayfs whiteouts (0/0 character devices) both become "whiteout", OCI
opaque markers and the trusted.overlay.opaque xattr both become "opaque";
overlayfs' private xattrs and all times are left out.
Usage: upperlist.py UPPER [EXCLUDED_PREFIX ...]"""
import hashlib, os, stat, sys

root = os.path.abspath(sys.argv[1])
excluded = [p.strip('/') for p in sys.argv[2:]]

def skip(rel):
    return any(rel == p or rel.startswith(p + '/') for p in excluded)

def xattrs(p):
    out = []
    try:
        names = sorted(os.listxattr(p, follow_symlinks=False))
    except OSError:
        return ''
    for n in names:
        if n.startswith('trusted.overlay.') or n.startswith('user.overlay.'):
            continue
        out.append(n + '=' + os.getxattr(p, n, follow_symlinks=False).hex())
    return ','.join(out)

lines = []
for dp, dns, fns in os.walk(root):
    for name in sorted(dns + fns):
        p = os.path.join(dp, name)
        rel = os.path.relpath(p, root)
        if skip(rel) or name.startswith('.fuse_hidden'):
            continue
        st = os.lstat(p)
        m = st.st_mode
        if name == '.wh..wh..opq':
            lines.append(f'{os.path.dirname(rel)}\topaque'); continue
        if name.startswith('.wh.'):
            lines.append(f'{os.path.join(os.path.dirname(rel), name[4:])}\twhiteout'); continue
        if stat.S_ISCHR(m) and st.st_rdev == 0:
            lines.append(f'{rel}\twhiteout'); continue
        if stat.S_ISDIR(m):
            try:
                if os.getxattr(p, 'trusted.overlay.opaque', follow_symlinks=False) == b'y':
                    lines.append(f'{rel}\topaque')
            except OSError:
                pass
            kind, extra = 'd', ''
        elif stat.S_ISLNK(m):
            kind, extra = 'l', os.readlink(p)
        elif stat.S_ISREG(m):
            with open(p, 'rb') as f:
                kind, extra = 'f', hashlib.sha256(f.read()).hexdigest()
        else:
            kind, extra = 'o', f'{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}'
        lines.append(f'{rel}\t{kind}\t{stat.S_IMODE(m):04o}\t{st.st_uid}\t{st.st_gid}\t{extra}\t{xattrs(p)}')
print('\n'.join(sorted(lines)))
