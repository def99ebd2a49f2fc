/**
 * Passing file descriptors over Unix sockets (SCM_RIGHTS), which Node's own
 * APIs cannot receive: `socketpair(2)` and `recvmsg(2)` called through koffi.
 *
 * Used to take the /dev/fuse descriptor that `fusermount3` opens and mounts
 * for an unprivileged user (mount/fuseSession.ts).
 *
 * Linux, 64-bit (LP64) only: the structure layouts below are those of
 * x86_64 and aarch64.
 */
import { closeSync } from 'node:fs';
import koffi from 'koffi';
import { ErrorCodes, LayerdError } from '../errors.js';
import { SOCKET } from './libc.js';

const { AF_UNIX, SOCK_STREAM, SOCK_CLOEXEC, SOL_SOCKET, SCM_RIGHTS, MSG_CTRUNC, MSG_DONTWAIT, MSG_CMSG_CLOEXEC } = SOCKET;

/** The errno values this module names in its errors (a local subset, to be unified with common/sys). */
const ERRNO_NAMES: Readonly<Record<number, string>> = {
  4: 'EINTR', 9: 'EBADF', 11: 'EAGAIN', 12: 'ENOMEM', 14: 'EFAULT', 22: 'EINVAL', 23: 'ENFILE', 24: 'EMFILE',
  88: 'ENOTSOCK', 95: 'EOPNOTSUPP', 97: 'EAFNOSUPPORT', 104: 'ECONNRESET',
};

function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

// struct msghdr / iovec / cmsghdr on LP64 Linux (offsets in bytes).
const MSGHDR_SIZE = 56;
const MSG_IOV = 16;
const MSG_IOVLEN = 24;
const MSG_CONTROL = 32;
const MSG_CONTROLLEN = 40;
const MSG_FLAGS = 48;
const IOVEC_SIZE = 16;
const CMSG_HEADER = 16; // cmsg_len (size_t), cmsg_level, cmsg_type: CMSG_LEN(0)
/** CMSG_SPACE(sizeof(int)): one descriptor, padded to the 8-byte alignment. */
const CONTROL_SIZE = CMSG_HEADER + 8;
/** One byte of ordinary data: SCM_RIGHTS must travel with some. */
const DATA_SIZE = 1;

interface Libc {
  socketpair(domain: number, type: number, protocol: number, sv: Int32Array): number;
  recvmsg(fd: number, msg: unknown, flags: number): number | bigint;
}

let libc: Libc | undefined;

function load(): Libc {
  if (libc) return libc;
  const lib = koffi.load('libc.so.6');
  libc = {
    socketpair: lib.func('int socketpair(int, int, int, _Out_ int *sv)') as Libc['socketpair'],
    recvmsg: lib.func('intptr_t recvmsg(int, void *msg, int)') as Libc['recvmsg'],
  };
  return libc;
}

/** A connected pair of Unix stream sockets, both close-on-exec. */
export function socketPair(): [number, number] {
  const sv = new Int32Array(2);
  if (load().socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) !== 0) {
    const errno = koffi.errno();
    throw new LayerdError(ErrorCodes.EIO, `socketpair failed: ${errnoName(errno)}`, { errno });
  }
  return [sv[0]!, sv[1]!];
}

/**
 * Take one descriptor sent with SCM_RIGHTS on `socket`, without waiting:
 * call it once the sender has sent (e.g. after it exited). The descriptor
 * is close-on-exec. Returns undefined if the peer closed or sent nothing
 * (EAGAIN): the sender failed. A message with no descriptor or more than
 * one is an error (and what came with it is closed).
 */
export function receiveFd(socket: number): number | undefined {
  // Everything recvmsg points into lives in one unmanaged block, so no
  // address moves while the kernel writes to it.
  const total = MSGHDR_SIZE + IOVEC_SIZE + CONTROL_SIZE + DATA_SIZE;
  const block: unknown = koffi.alloc('uint8_t', total);
  try {
    const base = BigInt(koffi.address(block));
    const view = new DataView(koffi.view(block, total));
    new Uint8Array(view.buffer).fill(0);
    const iov = MSGHDR_SIZE;
    const control = iov + IOVEC_SIZE;
    const data = control + CONTROL_SIZE;
    view.setBigUint64(iov, base + BigInt(data), true);
    view.setBigUint64(iov + 8, BigInt(DATA_SIZE), true);
    view.setBigUint64(MSG_IOV, base + BigInt(iov), true);
    view.setBigUint64(MSG_IOVLEN, 1n, true);
    view.setBigUint64(MSG_CONTROL, base + BigInt(control), true);
    view.setBigUint64(MSG_CONTROLLEN, BigInt(CONTROL_SIZE), true);

    const received = Number(load().recvmsg(socket, block, MSG_DONTWAIT | MSG_CMSG_CLOEXEC));
    if (received < 0) {
      const errno = koffi.errno();
      if (errnoName(errno) === 'EAGAIN') return undefined;
      throw new LayerdError(ErrorCodes.EIO, `recvmsg failed: ${errnoName(errno)}`, { errno });
    }
    if (received === 0) return undefined;
    const flags = view.getInt32(MSG_FLAGS, true);
    const controlLength = Number(view.getBigUint64(MSG_CONTROLLEN, true));
    const level = view.getInt32(control + 8, true);
    const type = view.getInt32(control + 12, true);
    const fds: number[] = [];
    if (controlLength >= CMSG_HEADER && level === SOL_SOCKET && type === SCM_RIGHTS) {
      const cmsgLength = Number(view.getBigUint64(control, true));
      for (let at = CMSG_HEADER; at + 4 <= Math.min(cmsgLength, CONTROL_SIZE); at += 4) fds.push(view.getInt32(control + at, true));
    }
    if (fds.length !== 1 || (flags & MSG_CTRUNC) !== 0) {
      // Whatever did arrive is ours to close (the kernel closed what did not fit: MSG_CTRUNC).
      for (const fd of fds) closeSync(fd);
      throw new LayerdError(ErrorCodes.EIO, `expected one descriptor (SCM_RIGHTS), got ${fds.length}${(flags & MSG_CTRUNC) !== 0 ? ' and more that did not fit' : ''}`, { received: fds.length, level, type });
    }
    return fds[0];
  } finally {
    koffi.free(block);
  }
}
