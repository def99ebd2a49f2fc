/**
 * Sending datagrams to Unix sockets (AF_UNIX, SOCK_DGRAM), which Node's own
 * APIs cannot do: `socket(2)` and `sendto(2)` through koffi. Used to talk
 * to systemd: sd_notify messages to $NOTIFY_SOCKET and journald's native
 * protocol to /run/systemd/journal/socket.
 *
 * An address starting with '@' names a socket in the abstract namespace
 * (sun_path begins with a NUL byte and the name is not NUL-terminated), as
 * systemd writes it in NOTIFY_SOCKET.
 */
import { lastErrno, libc, SOCKET } from './libc.js';
import { errnoName, fsError, type ErrnoName } from './errors.js';

const { AF_UNIX, SOCK_DGRAM, SOCK_CLOEXEC, MSG_DONTWAIT, MSG_NOSIGNAL } = SOCKET;
/** offsetof(struct sockaddr_un, sun_path) and sizeof(sun_path). */
const SUN_PATH_AT = 2;
const SUN_PATH_SIZE = 108;

/** struct sockaddr_un for `address` and the length to pass with it. */
export function unixAddress(address: string): { addr: Buffer; length: number } {
  const abstract = address.startsWith('@');
  const name = Buffer.from(abstract ? address.slice(1) : address);
  // A path needs room for its terminating NUL; an abstract name for its leading one.
  if (address.length <= (abstract ? 1 : 0) || name.length + 1 > SUN_PATH_SIZE || (!abstract && name.includes(0))) {
    throw fsError('EINVAL', address, 'unix socket address');
  }
  const addr = Buffer.alloc(SUN_PATH_AT + SUN_PATH_SIZE);
  addr.writeUInt16LE(AF_UNIX, 0);
  name.copy(addr, SUN_PATH_AT + (abstract ? 1 : 0));
  return { addr, length: SUN_PATH_AT + 1 + name.length };
}

/**
 * A datagram socket bound to nothing, for sending. One socket serves any
 * number of sends to any addresses; close() it when done.
 */
export class UnixDatagramSender {
  private fd: number;

  constructor() {
    this.fd = libc.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0) as number;
    if (this.fd < 0) throw fsError(errnoName(lastErrno()), '', 'socket');
  }

  /**
   * Send `data` as one datagram to `address`. With `wait: false` a full
   * receive queue is an error (EAGAIN) instead of blocking the thread.
   * Throws FsError with the errno (ECONNREFUSED, ENOENT: nobody listens;
   * EMSGSIZE: too large for one datagram).
   */
  send(address: string | { addr: Buffer; length: number }, data: Buffer, options: { wait?: boolean } = {}): void {
    if (this.fd < 0) throw fsError('EBADF', typeof address === 'string' ? address : '', 'sendto');
    const to = typeof address === 'string' ? unixAddress(address) : address;
    const flags = MSG_NOSIGNAL | (options.wait === false ? MSG_DONTWAIT : 0);
    for (;;) {
      const sent = Number(libc.sendto(this.fd, data, data.length, flags, to.addr, to.length));
      if (sent >= 0) return;
      const errno: ErrnoName = errnoName(lastErrno());
      if (errno === 'EINTR') continue;
      throw fsError(errno, typeof address === 'string' ? address : addressText(to.addr, to.length), 'sendto');
    }
  }

  close(): void {
    if (this.fd >= 0) libc.close(this.fd);
    this.fd = -1;
  }
}

function addressText(addr: Buffer, length: number): string {
  const path = addr.subarray(SUN_PATH_AT, length);
  return path[0] === 0 ? '@' + path.subarray(1).toString() : path.toString().replace(/\0$/, '');
}
