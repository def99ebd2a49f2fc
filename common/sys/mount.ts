/**
 * mount(2) and umount2(2), called directly: a mount host mounting or
 * unmounting a container's FUSE mount by running mount(8)/umount(8) paid a
 * process start each (fork of a ~70 MiB Node.js process plus exec: 2–5 ms
 * on an idle machine, 20–50 ms at a load of 10), twice per container, on
 * the path of every `ctr run` (Prepare) and of the next one (Remove).
 */
import { lastErrno, libc } from './libc.js';
import { errnoName, fsError } from './errors.js';

export const MS_RDONLY = 1;
export const MS_NOSUID = 2;
export const MS_NODEV = 4;
/** umount2: detach now, finish once no longer busy. */
export const MNT_DETACH = 2;
/** umount2: do not follow a symlink at the target. */
export const UMOUNT_NOFOLLOW = 8;

/**
 * Mount `fstype` at `target` (an absolute path). For FUSE the kernel sends
 * FUSE_INIT in the background: the call does not wait for the server, so
 * the process serving the connection may make it.
 */
export function mount(source: string, target: string, fstype: string, flags: number, data: string): void {
  if (libc.mount(source, target, fstype, flags, data) < 0) throw fsError(errnoName(lastErrno()), target, `mount -t ${fstype}`);
}

/**
 * Unmount `target`, never following a symlink there. The kernel does not
 * ask the FUSE server anything to unmount (the lookup of a mount point
 * does not revalidate it; the teardown aborts the connection), so the
 * process serving the mount may make the call. Throws with the errno
 * (EBUSY: in use, then MNT_DETACH detaches it; EINVAL: not a mount point).
 */
export function unmount(target: string, flags = 0): void {
  if (libc.umount2(target, flags | UMOUNT_NOFOLLOW) < 0) throw fsError(errnoName(lastErrno()), target, 'umount');
}
