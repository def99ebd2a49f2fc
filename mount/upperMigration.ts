/**
 * Uppers written before the overlayfs format (mount/upperFormat.ts) kept
 * deletions as `.wh.<name>` files and opaque directories as `.wh..wh..opq`
 * files, and left `.fuse_hidden…` stand-ins of files unlinked while open.
 * `convertOciUpper` rewrites such an upper in place into the current
 * format, with the meaning it had: a `.wh.X` becomes a 0/0 device X (or
 * goes, when X itself exists: the entry won over its own whiteout), an
 * opaque marker becomes the opaque xattr. Idempotent; every call goes
 * through the system-call layer beneath the upper's root.
 */
import {
  O_DIRECTORY, O_RDONLY, S_IFCHR, S_IFDIR, S_IFMT, close, fstat, mknodAt, openBeneath, openRoot, readDirFd, setXattrAt, statAt, unlinkAt,
} from '../common/sys/fs.js';
import { errnoNameOf } from '../common/sys/errors.js';
import { OPAQUE_MARKER, WHITEOUT_PREFIX } from './paths.js';
import { OPAQUE_XATTR } from './upperFormat.js';

export interface UpperConversion { whiteouts: number; opaques: number; removed: number }

const LEGACY_HIDDEN_PREFIX = '.fuse_hidden';

export function convertOciUpper(root: string): UpperConversion {
  const result: UpperConversion = { whiteouts: 0, opaques: 0, removed: 0 };
  const rootFd = openRoot(root);
  try {
    const top = openBeneath(rootFd, '', O_RDONLY | O_DIRECTORY);
    try {
      convertDir(top, root, result);
    } finally {
      close(top);
    }
  } finally {
    close(rootFd);
  }
  return result;
}

function exists(dirFd: number, name: string, where: string): boolean {
  try {
    statAt(dirFd, name, where);
    return true;
  } catch (err) {
    if (errnoNameOf(err) === 'ENOENT') return false;
    throw err;
  }
}

function convertDir(dirFd: number, where: string, result: UpperConversion): void {
  const names = readDirFd(dirFd, where).map((e) => e.name);
  const present = new Set(names);
  for (const name of names) {
    if (name === OPAQUE_MARKER) {
      unlinkAt(dirFd, name, false, where);
      setXattrAt(dirFd, '', OPAQUE_XATTR, Buffer.from('y'), 0, where);
      result.opaques++;
    } else if (name.startsWith(LEGACY_HIDDEN_PREFIX) || name.startsWith(WHITEOUT_PREFIX + WHITEOUT_PREFIX)) {
      unlinkAt(dirFd, name, false, where);
      result.removed++;
    } else if (name.startsWith(WHITEOUT_PREFIX)) {
      const deleted = name.slice(WHITEOUT_PREFIX.length);
      unlinkAt(dirFd, name, false, where);
      if (!present.has(deleted) && !exists(dirFd, deleted, where)) {
        mknodAt(dirFd, deleted, S_IFCHR, 0, 0, where);
        result.whiteouts++;
      } else {
        result.removed++;
      }
    }
  }
  for (const name of names) { // a descriptor's listing is read once: the names from before, less what went
    if (name.startsWith(WHITEOUT_PREFIX) || name.startsWith(LEGACY_HIDDEN_PREFIX)) continue;
    const st = statAt(dirFd, name, where);
    if ((st.mode & S_IFMT) !== S_IFDIR) continue;
    const fd = openBeneath(dirFd, name, O_RDONLY | O_DIRECTORY);
    try {
      if (fstat(fd).ino === st.ino) convertDir(fd, `${where}/${name}`, result);
    } finally {
      close(fd);
    }
  }
}
