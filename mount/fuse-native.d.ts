/**
 * Minimal types for fuse-native 2.2.6 (the package ships none). Only what
 * mount/fuseAdapter.ts uses is declared; see that file for the semantics.
 */
declare module 'fuse-native' {
  type Done = (errno: number) => void;
  type Result<T> = (errno: number, value?: T) => void;

  export interface FuseStat {
    mode: number; uid: number; gid: number; size: number; dev?: number; nlink: number;
    ino: number; rdev: number; blksize: number; blocks: number;
    /** Milliseconds since the epoch. */
    atime: number; mtime: number; ctime: number;
  }

  export interface FuseStatfs {
    bsize: number; frsize: number; blocks: number; bfree: number; bavail: number;
    files: number; ffree: number; favail: number; fsid: number; flag: number; namemax: number;
  }

  export interface FuseOperations {
    init?(cb: Done): void;
    access?(path: string, mode: number, cb: Done): void;
    statfs?(path: string, cb: Result<FuseStatfs>): void;
    getattr?(path: string, cb: Result<FuseStat>): void;
    fgetattr?(path: string, fh: number, cb: Result<FuseStat>): void;
    flush?(path: string, fh: number, cb: Done): void;
    fsync?(path: string, datasync: number, fh: number, cb: Done): void;
    fsyncdir?(path: string, datasync: number, fh: number, cb: Done): void;
    readdir?(path: string, cb: (errno: number, names?: string[], stats?: FuseStat[]) => void): void;
    truncate?(path: string, size: number, cb: Done): void;
    ftruncate?(path: string, fh: number, size: number, cb: Done): void;
    /** Milliseconds. Stock 2.2.6 passes atime as both arguments. */
    utimens?(path: string, atime: number, mtime: number, cb: Done): void;
    readlink?(path: string, cb: Result<string>): void;
    chown?(path: string, uid: number, gid: number, cb: Done): void;
    chmod?(path: string, mode: number, cb: Done): void;
    mknod?(path: string, mode: number, dev: number, cb: Done): void;
    setxattr?(path: string, name: string, value: Buffer, position: number, flags: number, cb: Done): void;
    getxattr?(path: string, name: string, position: number, cb: Result<Buffer | null>): void;
    listxattr?(path: string, cb: Result<string[]>): void;
    removexattr?(path: string, name: string, cb: Done): void;
    open?(path: string, flags: number, cb: Result<number>): void;
    opendir?(path: string, flags: number, cb: Result<number>): void;
    read?(path: string, fh: number, buf: Buffer, len: number, pos: number, cb: (bytes: number) => void): void;
    write?(path: string, fh: number, buf: Buffer, len: number, pos: number, cb: (bytes: number) => void): void;
    release?(path: string, fh: number, cb: Done): void;
    releasedir?(path: string, fh: number, cb: Done): void;
    create?(path: string, mode: number, cb: Result<number>): void;
    unlink?(path: string, cb: Done): void;
    rename?(src: string, dest: string, cb: Done): void;
    link?(src: string, dest: string, cb: Done): void;
    symlink?(target: string, path: string, cb: Done): void;
    mkdir?(path: string, mode: number, cb: Done): void;
    rmdir?(path: string, cb: Done): void;
  }

  export interface FuseOptions {
    debug?: boolean; allowOther?: boolean; defaultPermissions?: boolean; kernelCache?: boolean;
    autoCache?: boolean; entryTimeout?: number; attrTimeout?: number; fsname?: string;
    subtype?: string; maxRead?: number; force?: boolean; mkdir?: boolean;
    /** Per-operation reply timeout in ms (default 15000), or false for none. */
    timeout?: number | false;
  }

  export interface FuseCaller { uid: number; gid: number; pid: number }

  class Fuse {
    /** Set by layerd's patch (patches/fuse-native+2.2.6.patch); absent on stock 2.2.6. */
    static readonly LAYERD_PATCH?: number;
    /** Patched builds only: the process calling the operation being dispatched (valid synchronously in a handler). */
    caller?(): FuseCaller;
    constructor(mnt: string, ops: FuseOperations, opts?: FuseOptions);
    readonly mnt: string;
    readonly opts: FuseOptions;
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err: Error | null) => void): void;
    static unmount(mnt: string, cb: (err: Error | null) => void): void;
    /** Internal (overridden by layerd, see fuseAdapter.ts): the `-o...` mount option string. */
    protected _fuseOptions(): string;
    /** Internal reply hooks: `signal(result, buffer)` answers the kernel. */
    protected _op_getxattr(signal: (result: number, buffer: ArrayBufferLike) => void, path: string, name: string, valueBuf: Buffer, position: number): void;
    protected _op_listxattr(signal: (result: number, buffer: ArrayBufferLike) => void, path: string, listBuf: Buffer): void;
    static readonly ENOENT: number;
    static readonly EIO: number;
  }
  export default Fuse;
}
