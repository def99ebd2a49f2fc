/**
 * One FUSE connection spoken directly over /dev/fuse, without libfuse.
 *
 * Why not a binding: the only maintained Node binding (fuse-native, used
 * here until it was retired) wraps libfuse 2's high-level, path-based API,
 * which gives every name of a hard-linked file its own kernel inode and has
 * no per-entry timeouts, readdirplus or directory caching (docs/performance.md
 * measures what that cost). The kernel protocol itself is small and stable
 * (linux/fuse.h).
 *
 * How it is wired:
 * - As root, /dev/fuse is opened here and mounted with mount(2) (`fd=N`;
 *   unmounted with umount2(2)): no mount(8)/umount(8) process per mount.
 * - Otherwise, like libfuse 3, through the setuid `fusermount3` (Debian's
 *   fuse3): it mounts for the calling user and sends the /dev/fuse
 *   descriptor back over a socketpair (SCM_RIGHTS, common/sys/fdPassing.ts);
 *   `fusermount3 -u` unmounts. Such a mount is the user's alone unless
 *   /etc/fuse.conf has `user_allow_other` (then it gets `allow_other` as the
 *   root path does): fusermount3 refuses `allow_other` to users otherwise,
 *   and a mount only its owner can enter is still useful (`layerd mount` for
 *   oneself), so that is decided from the file, not failed.
 * - The descriptor is read through a libuv stream handle (the pipe handle
 *   Node's net.Socket sits on; /dev/fuse supports poll), so a mount costs
 *   no thread: a mount host serves a hundred mounts from one event loop.
 *   Each read() returns exactly one request, into one buffer shared by all
 *   sessions of the process (READ_BUFFER): no allocation per request. A
 *   request is parsed before the next read() reuses the buffer; only WRITE
 *   data, which outlives that, is copied (kernelFuse.ts).
 * - Replies are written synchronously, one write() each: a write to
 *   /dev/fuse hands the reply to the waiting request and never blocks.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync, writeSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { Socket } from 'node:net';
import { resolve } from 'node:path';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { receiveFd, socketPair } from '../common/sys/fdPassing.js';
import { findMount } from './deadMount.js';
import {
  FUSE_DEV_IOC_BACKING_CLOSE, FUSE_DEV_IOC_BACKING_OPEN, FUSE_KERNEL_VERSION, FUSE_PASSTHROUGH_MINOR_VERSION, IN_HEADER_SIZE, InitFlag,
  InitFlag2, NOTIFY_STORE_HEADER_SIZE, OUT_HEADER_SIZE, Op, initOut, outHeader, readHeader, readInit, writeNotifyStoreHeader, writeOutHeader,
  type RequestHeader,
} from './fuseProtocol.js';
import { ioctl } from '../common/sys/fs.js';
import { MNT_DETACH, MS_RDONLY, mount as mountSyscall, unmount as unmountSyscall } from '../common/sys/mount.js';

/** Pages per READ or WRITE request (1 MiB): fewer round trips for big files. */
const MAX_PAGES = 256;
export const MAX_WRITE = MAX_PAGES * 4096;
/** Room for the largest request: a WRITE's headers and data (the kernel refuses smaller reads). */
const READ_BUFFER = Buffer.allocUnsafe(MAX_WRITE + 4096);
/** Where replies up to its size are put together before their write() (entries, attributes, listings). */
const REPLY_BUFFER = Buffer.allocUnsafe(64 * 1024);
/**
 * The kernel reads ahead 128 KiB on a new FUSE mount; as much as one READ
 * may carry halves the time of a cold sequential read (1 GiB: ~1.9 → ~1.05 s).
 */
const READ_AHEAD_KB = (MAX_PAGES * 4096) / 1024;

export interface SessionOptions {
  readOnly: boolean;
  /** FUSE_INIT flags this filesystem wants (intersected with the kernel's). */
  wantFlags: number;
  /**
   * Take FUSE_PASSTHROUGH if the kernel offers it (Linux 6.9+) and this
   * process may register backing files (CAP_SYS_ADMIN: a root mount).
   */
  passthrough?: boolean;
  /**
   * Take FUSE_WRITEBACK_CACHE where passthrough is not taken (the kernel
   * refuses passthrough opens on a connection with it): small writes are
   * gathered in the page cache and written back in batches.
   */
  writeback?: boolean;
}

/**
 * How deep the filesystems of backing files may be stacked (an upper on
 * ext4 is depth 0; on overlayfs, 1). The FUSE mount itself then counts as
 * that deep, which only matters for stacking overlayfs on top of it.
 */
const PASSTHROUGH_STACK_DEPTH = 1;

export interface RequestHandler {
  (header: RequestHeader, request: Buffer, session: FuseSession): void;
}

/** The pipe handle of Node's internals, as net.Socket uses it. */
interface PipeHandle { open(fd: number): number }
interface PipeWrapBinding { Pipe: new (type: number) => PipeHandle; constants: { SOCKET: number } }

function pipeHandleFor(fd: number): PipeHandle {
  // process.binding is deprecated for general use but is the only way to put
  // a pollable descriptor that is not a socket/pipe/tty on the event loop.
  const binding = (process as unknown as { binding(name: string): PipeWrapBinding }).binding('pipe_wrap');
  const handle = new binding.Pipe(binding.constants.SOCKET);
  const rc = handle.open(fd);
  if (rc !== 0) throw new LayerdError(ErrorCodes.EIO, `cannot poll /dev/fuse (uv error ${rc})`);
  return handle;
}

function run(command: string, args: string[], fd?: number, env?: NodeJS.ProcessEnv): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, {
      stdio: ['ignore', 'ignore', 'pipe', ...(fd === undefined ? [] : [fd])], ...(env ? { env } : {}),
    });
    let stderr = '';
    child.stderr?.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
    child.on('error', (err) => resolve({ code: -1, stderr: err.message }));
    child.on('close', (code) => resolve({ code: code ?? -1, stderr: stderr.trim() }));
  });
}

const FUSERMOUNT = 'fusermount3';

/** Mounting needs CAP_SYS_ADMIN: taken as "is root", as mount(8) does. */
function privileged(): boolean {
  return process.getuid?.() === 0;
}

/** Whether /etc/fuse.conf lets users mount with allow_other (a line of its own, as fusermount3 reads it). */
async function userAllowOther(): Promise<boolean> {
  const text = await readFile('/etc/fuse.conf', 'utf8').catch(() => '');
  return text.split('\n').some((line) => line.trim() === 'user_allow_other');
}

/** Open /dev/fuse and mount it (mount(2), common/sys/mount.ts); returns the connection's descriptor. */
async function mountAsRoot(mountpoint: string, readOnly: boolean): Promise<number> {
  let fd: number;
  try {
    fd = openSync('/dev/fuse', 'r+');
  } catch (err) {
    throw new LayerdError(ErrorCodes.EIO, `cannot open /dev/fuse: ${(err as Error).message}`, { mountpoint }, { cause: err });
  }
  const data = [`fd=${fd}`, 'rootmode=40000', `user_id=${process.getuid?.() ?? 0}`, `group_id=${process.getgid?.() ?? 0}`, 'allow_other', 'default_permissions'];
  try {
    // What `mount -i -t fuse.layerd -o …` did, without starting a process (no /sbin/mount.fuse* helper either).
    mountSyscall('layerd', resolve(mountpoint), 'fuse.layerd', readOnly ? MS_RDONLY : 0, data.join(','));
  } catch (err) {
    closeSync(fd);
    throw new LayerdError(ErrorCodes.EIO, `cannot mount ${mountpoint}: ${(err as Error).message}`, { mountpoint }, { cause: err });
  }
  return fd;
}

/**
 * Mount through fusermount3 (libfuse 3's protocol): it gets one end of a
 * socketpair as descriptor 3, named by $_FUSE_COMMFD, mounts, sends the
 * /dev/fuse descriptor over it and exits. It adds fd=, rootmode=, user_id=,
 * group_id= itself, and nosuid,nodev for users.
 */
async function mountWithFusermount(mountpoint: string, readOnly: boolean): Promise<number> {
  const options = ['fsname=layerd', 'subtype=layerd', 'default_permissions',
    ...((await userAllowOther()) ? ['allow_other'] : []), ...(readOnly ? ['ro'] : [])];
  const [ours, theirs] = socketPair();
  let fd: number | undefined;
  let mounted = false;
  try {
    const result = await run(FUSERMOUNT, ['-o', options.join(','), '--', mountpoint], theirs, { ...process.env, _FUSE_COMMFD: '3' });
    mounted = result.code === 0;
    // It has exited: what it sent is waiting in the socket, so this does not block.
    fd = receiveFd(ours);
    if (!mounted || fd === undefined) {
      throw new LayerdError(ErrorCodes.EIO, `cannot mount ${mountpoint}: ${result.stderr || `${FUSERMOUNT} exited ${result.code} without a descriptor`}`, { mountpoint });
    }
    return fd;
  } catch (err) {
    if (fd !== undefined) closeSync(fd);
    // Mounted, but the connection did not reach us: nobody will serve it.
    if (mounted) await run(FUSERMOUNT, ['-u', '-z', '--', mountpoint]);
    throw err;
  } finally {
    closeSync(ours);
    closeSync(theirs);
  }
}

export class FuseSession {
  /** Resolves when the connection ends (unmounted, aborted, or closed by us). */
  readonly closed: Promise<void>;
  private socket: Socket | undefined;
  private isClosed = false;
  /** Why the connection ended (for the log: a session that ends by itself is a mount lost). */
  private closedBecause: string | undefined;
  private markClosed!: () => void;
  private initDone!: (err?: Error) => void;
  private passthroughTaken = false;
  /** The FUSE_INIT flags both sides agreed on. */
  private negotiated = 0;
  private readonly initialized: Promise<void>;

  private constructor(readonly mountpoint: string, private readonly fd: number, private readonly handler: RequestHandler, private readonly options: SessionOptions,
    private readonly mountedAsRoot: boolean) {
    this.closed = new Promise((done) => { this.markClosed = done; });
    this.initialized = new Promise((done, fail) => { this.initDone = (err) => (err ? fail(err) : done()); });
  }

  /** Start reading requests: only once mounted (before, read() fails with EPERM). */
  private listen(): void {
    // net.Socket takes an existing handle (undocumented in its types, used by child_process for stdio).
    this.socket = new Socket({
      handle: pipeHandleFor(this.fd), readable: true, writable: false,
      onread: { buffer: READ_BUFFER, callback: (length: number, buffer: Buffer) => { this.dispatch(buffer.subarray(0, length)); } },
    } as unknown as ConstructorParameters<typeof Socket>[0]);
    // ENODEV: unmounted or aborted; anything else ends the session too.
    this.socket.on('error', (err: NodeJS.ErrnoException) => this.close(`reading /dev/fuse failed: ${err.code ?? err.message}`));
    this.socket.on('end', () => this.close('/dev/fuse reached end of file'));
  }

  /** Mount a FUSE filesystem at `mountpoint` served by `handler`. */
  static async mount(mountpoint: string, handler: RequestHandler, options: SessionOptions): Promise<FuseSession> {
    const asRoot = privileged();
    const fd = asRoot ? await mountAsRoot(mountpoint, options.readOnly) : await mountWithFusermount(mountpoint, options.readOnly);
    const session = new FuseSession(mountpoint, fd, handler, options, asRoot);
    try {
      session.listen();
      await Promise.race([session.initialized, session.closed.then(() => { throw new Error('connection closed before FUSE_INIT'); })]);
    } catch (err) {
      await session.unmount();
      throw new LayerdError(ErrorCodes.EIO, `cannot mount ${mountpoint}: ${(err as Error).message}`, { mountpoint }, { cause: err });
    }
    await session.raiseReadAhead();
    return session;
  }

  /** Best effort: a kernel without the sysfs knob keeps its default. */
  private async raiseReadAhead(): Promise<void> {
    const mount = await findMount(this.mountpoint);
    if (mount === undefined) return;
    await writeFile(`/sys/class/bdi/${mount.major}:${mount.minor}/read_ahead_kb`, String(READ_AHEAD_KB)).catch(() => undefined);
  }

  private dispatch(request: Buffer): void {
    if (request.length < IN_HEADER_SIZE) return;
    const header = readHeader(request);
    if (header.opcode === Op.INIT) return this.init(header, request);
    if (header.opcode === Op.DESTROY) return this.reply(header.unique, 0);
    this.handler(header, request, this);
  }

  private init(header: RequestHeader, request: Buffer): void {
    const kernel = readInit(request);
    if (kernel.major !== FUSE_KERNEL_VERSION) {
      this.reply(header.unique, -71 /* EPROTO */);
      this.initDone(new Error(`kernel FUSE protocol ${kernel.major}.${kernel.minor} is not 7.x`));
      return;
    }
    let flags = kernel.flags & (this.options.wantFlags | InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.MAX_PAGES | InitFlag.PARALLEL_DIROPS);
    const passthrough = this.options.passthrough === true && this.mountedAsRoot && kernel.minor >= FUSE_PASSTHROUGH_MINOR_VERSION
      && (kernel.flags & InitFlag.INIT_EXT) !== 0 && (kernel.flags2 & InitFlag2.PASSTHROUGH) !== 0;
    if (passthrough) flags |= InitFlag.INIT_EXT;
    else if (this.options.writeback === true && !this.options.readOnly) flags |= kernel.flags & InitFlag.WRITEBACK_CACHE;
    this.reply(header.unique, 0, initOut({
      maxReadahead: kernel.maxReadahead, flags, maxBackground: 64, congestionThreshold: 48,
      maxWrite: MAX_WRITE, timeGran: 1, maxPages: MAX_PAGES,
      ...(passthrough ? { minor: FUSE_PASSTHROUGH_MINOR_VERSION, flags2: InitFlag2.PASSTHROUGH, maxStackDepth: PASSTHROUGH_STACK_DEPTH } : {}),
    }));
    this.passthroughTaken = passthrough;
    this.negotiated = flags;
    this.initDone();
  }

  /** The FUSE_INIT flags in effect (0 before FUSE_INIT). */
  get flags(): number {
    return this.negotiated;
  }

  /** Whether opens may hand their data to backing files (negotiated at FUSE_INIT). */
  get passthrough(): boolean {
    return this.passthroughTaken;
  }

  /**
   * Register the open file `fd` as a backing file; returns its id for
   * open_out. The kernel keeps its own reference: `fd` may be closed after.
   */
  openBacking(fd: number): number {
    // Never an ioctl on a closed connection's number: it may be someone else's descriptor by now.
    if (this.isClosed) throw new LayerdError(ErrorCodes.EIO, `${this.mountpoint}: the FUSE connection is closed`, { mountpoint: this.mountpoint });
    const map = Buffer.alloc(16); // struct fuse_backing_map { s32 fd; u32 flags; u64 padding; }
    map.writeInt32LE(fd, 0);
    return ioctl(this.fd, FUSE_DEV_IOC_BACKING_OPEN, map, this.mountpoint);
  }

  /** Release a backing id (opens that use it keep their file). */
  closeBacking(id: number): void {
    if (this.isClosed) return;
    const arg = Buffer.alloc(4);
    arg.writeUInt32LE(id, 0);
    try {
      ioctl(this.fd, FUSE_DEV_IOC_BACKING_CLOSE, arg, this.mountpoint);
    } catch {
      // The connection is gone, and the id with it.
    }
  }

  /** Answer request `unique`: `errno` is 0 or negative; `body` follows the header. */
  reply(unique: number, errno: number, body?: Buffer): void {
    if (this.isClosed) return;
    const length = OUT_HEADER_SIZE + (errno === 0 && body ? body.length : 0);
    if (length > REPLY_BUFFER.length) {
      this.write(Buffer.concat([outHeader(length, 0, unique), body!], length));
      return;
    }
    // Replies are written synchronously, one at a time: one buffer serves them all (no allocation per reply).
    writeOutHeader(REPLY_BUFFER, length, errno, unique);
    if (length > OUT_HEADER_SIZE) body!.copy(REPLY_BUFFER, OUT_HEADER_SIZE);
    this.write(REPLY_BUFFER.subarray(0, length));
  }

  /**
   * Put `size` bytes of node `nodeid`'s content, from offset 0, into the
   * kernel's page cache (FUSE_NOTIFY_STORE): `buf` holds them after
   * NOTIFY_STORE_HEADER_SIZE bytes of room. Unasked: nobody waits for it,
   * and a node the kernel no longer has is simply not stored (ENOENT).
   */
  notifyStore(nodeid: number, buf: Buffer, size: number): void {
    if (this.isClosed) return;
    const length = NOTIFY_STORE_HEADER_SIZE + size;
    writeNotifyStoreHeader(buf, length, nodeid, size);
    this.write(buf.subarray(0, length));
  }

  /**
   * Answer with data already placed after OUT_HEADER_SIZE bytes of room at
   * the start of `buf` (reads: no copy of the payload).
   */
  replyInPlace(unique: number, buf: Buffer, payloadLength: number): void {
    if (this.isClosed) return;
    const length = OUT_HEADER_SIZE + payloadLength;
    writeOutHeader(buf, length, 0, unique);
    this.write(buf.subarray(0, length));
  }

  private write(out: Buffer): void {
    try {
      writeSync(this.fd, out);
    } catch {
      // ENOENT: the request was interrupted and is gone; ENODEV: unmounted.
      // Either way there is nobody left to tell.
    }
  }

  /** Why the connection ended; undefined while it is up. */
  get endReason(): string | undefined {
    return this.closedBecause;
  }

  /** Stop serving: closing the descriptor aborts the connection. */
  close(why = 'closed by its server'): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.closedBecause = why;
    if (this.socket) this.socket.destroy(); // closes the fd
    else closeSync(this.fd);
    this.markClosed();
  }

  /** Unmount (a lazy detach if the mount is busy) and close the connection. */
  async unmount(): Promise<void> {
    const stillMounted = async (): Promise<boolean> => (await findMount(this.mountpoint))?.fstype.startsWith('fuse') ?? false;
    if (!this.isClosed && (await stillMounted())) {
      if (this.mountedAsRoot) {
        // umount2(2) directly (no umount(8) process); a busy mount is detached instead.
        try {
          unmountSyscall(this.mountpoint);
        } catch {
          if (await stillMounted()) {
            try { unmountSyscall(this.mountpoint, MNT_DETACH); } catch { /* gone meanwhile, or nothing more to do: closed below */ }
          }
        }
      } else {
        // fusermount3 unmounts only mounts of the calling user (that it made).
        const result = await run(FUSERMOUNT, ['-u', '--', this.mountpoint]);
        if (result.code !== 0 && (await stillMounted())) await run(FUSERMOUNT, ['-u', '-z', '--', this.mountpoint]);
      }
    }
    this.close('unmounted by its server');
    await this.closed;
  }
}
