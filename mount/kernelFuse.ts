/**
 * Serves a UnionFs over a FuseSession: turns kernel requests (node ids,
 * names) into UnionFs calls (paths) and their results into replies.
 *
 * What this buys over a libfuse 2 binding (fuse-native, which layerd used before):
 * - one kernel inode per file, hard links included (fuseNodes.ts), so the
 *   kernel may cache names and attributes for as long as nothing changes
 *   behind it: everything a writable mount changes goes through it;
 * - readdirplus (names with attributes in one round trip) and directory
 *   contents cached by the kernel (zero-message opendir);
 * - 1 MiB reads, and `touch -a`/`touch -m` alone (libfuse 2 dropped them).
 *
 * A file unlinked (or renamed over) while open is really gone from the
 * namespace at once, as on a local filesystem: no stand-in name is left in
 * the user's namespace (libfuse's `.fuse_hidden…` would be a name a user
 * can also create). Its node lives on while handles are open: fstat,
 * fchmod, fchown and futimens on it reach the file through an open handle,
 * and fstat shows nlink 0.
 */
import { closeSync } from 'node:fs';
import type { Logger } from '../common/log.js';
import { errnoNameOf, fsError, negativeErrno } from './fsError.js';
import {
  BodyReader, ENTRY_OUT_SIZE, FOPEN_KEEP_CACHE, FOPEN_PASSTHROUGH, FUSE_GETATTR_FH, FUSE_WRITE_KILL_SUIDGID, Fattr, InitFlag, NOTIFY_STORE_HEADER_SIZE,
  OUT_HEADER_SIZE, Op,
  RENAME_EXCHANGE, RENAME_NOREPLACE, attrOut, direntSize, entryOut, openOut, readReadIn, readSetattr, statfsOut, u32Out,
  writeDirent, writeEntry, type RequestHeader, type SetattrIn,
} from './fuseProtocol.js';
import { O_RDWR, O_WRONLY, UTIME_NOW, UTIME_OMIT, type TimeChange } from '../common/sys/fs.js';
import { FuseNode, NodeTable } from './fuseNodes.js';
import { FuseSession } from './fuseSession.js';
import type { OpStats } from './opStats.js';
import type { AccessRecorder } from './accessRecord.js';
import { joinPath } from './paths.js';
import { NO_OWNER_CHANGE, opensForWriting, type AttrChange, type DirListing, type Owner, type UnionFs, type UnionStat } from './unionFs.js';

export interface KernelFuseOptions {
  readOnly: boolean;
  /** Seconds the kernel may keep names, attributes and "no such name" answers. */
  cacheSeconds: number;
  /** Lower content can change under the mount (a live layer): no page or directory caching. */
  contentMayChange: boolean;
  logger: Logger;
  stats?: OpStats;
  /**
   * Hand the data of whole files to the kernel (FUSE passthrough) where it
   * offers that: reads, writes and mmap of everything a container wrote or
   * copied up, and reads and mmap of lower files that have a whole file
   * (an object, a directory's file), then never cross into this process.
   */
  passthrough?: boolean;
  /**
   * Let the kernel cache writes (FUSE_WRITEBACK_CACHE) where passthrough is
   * not taken: it keeps size and mtime itself, writes pages back in
   * batches, and reads through write-only opens to fill partial pages.
   */
  writeback?: boolean;
  /** Where to record the mount's first accesses (mount/accessRecord.ts), for warming the next mount of the image. */
  record?: AccessRecorder;
  /**
   * Hand a small lower file's bytes to the kernel's page cache at its first
   * open (FUSE_NOTIFY_STORE), so its reads do not come here (default true;
   * never where lower content may change).
   */
  prefill?: boolean;
}


/**
 * Answers the kernel gets often and that need no context (ioctl probes such
 * as isatty() on every Python open, the first FLUSH and OPENDIR): one error
 * object, made once.
 */
const NOT_IMPLEMENTED = fsError('ENOSYS', '', 'FUSE request');
/** The routine "no" of a lookup on a mount without negative caching: made once. */
const NO_SUCH_NAME = fsError('ENOENT', '', 'lookup');

const NAMESPACE_CHANGES = new Set<number>([Op.CREATE, Op.MKNOD, Op.MKDIR, Op.SYMLINK, Op.LINK, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.RENAME2]);
const O_ACCMODE = 3;
const OP_NAMES = new Map<number, string>(Object.entries(Op).map(([name, code]) => [code, name.toLowerCase()]));

interface DirHandle { listing: DirListing; nodeid: number }

/** Replies of an operation: a body, nothing (errno 0 alone), or a negative errno (a routine "no", made without an error object). */
type Answer = Buffer | undefined | number;

const ENODATA_ANSWER = -61;
/** What the kernel turns an ENOSYS answer to IOCTL into anyway (it asks again each time: fs/fuse/ioctl.c). */
const ENOTTY_ANSWER = -25;
const OP_IOCTL = 39;

export class KernelFuse {
  private readonly nodes: NodeTable;
  private readonly dirs = new Map<number, DirHandle>();
  /**
   * Without OPENDIR (fh 0), the listing a READDIR continues is kept per
   * directory node from its offset-0 read until its end, and dropped on any
   * change of the namespace.
   */
  private readonly listings = new Map<number, DirListing>();
  private nextDirHandle = 1;
  /** Open file handle → node, for release and for files unlinked while open. */
  private readonly handles = new Map<number, number>();
  /** The handles whose data the kernel takes to a backing file (FOPEN_PASSTHROUGH). */
  private readonly passedThrough = new Set<number>();
  private session: FuseSession | undefined;
  private readonly ttl: number;
  private readonly negativeTtl: number;
  /** Log every request (`layerd mount --debug`): checked once, not per request. */
  private readonly trace: boolean;

  private constructor(private readonly union: UnionFs, private readonly options: KernelFuseOptions) {
    this.nodes = new NodeTable(!options.contentMayChange);
    this.ttl = options.cacheSeconds;
    this.negativeTtl = options.contentMayChange ? 0 : options.cacheSeconds;
    this.trace = options.logger.isDebugEnabled();
  }

  /** Mount `union` at `mountpoint`; the session ends when it is unmounted. */
  static async mount(mountpoint: string, union: UnionFs, options: KernelFuseOptions): Promise<FuseSession> {
    const server = new KernelFuse(union, options);
    // Content that cannot change behind the kernel: no OPENDIR/RELEASEDIR round
    // trips, directories and symlinks cached, and every chunk of a listing
    // read with attributes (without READDIRPLUS_AUTO): with it the kernel
    // reads chunks after the first without them and then LOOKUPs each of
    // their names. A live layer: pages revalidated, plus only where it helps.
    // Writable: suid/sgid are cleared here (KILLPRIV_V2), which lets the kernel
    // stop asking for security.capability before every write of a file it
    // found without privileges (SB_NOSEC), and drop the GETATTR before a chown.
    const wantFlags = InitFlag.DO_READDIRPLUS
      | (options.contentMayChange ? InitFlag.READDIRPLUS_AUTO | InitFlag.AUTO_INVAL_DATA : InitFlag.CACHE_SYMLINKS | InitFlag.NO_OPENDIR_SUPPORT)
      | (options.readOnly ? 0 : InitFlag.HANDLE_KILLPRIV_V2);
    return FuseSession.mount(mountpoint, (header, request, session) => server.handle(header, request, session), {
      readOnly: options.readOnly, wantFlags, passthrough: options.passthrough ?? false,
      writeback: options.writeback === true && !options.readOnly && !options.contentMayChange,
    });
  }

  private handle(header: RequestHeader, request: Buffer, session: FuseSession): void {
    this.session = session;
    switch (header.opcode) {
      case Op.FORGET:
        this.nodes.forget(header.nodeid, new BodyReader(request).u64());
        return;
      case Op.BATCH_FORGET: {
        const r = new BodyReader(request);
        const count = r.u32();
        r.skip(4);
        for (let i = 0; i < count; i++) this.nodes.forget(r.u64(), r.u64());
        return;
      }
      case Op.INTERRUPT:
        return; // operations are short or not interruptible; the kernel copes
      case Op.READ:
        return this.read(header, request, session);
      case Op.RELEASE:
        session.reply(header.unique, 0); // nobody waits for a close's result
        return this.release(new BodyReader(request).u64(), session);
      default:
    }
    const started = this.options.stats || this.trace ? process.hrtime.bigint() : 0n;
    const done = (errno: number, body?: Buffer): void => {
      session.reply(header.unique, errno, body);
      if (!this.options.stats && !this.trace) return;
      const op = OP_NAMES.get(header.opcode) ?? `op${header.opcode}`;
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      this.options.stats?.record(op, seconds);
      if (this.trace) this.options.logger.debug('fuse request', { op, nodeid: header.nodeid, pid: header.pid, errno, us: Math.round(seconds * 1e6) });
    };
    const fail = (err: unknown): void => {
      if (errnoNameOf(err) === undefined) {
        this.options.logger.warn('unexpected error in FUSE operation', { op: OP_NAMES.get(header.opcode), nodeid: header.nodeid, error: String(err) });
      }
      done(negativeErrno(err));
    };
    try {
      const answer = this.answerHot(header, request);
      if (answer instanceof Promise) answer.then((body) => (typeof body === 'number' ? done(body) : done(0, body)), fail);
      else if (typeof answer === 'number') done(answer);
      else done(0, answer);
    } catch (err) {
      fail(err);
    }
  }

  /**
   * The requests that come by the thousand (lookups, attributes, an untar's
   * create, set-attributes and capability checks, a program's opens and
   * isatty() probes), dispatched on literal opcodes, which V8 compiles to a
   * jump table; `answer` takes the rest. (Its switch on `Op.*` properties is
   * a chain of loads and compares, and the profile of an untar showed V8
   * running it interpreted, never optimized.)
   */
  private answerHot(h: RequestHeader, req: Buffer): Answer | Promise<Answer> {
    switch (h.opcode) {
      case 1: /* LOOKUP */ return this.lookup(h.nodeid, new BodyReader(req).name('ENOENT'));
      case 3: { /* GETATTR */
        const r = new BodyReader(req);
        const flags = r.u32();
        r.skip(4);
        const fh = r.u64();
        return this.attrReply(h.nodeid, (flags & FUSE_GETATTR_FH) !== 0 ? fh : undefined);
      }
      case 4: /* SETATTR */ return this.setattr(h, req);
      case 14: /* OPEN */ return this.open(h.nodeid, new BodyReader(req).u32());
      case 22: { /* GETXATTR */
        const r = new BodyReader(req);
        const size = r.u32();
        r.skip(4);
        return this.getxattr(h.nodeid, r.name(), size);
      }
      case 35: { /* CREATE */
        this.listings.clear();
        const r = new BodyReader(req);
        r.skip(4); // flags: the union's create always opens read-write
        const mode = r.u32();
        r.skip(8);
        return this.create(h, r.name(), mode);
      }
      case OP_IOCTL: return ENOTTY_ANSWER;
      default: return this.answer(h, req);
    }
  }

  private answer(h: RequestHeader, req: Buffer): Answer | Promise<Answer> {
    const r = new BodyReader(req);
    if (NAMESPACE_CHANGES.has(h.opcode)) this.listings.clear();
    switch (h.opcode) {
      case Op.LOOKUP: return this.lookup(h.nodeid, r.name('ENOENT'));
      case Op.GETATTR: {
        const flags = r.u32();
        r.skip(4);
        const fh = r.u64();
        return this.attrReply(h.nodeid, (flags & FUSE_GETATTR_FH) !== 0 ? fh : undefined);
      }
      case Op.SETATTR: return this.setattr(h, req);
      case Op.READLINK: {
        const path = this.path(h.nodeid);
        if (this.options.record?.open === true) this.options.record.record({ op: 'readlink', path });
        return this.union.readlink(path).then((target) => Buffer.from(target));
      }
      case Op.SYMLINK: {
        const name = r.name();
        const target = r.name();
        return this.made(h.nodeid, name, (path) => this.union.symlink(target, path, ownerOf(h)));
      }
      case Op.MKNOD: {
        const mode = r.u32();
        const rdev = r.u32();
        r.skip(8);
        return this.made(h.nodeid, r.name(), (path) => this.union.mknod(path, mode, rdev, ownerOf(h)));
      }
      case Op.MKDIR: {
        const mode = r.u32();
        r.skip(4);
        return this.made(h.nodeid, r.name(), (path) => this.union.mkdir(path, mode, ownerOf(h)));
      }
      case Op.UNLINK: return this.unlink(h.nodeid, r.name());
      case Op.RMDIR: {
        const name = r.name();
        return this.union.rmdir(this.childPath(h.nodeid, name)).then(() => { this.nodes.removeName(h.nodeid, name); return undefined; });
      }
      case Op.RENAME: {
        const newdir = r.u64();
        return this.rename(h.nodeid, r.name(), newdir, r.name(), 0);
      }
      case Op.RENAME2: {
        const newdir = r.u64();
        const flags = r.u32();
        r.skip(4);
        return this.rename(h.nodeid, r.name(), newdir, r.name(), flags);
      }
      case Op.LINK: {
        const oldNode = r.u64();
        return this.link(oldNode, h.nodeid, r.name());
      }
      case Op.OPEN: return this.open(h.nodeid, r.u32());
      case Op.WRITE: {
        const fh = r.u64();
        const offset = r.u64();
        const size = r.u32();
        const writeFlags = r.u32();
        if ((writeFlags & FUSE_WRITE_KILL_SUIDGID) !== 0 && this.killsPrivileges) this.union.fkillPrivileges(fh);
        // A view of the request buffer, which the next read reuses (fuseSession.ts): the union copies what it does not write at once.
        const written = this.union.write(fh, r.skip(8 + 8).rest(size), size, offset);
        return written instanceof Promise ? written.then(u32Out) : u32Out(written);
      }
      case Op.STATFS: return this.union.statfs().then((st) => statfsOut({
        blocks: st.blocks, bfree: st.bfree, bavail: st.bavail, files: st.files, ffree: st.ffree,
        bsize: st.bsize, namelen: st.namemax, frsize: st.frsize,
      }));
      case Op.FSYNC: {
        const fh = r.u64();
        return this.union.fsync(fh, (r.u32() & 1) !== 0).then(() => undefined);
      }
      // ENOSYS to FLUSH: the kernel stops sending it (nothing to do at close but RELEASE).
      case Op.FLUSH: throw NOT_IMPLEMENTED;
      case Op.FSYNCDIR: return undefined;
      case Op.SETXATTR: {
        const size = r.u32();
        const flags = r.u32();
        const name = r.name();
        return this.union.setxattr(this.path(h.nodeid), name, Buffer.from(r.rest(size)), flags).then(() => undefined);
      }
      case Op.GETXATTR: {
        const size = r.u32();
        r.skip(4);
        return this.getxattr(h.nodeid, r.name(), size);
      }
      case Op.LISTXATTR: return this.listxattr(h.nodeid, r.u32());
      case Op.REMOVEXATTR: return this.union.removexattr(this.path(h.nodeid), r.name()).then(() => undefined);
      case Op.ACCESS: this.union.access(this.path(h.nodeid)); return undefined;
      case Op.CREATE: {
        r.skip(4); // flags: the union's create always opens read-write
        const mode = r.u32();
        r.skip(8);
        return this.create(h, r.name(), mode);
      }
      case Op.OPENDIR: return this.opendir(h.nodeid);
      case Op.READDIR: return this.readdir(h.nodeid, req, false);
      case Op.READDIRPLUS: return this.readdir(h.nodeid, req, true);
      case Op.RELEASEDIR: this.dirs.delete(new BodyReader(req).u64()); return undefined;
      default: throw NOT_IMPLEMENTED;
    }
  }

  // ---- names and attributes -----------------------------------------------------

  private path(nodeid: number): string {
    const path = this.nodes.pathOf(nodeid);
    if (path === undefined) throw fsError('ENOENT', `node ${nodeid}`, 'path of node');
    return path;
  }

  private childPath(parent: number, name: string): string {
    const path = this.nodes.childPath(parent, name);
    if (path === undefined) throw fsError('ENOENT', `node ${parent}/${name}`, 'path of node');
    return path;
  }

  private stat(path: string): UnionStat {
    return this.union.getattr(path);
  }

  /** Attributes, or undefined for any failure (a name gone meanwhile). */
  private statOrNone(path: string): UnionStat | undefined {
    try {
      return this.union.getattr(path);
    } catch {
      return undefined;
    }
  }

  private entry(parent: number, name: string, st: UnionStat): Buffer {
    const node = this.nodes.remember(parent, name, st);
    return entryOut(node.id, st, this.ttl, this.ttl);
  }

  /** Answered at once, as everything that only reads the tree and stats the upper is (no promise, no error made for a "no"). */
  private lookup(parent: number, name: string): Answer {
    let st: UnionStat | undefined;
    const path = this.childPath(parent, name);
    if (this.options.record?.open === true) this.options.record.record({ op: 'lookup', path });
    try {
      st = this.union.lookupStat(path);
    } catch (err) {
      if (errnoNameOf(err) !== 'ENOENT') throw err;
    }
    if (st === undefined) {
      // A cached negative answer (node id 0) spares the kernel asking again.
      if (this.negativeTtl > 0) return entryOut(0, undefined, this.negativeTtl, 0);
      throw NO_SUCH_NAME;
    }
    return this.entry(parent, name, st);
  }

  /** An open handle of a node that has no name left (unlinked while open), if it is one. */
  private orphanHandle(nodeid: number): number | undefined {
    if (this.nodes.pathOf(nodeid) !== undefined) return undefined;
    for (const [fh, id] of this.handles) if (id === nodeid) return fh;
    return undefined;
  }

  private attrReply(nodeid: number, fh: number | undefined): Answer {
    const handle = fh ?? this.orphanHandle(nodeid);
    const st = handle !== undefined ? this.union.fgetattr(handle) : this.stat(this.path(nodeid));
    const node = this.nodes.get(nodeid);
    if (node) this.nodes.noteIno(node, st.ino);
    return attrOut(st, this.ttl);
  }

  /** Whether suid/sgid are cleared here (FUSE_HANDLE_KILLPRIV_V2 taken at FUSE_INIT). */
  private get killsPrivileges(): boolean {
    return ((this.session?.flags ?? 0) & InitFlag.HANDLE_KILLPRIV_V2) !== 0;
  }

  /**
   * Whether a SETATTR asks to clear suid/sgid. With KILLPRIV_V2 the kernel
   * says so with FATTR_KILL_SUIDGID on a chown or truncate; when a write it
   * does not send here (passed through, or cached) must clear them, its
   * file_remove_privs() strips the mode change it would have made and
   * sends a SETATTR that sets nothing at all (so does `chown(f, -1, -1)`,
   * which clears suid on Linux too; with writeback caching it carries the
   * new ctime). It does that only for a caller without CAP_FSETID, or to
   * drop security.capability (which the kernel removes itself): a root
   * caller's empty SETATTR changes nothing.
   */
  private killRequested(h: RequestHeader, valid: number): boolean {
    if (!this.killsPrivileges) return false;
    if ((valid & Fattr.KILL_SUIDGID) !== 0) return true;
    return (valid & ~(Fattr.FH | Fattr.LOCKOWNER | Fattr.CTIME)) === 0 && h.uid !== 0;
  }

  private setattr(h: RequestHeader, req: Buffer): Answer | Promise<Answer> {
    const nodeid = h.nodeid;
    const s = readSetattr(req);
    const kill = this.killRequested(h, s.valid);
    const orphan = this.orphanHandle(nodeid);
    if (orphan !== undefined) {
      const fh = s.valid & Fattr.FH ? s.fh : orphan;
      if (kill) this.union.fkillPrivileges(fh);
      return this.setattrByHandle(nodeid, fh, s);
    }
    const path = this.path(nodeid);
    // An upper file's mode, owner and times (untar's fchmod, fchown, futimens of each file it makes): at once.
    if ((s.valid & Fattr.SIZE) === 0 && this.union.setattrNow(path, attrChange(s, kill))) return this.attrReply(nodeid, undefined);
    return this.setattrQueued(h.nodeid, path, s, kill);
  }

  private async setattrQueued(nodeid: number, path: string, s: SetattrIn, kill: boolean): Promise<Answer> {
    if (s.valid & Fattr.SIZE) this.refuseWhileLowerBacked(this.nodes.get(nodeid), path, true, 'truncate');
    if (s.valid & Fattr.MODE) await this.union.chmod(path, s.mode);
    if (s.valid & (Fattr.UID | Fattr.GID)) {
      await this.union.chown(path, s.valid & Fattr.UID ? s.uid : NO_OWNER_CHANGE, s.valid & Fattr.GID ? s.gid : NO_OWNER_CHANGE);
    }
    if (s.valid & Fattr.SIZE) {
      if (s.valid & Fattr.FH) await this.union.ftruncate(s.fh, s.size);
      else await this.union.truncate(path, s.size);
    }
    if (s.valid & (Fattr.ATIME | Fattr.MTIME)) await this.union.utimens(path, ...timeChanges(s));
    if (kill) await this.union.killPrivileges(path);
    return this.attrReply(nodeid, undefined);
  }

  /** SETATTR of a file whose last name is gone: through an open handle of it. */
  private async setattrByHandle(nodeid: number, fh: number, s: SetattrIn): Promise<Answer> {
    if (s.valid & Fattr.MODE) this.union.fchmod(fh, s.mode);
    if (s.valid & (Fattr.UID | Fattr.GID)) {
      this.union.fchown(fh, s.valid & Fattr.UID ? s.uid : NO_OWNER_CHANGE, s.valid & Fattr.GID ? s.gid : NO_OWNER_CHANGE);
    }
    if (s.valid & Fattr.SIZE) await this.union.ftruncate(fh, s.size);
    if (s.valid & (Fattr.ATIME | Fattr.MTIME)) this.union.futimens(fh, ...timeChanges(s));
    return this.attrReply(nodeid, fh);
  }

  /** Create something at (parent, name), then answer with its entry. */
  private async made(parent: number, name: string, make: (path: string) => Promise<void>): Promise<Answer> {
    const path = this.childPath(parent, name);
    await make(path);
    return this.entry(parent, name, await this.stat(path));
  }

  private async link(oldNode: number, parent: number, name: string): Promise<Answer> {
    const path = this.childPath(parent, name);
    await this.union.link(this.path(oldNode), path);
    const st = await this.stat(path);
    // The link copied the source up: its number changed; the new name must join its node.
    const source = this.nodes.get(oldNode);
    if (source) this.nodes.noteIno(source, st.ino);
    return this.entry(parent, name, st);
  }

  // ---- removal and renames ------------------------------------------------------

  private async unlink(parent: number, name: string): Promise<Answer> {
    await this.union.unlink(this.childPath(parent, name));
    this.nodes.removeName(parent, name);
    return undefined;
  }

  private async rename(parent: number, name: string, newParent: number, newName: string, flags: number): Promise<Answer> {
    const src = this.childPath(parent, name);
    const dst = this.childPath(newParent, newName);
    if (flags & RENAME_EXCHANGE || flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) throw fsError('EINVAL', src, `rename flags ${flags}`);
    if (flags & RENAME_NOREPLACE) {
      if (this.statOrNone(dst) !== undefined) throw fsError('EEXIST', dst, 'rename');
    }
    await this.union.rename(src, dst);
    this.nodes.move(parent, name, newParent, newName);
    return undefined;
  }

  // ---- files --------------------------------------------------------------------

  private openFlags(): number {
    // Pages stay valid across opens: every write goes through this kernel (and the
    // node table gives hard links one inode). Not so if lower content may change.
    return this.options.contentMayChange ? 0 : FOPEN_KEEP_CACHE;
  }

  private opened(node: FuseNode | undefined, fh: number): void {
    if (node === undefined) return;
    node.openHandles++;
    this.handles.set(fh, node.id);
  }

  /** Whether the kernel caches writes (FUSE_WRITEBACK_CACHE taken at FUSE_INIT). */
  private get writebackCache(): boolean {
    return ((this.session?.flags ?? 0) & InitFlag.WRITEBACK_CACHE) !== 0;
  }

  private open(nodeid: number, flags: number): Answer | Promise<Answer> {
    const path = this.path(nodeid);
    this.refuseWhileLowerBacked(this.nodes.get(nodeid), path, opensForWriting(flags), 'open for writing');
    // What needs no copy-up, truncation or wait for queued changes is opened at once (reads; writes of upper files).
    const now = this.writebackCache && (flags & O_ACCMODE) === O_WRONLY ? undefined : this.union.openNow(path, flags);
    if (now === undefined) return this.openUnion(path, flags).then((fh) => this.openedReply(nodeid, path, flags, fh));
    const reply = this.openedReply(nodeid, path, flags, now);
    return opensForWriting(flags) ? reply : this.prefill(this.nodes.get(nodeid), now, reply);
  }

  /**
   * At the first open of a small lower file on this mount, its bytes go to
   * the kernel's page cache (FUSE_NOTIFY_STORE) before the open is answered,
   * so the caller's reads find them there. That saves the READ round trip,
   * and on a writable mount also the GETATTR that follows it: the kernel
   * drops the cached atime after every READ it sends (`fuse_invalidate_atime`),
   * so the next fstat asks again. Reading every file of debian-multi cold,
   * that was two of the four round trips of each file under 256 KiB.
   *
   * Only content that never changes under the mount (pages are kept across
   * opens, FOPEN_KEEP_CACHE), only once per node: if the kernel evicts the
   * pages later, its READs are answered as always. Larger files pass through
   * to their object or are read as asked (storing them would fill the page
   * cache with what a reader may never read).
   */
  private prefill(node: FuseNode | undefined, fh: number, reply: Answer): Answer | Promise<Answer> {
    const session = this.session;
    if (node === undefined || node.prefilled || session === undefined || this.options.prefill === false || this.options.contentMayChange) return reply;
    if (this.passedThrough.has(fh)) return reply;
    const size = this.union.prefillSize(fh);
    if (size === 0) return reply;
    node.prefilled = true;
    const started = this.options.stats ? process.hrtime.bigint() : 0n;
    const buf = Buffer.allocUnsafe(NOTIFY_STORE_HEADER_SIZE + size);
    return this.union.read(fh, buf.subarray(NOTIFY_STORE_HEADER_SIZE), size, 0).then((n) => {
      // Fewer bytes than the size the kernel was given (a directory layer's file cut short meanwhile): let its reads say so.
      if (n !== size) return reply;
      session.notifyStore(node.id, buf, size);
      // What the kernel would have asked for (the warm-up of the next mount replays it).
      if (this.options.record?.open === true) {
        const path = this.nodes.pathOf(node.id);
        if (path !== undefined) this.options.record.record({ op: 'read', path, offset: 0, size });
      }
      if (this.options.stats) this.options.stats.record('prefill', Number(process.hrtime.bigint() - started) / 1e9);
      return reply;
    }, () => reply);
  }

  private openedReply(nodeid: number, path: string, flags: number, fh: number): Answer {
    const node = this.nodes.get(nodeid);
    this.opened(node, fh);
    if (node && opensForWriting(flags)) {
      // Opening for writing copied the file up: its inode number is the upper one now.
      let ino = node.ino;
      try { ino = this.stat(path).ino; } catch { /* gone meanwhile: the handle still stands */ }
      this.nodes.noteIno(node, ino);
    }
    return this.openReply(node, fh);
  }

  /**
   * With writeback caching the kernel reads through any open it writes
   * through (to fill the rest of a page a write covers in part), so a
   * write-only open is opened read-write here; where the server may not
   * read the file (a server without root, a file without read permission)
   * it stays write-only, as before.
   */
  private async openUnion(path: string, flags: number): Promise<number> {
    if (!this.writebackCache || (flags & O_ACCMODE) !== O_WRONLY) return this.union.open(path, flags);
    try {
      return await this.union.open(path, (flags & ~O_ACCMODE) | O_RDWR);
    } catch (err) {
      if (errnoNameOf(err) !== 'EACCES') throw err;
      return this.union.open(path, flags);
    }
  }

  /**
   * While a lower file's bytes back passthrough opens of a node, the
   * kernel takes every open of that node only with that same backing file
   * (any other answer fails the open with EIO): an open of its upper copy
   * for writing could only write into the shared object (or lower file).
   * So that open, and a truncation by name, are refused with ETXTBSY (as
   * writing to a running executable is) until those opens are closed; its
   * bytes therefore stay the object's, and read-only opens of an upper copy
   * made meanwhile (by a chmod, a link) share the backing.
   */
  private refuseWhileLowerBacked(node: FuseNode | undefined, path: string, writes: boolean, op: string): void {
    if (writes && node?.backing?.lower === true) throw fsError('ETXTBSY', path, `${op} (its lower content backs open files)`);
  }

  /**
   * open_out for a new handle: passed through to a whole file when the
   * kernel allows it and there is one — its upper file, or a lower file's
   * content-addressed object (storage/objectStore.ts) or plain-directory
   * file —, else served here (page-cached).
   *
   * The kernel keeps one backing file per inode while passthrough opens
   * last, and refuses to mix them with cached opens of the same inode: so
   * all passthrough opens of a node share one backing id (registered on a
   * read-write descriptor of its own for an upper file, a read-only one for
   * lower content), and a node with cached opens (a lower file first read
   * before its object was made) gets cached opens until those are released.
   * (When a user writes, the kernel still asks for suid/sgid to be cleared,
   * with a SETATTR (killRequested): that part of a write does not pass through.)
   */
  private openReply(node: FuseNode | undefined, fh: number): Buffer {
    const session = this.session;
    if (node === undefined || session === undefined || !session.passthrough) return openOut(fh, this.openFlags());
    if (node.backing === undefined) {
      let backing: { fd: number; owned: boolean; lower: boolean } | undefined;
      try {
        backing = node.cachedOpens === 0 ? this.union.backingFd(fh) : undefined;
      } catch (err) {
        // The open itself succeeded: serve it here rather than fail it (and leave its handle to nobody).
        this.options.logger.debug('no descriptor for a backing file: served here', { fh, error: String(err) });
      }
      if (backing === undefined) {
        node.cachedOpens++;
        return openOut(fh, this.openFlags());
      }
      try {
        node.backing = { id: session.openBacking(backing.fd), opens: 0, lower: backing.lower };
      } catch (err) {
        this.options.logger.debug('no backing file for an open: served here', { fh, error: String(err) });
        node.cachedOpens++;
        return openOut(fh, this.openFlags());
      } finally {
        if (backing.owned) closeSync(backing.fd);
      }
    }
    node.backing.opens++;
    this.passedThrough.add(fh);
    return openOut(fh, FOPEN_PASSTHROUGH, node.backing.id);
  }

  private create(h: RequestHeader, name: string, mode: number): Answer | Promise<Answer> {
    const path = this.childPath(h.nodeid, name);
    // In a directory already in the upper (every file of a new one: untar, builds): at once.
    const now = this.union.createFileNow(path, mode, ownerOf(h));
    if (now !== undefined) return this.created(h, name, now.fh, now.stat);
    return this.union.createFile(path, mode, ownerOf(h)).then(({ fh, stat }) => this.created(h, name, fh, stat));
  }

  private created(h: RequestHeader, name: string, fh: number, st: UnionStat): Answer {
    const node = this.nodes.remember(h.nodeid, name, st);
    this.opened(node, fh);
    const out = Buffer.allocUnsafe(ENTRY_OUT_SIZE + 16);
    writeEntry(out, 0, node.id, st, this.ttl, this.ttl);
    this.openReply(node, fh).copy(out, ENTRY_OUT_SIZE);
    return out;
  }

  private read(h: RequestHeader, req: Buffer, session: FuseSession): void {
    const { fh, offset, size } = readReadIn(req);
    const started = this.options.stats ? process.hrtime.bigint() : 0n;
    if (this.options.record?.open === true) {
      const path = this.nodes.pathOf(this.handles.get(fh) ?? 0);
      if (path !== undefined) this.options.record.record({ op: 'read', path, offset, size });
    }
    const buf = Buffer.allocUnsafe(OUT_HEADER_SIZE + size);
    this.union.read(fh, buf.subarray(OUT_HEADER_SIZE), size, offset).then(
      (n) => session.replyInPlace(h.unique, buf, n),
      (err: unknown) => session.reply(h.unique, negativeErrno(err)),
    ).finally(() => {
      if (this.options.stats) this.options.stats.record('read', Number(process.hrtime.bigint() - started) / 1e9);
    });
  }

  private release(fh: number, session: FuseSession): void {
    const node = this.nodes.get(this.handles.get(fh) ?? 0);
    this.handles.delete(fh);
    if (node !== undefined) {
      node.openHandles--;
      if (this.passedThrough.delete(fh)) {
        if (node.backing !== undefined && --node.backing.opens === 0) {
          session.closeBacking(node.backing.id);
          node.backing = undefined;
        }
      } else if (node.cachedOpens > 0) {
        node.cachedOpens--;
      }
    }
    this.union.release(fh).catch((err: unknown) => this.options.logger.warn('close failed', { fh, error: String(err) }));
  }

  // ---- xattrs -------------------------------------------------------------------

  private getxattr(nodeid: number, name: string, size: number): Answer {
    const path = this.path(nodeid);
    const value = this.union.getxattr(path, name);
    // The kernel asks for security.capability before a file's first write and at each chown: "none" is the usual answer.
    if (value === undefined) return ENODATA_ANSWER;
    if (size === 0) return u32Out(value.length);
    if (value.length > size) throw fsError('ERANGE', path, `getxattr ${name}`);
    return value;
  }

  private async listxattr(nodeid: number, size: number): Promise<Answer> {
    const path = this.path(nodeid);
    const names = await this.union.listxattr(path);
    const list = Buffer.from(names.map((n) => `${n}\0`).join(''));
    if (size === 0) return u32Out(list.length);
    if (list.length > size) throw fsError('ERANGE', path, 'listxattr');
    return list;
  }

  // ---- directories --------------------------------------------------------------

  private opendir(nodeid: number): Answer {
    // Only a live layer's mounts open directories (the others negotiated
    // zero-message opendir): no kernel directory cache for them.
    if (!this.options.contentMayChange) throw NOT_IMPLEMENTED;
    // The listing is taken once per open, so offsets stay valid while it is read.
    const listing = this.union.readdir(this.path(nodeid));
    const fh = this.nextDirHandle++;
    this.dirs.set(fh, { listing, nodeid });
    return openOut(fh, 0);
  }

  private listingOf(nodeid: number, fh: number, offset: number): DirHandle {
    if (fh !== 0) {
      const dir = this.dirs.get(fh);
      if (dir === undefined) throw fsError('EBADF', `node ${nodeid}`, `readdir of handle ${fh}`);
      return dir;
    }
    let listing = offset === 0 ? undefined : this.listings.get(nodeid);
    if (listing === undefined) this.listings.set(nodeid, listing = this.union.readdir(this.path(nodeid)));
    return { listing, nodeid };
  }

  private readdir(nodeid: number, req: Buffer, plus: boolean): Answer {
    const { fh, offset, size } = readReadIn(req);
    const dir = this.listingOf(nodeid, fh, offset);
    if (offset === 0 && this.options.record?.open === true) this.options.record.record({ op: 'list', path: this.path(dir.nodeid) });
    const { names, stats } = dir.listing;
    let end = offset;
    let bytes = 0;
    for (; end < names.length; end++) {
      const next = bytes + direntSize(names[end]!, plus);
      if (next > size) break;
      bytes = next;
    }
    if (fh === 0 && end >= names.length) this.listings.delete(nodeid);
    const out = Buffer.allocUnsafe(bytes);
    if (!plus) {
      let at = 0;
      for (let i = offset; i < end; i++) at = writeDirent(out, at, stats[i]!.ino, i + 1, stats[i]!.mode, names[i]!);
      return out;
    }
    // Attributes first (upper entries need an lstat); lookups are counted only
    // for entries that go out in this reply.
    const dirPath = this.path(dir.nodeid);
    const attrs = names.slice(offset, end).map((name) => (name === '.' || name === '..' ? undefined : this.statOrNone(joinPath(dirPath, name))));
    let at = 0;
    for (let i = offset; i < end; i++) {
      const st = attrs[i - offset];
      const name = names[i]!;
      if (st === undefined) writeEntry(out, at, 0, undefined, 0, 0);
      else writeEntry(out, at, this.nodes.remember(dir.nodeid, name, st).id, st, this.ttl, this.ttl);
      at = writeDirent(out, at + ENTRY_OUT_SIZE, st?.ino ?? stats[i]!.ino, i + 1, stats[i]!.mode, name);
    }
    return out;
  }
}

/** What a SETATTR changes besides the size, for UnionFs.setattrNow. */
function attrChange(s: SetattrIn, kill: boolean): AttrChange {
  const change: AttrChange = {};
  if (s.valid & Fattr.MODE) change.mode = s.mode;
  if (s.valid & Fattr.UID) change.uid = s.uid;
  if (s.valid & Fattr.GID) change.gid = s.gid;
  if (s.valid & (Fattr.ATIME | Fattr.MTIME)) change.times = timeChanges(s);
  if (kill) change.killPrivileges = true;
  return change;
}

/** The times a SETATTR sets: each one given, now, or left alone (UTIME_OMIT). */
function timeChanges(s: SetattrIn): [TimeChange, TimeChange] {
  const atime: TimeChange = s.valid & Fattr.ATIME ? (s.valid & Fattr.ATIME_NOW ? UTIME_NOW : s.atime) : UTIME_OMIT;
  const mtime: TimeChange = s.valid & Fattr.MTIME ? (s.valid & Fattr.MTIME_NOW ? UTIME_NOW : s.mtime) : UTIME_OMIT;
  return [atime, mtime];
}

function ownerOf(h: RequestHeader): Owner {
  return { uid: h.uid, gid: h.gid };
}

