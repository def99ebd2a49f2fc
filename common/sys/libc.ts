/**
 * The C library functions and raw system calls the system-call layer uses,
 * bound once through koffi (an FFI whose npm package ships prebuilt
 * binaries: no install script, no compiler; a call costs about a
 * microsecond). Nothing outside common/sys/ imports this module: callers use
 * the checked wrappers of fs.ts, which turn -1 into an FsError with errno,
 * path and operation.
 *
 * Why an FFI rather than Node's `fs`: Node's path calls follow symlinks in
 * every component, have no `*at` forms, no mknod, no xattrs, and carry
 * times as float milliseconds.
 */
import koffi from 'koffi';

const lib = koffi.load('libc.so.6');

/** System call numbers that glibc 2.36 has no wrapper for (x86_64 and the generic table of arm64). */
export const SYS = process.arch === 'arm64'
  ? { getdents64: 61, openat2: 437, fchmodat2: 452, setxattrat: 463, getxattrat: 464, listxattrat: 465, removexattrat: 466 }
  : { getdents64: 217, openat2: 437, fchmodat2: 452, setxattrat: 463, getxattrat: 464, listxattrat: 465, removexattrat: 466 };

/** Socket constants (the same on x86_64 and arm64) for the Unix-socket calls made through koffi. */
export const SOCKET = {
  AF_UNIX: 1,
  SOCK_STREAM: 1,
  SOCK_DGRAM: 2,
  SOCK_CLOEXEC: 0o2000000,
  SOL_SOCKET: 1,
  SCM_RIGHTS: 1,
  MSG_CTRUNC: 0x8,
  MSG_DONTWAIT: 0x40,
  MSG_NOSIGNAL: 0x4000,
  MSG_CMSG_CLOEXEC: 0x40000000,
} as const;

export const XattrArgs = koffi.struct('layerd_xattr_args', { value: 'void *', size: 'uint32', flags: 'uint32' });
koffi.struct('layerd_iovec', { base: 'void *', len: 'size_t' });

export const libc = {
  openat2: lib.func('long syscall(long nr, int dirfd, const char *path, void *how, size_t size)'),
  getdents64: lib.func('long syscall(long nr, int fd, void *buf, size_t count)'),
  fchmodat2: lib.func('long syscall(long nr, int dirfd, const char *path, uint32 mode, int flags)'),
  getxattrat: lib.func('long syscall(long nr, int dirfd, const char *path, uint32 atFlags, const char *name, _Inout_ layerd_xattr_args *args, size_t size)'),
  setxattrat: lib.func('long syscall(long nr, int dirfd, const char *path, uint32 atFlags, const char *name, layerd_xattr_args *args, size_t size)'),
  listxattrat: lib.func('long syscall(long nr, int dirfd, const char *path, uint32 atFlags, void *list, size_t size)'),
  removexattrat: lib.func('long syscall(long nr, int dirfd, const char *path, uint32 atFlags, const char *name)'),
  statx: lib.func('int statx(int dirfd, const char *path, int flags, uint32 mask, void *buf)'),
  mkdirat: lib.func('int mkdirat(int dirfd, const char *path, uint32 mode)'),
  mknodat: lib.func('int mknodat(int dirfd, const char *path, uint32 mode, uint64 dev)'),
  symlinkat: lib.func('int symlinkat(const char *target, int dirfd, const char *path)'),
  readlinkat: lib.func('long readlinkat(int dirfd, const char *path, void *buf, size_t size)'),
  linkat: lib.func('int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags)'),
  unlinkat: lib.func('int unlinkat(int dirfd, const char *path, int flags)'),
  renameat2: lib.func('int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, uint32 flags)'),
  fchownat: lib.func('int fchownat(int dirfd, const char *path, uint32 uid, uint32 gid, int flags)'),
  fchmodat: lib.func('int fchmodat(int dirfd, const char *path, uint32 mode, int flags)'),
  utimensat: lib.func('int utimensat(int dirfd, const char *path, void *times, int flags)'),
  futimens: lib.func('int futimens(int fd, void *times)'),
  fgetxattr: lib.func('long fgetxattr(int fd, const char *name, void *value, size_t size)'),
  fsetxattr: lib.func('int fsetxattr(int fd, const char *name, void *value, size_t size, int flags)'),
  flistxattr: lib.func('long flistxattr(int fd, void *list, size_t size)'),
  fremovexattr: lib.func('int fremovexattr(int fd, const char *name)'),
  getxattr: lib.func('long getxattr(const char *path, const char *name, void *value, size_t size)'),
  setxattr: lib.func('int setxattr(const char *path, const char *name, void *value, size_t size, int flags)'),
  listxattr: lib.func('long listxattr(const char *path, void *list, size_t size)'),
  removexattr: lib.func('int removexattr(const char *path, const char *name)'),
  copyFileRange: lib.func('long copy_file_range(int fdIn, _Inout_ int64 *offIn, int fdOut, _Inout_ int64 *offOut, size_t len, uint32 flags)'),
  ioctl: lib.func('int ioctl(int fd, unsigned long request, void *arg)'),
  socket: lib.func('int socket(int domain, int type, int protocol)'),
  sendto: lib.func('long sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32 addrlen)'),
  close: lib.func('int close(int fd)'),
  syncfs: lib.func('int syncfs(int fd)'),
  mount: lib.func('int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)'),
  umount2: lib.func('int umount2(const char *target, int flags)'),
  preadv2: lib.func('long preadv2(int fd, const layerd_iovec *iov, int iovcnt, int64 offset, int flags)'),
};

/** errno of the last call made through koffi on this thread. */
export function lastErrno(): number {
  return koffi.errno();
}
