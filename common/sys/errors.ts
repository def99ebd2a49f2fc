/**
 * Errors of filesystem system calls: an errno name (what FUSE answers with,
 * negated) plus the path and operation that failed. An FsError is a
 * LayerdError, so code outside the filesystem treats it like any other
 * layerd failure; the errno travels unchanged to the kernel (EIO only for a
 * real I/O error or an errno this table does not know).
 */
import { ErrorCodes, LayerdError, errnoCode, type ErrorCode } from '../errors.js';

/** Linux errno numbers (x86_64 and arm64 share them). */
export const ERRNO = {
  EPERM: 1, ENOENT: 2, ESRCH: 3, EINTR: 4, EIO: 5, ENXIO: 6, E2BIG: 7, EBADF: 9, EAGAIN: 11, ENOMEM: 12,
  EACCES: 13, EFAULT: 14, EBUSY: 16, EEXIST: 17, EXDEV: 18, ENODEV: 19, ENOTDIR: 20, EISDIR: 21, EINVAL: 22,
  ENFILE: 23, EMFILE: 24, ETXTBSY: 26, EFBIG: 27, ENOSPC: 28, ESPIPE: 29, EROFS: 30, EMLINK: 31, ERANGE: 34,
  ENAMETOOLONG: 36, ENOSYS: 38, ENOTEMPTY: 39, ELOOP: 40, ENODATA: 61, EOVERFLOW: 75, EILSEQ: 84, EOPNOTSUPP: 95,
  EMSGSIZE: 90, ENOBUFS: 105, ENOTCONN: 107, ECONNREFUSED: 111, ESTALE: 116, EDQUOT: 122,
} as const;

export type ErrnoName = keyof typeof ERRNO;

const NAME_OF = new Map<number, ErrnoName>(Object.entries(ERRNO).map(([name, n]) => [n, name as ErrnoName]));

/** The name of an errno number; EIO for one this table does not know. */
export function errnoName(errno: number): ErrnoName {
  return NAME_OF.get(errno) ?? 'EIO';
}

function layerdCodeFor(errno: ErrnoName): ErrorCode {
  switch (errno) {
    case 'ENOENT': return ErrorCodes.ENOTFOUND;
    case 'EEXIST': return ErrorCodes.EEXIST;
    case 'EINVAL': return ErrorCodes.EINVAL;
    case 'ENOTEMPTY': return ErrorCodes.ECONFLICT;
    case 'EOPNOTSUPP':
    case 'ENOSYS': return ErrorCodes.EUNSUPPORTED;
    default: return ErrorCodes.EIO;
  }
}

export class FsError extends LayerdError {
  readonly errno: ErrnoName;

  constructor(errno: ErrnoName, path: string, op?: string) {
    super(layerdCodeFor(errno), `${errno}: ${op ?? 'operation'} ${JSON.stringify(path)}`, { errno, path, op });
    this.name = 'FsError';
    this.errno = errno;
  }
}

/**
 * An FsError without a stack trace: these are routine answers (every
 * negative lookup is an ENOENT), and capturing the stack costs several times
 * more than the rest of making one. The errno, path and op say where it came from.
 */
export function fsError(errno: ErrnoName, path: string, op?: string): FsError {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return new FsError(errno, path, op);
  } finally {
    Error.stackTraceLimit = limit;
  }
}

/** The errno name an error stands for (FsError, or a Node system error), if any. */
export function errnoNameOf(err: unknown): ErrnoName | undefined {
  if (err instanceof FsError) return err.errno;
  const code = errnoCode(err);
  return code !== undefined && code in ERRNO ? (code as ErrnoName) : undefined;
}

/** Negative errno to answer FUSE with; anything unrecognised becomes -EIO. */
export function negativeErrno(err: unknown): number {
  const name = errnoNameOf(err);
  return -(name === undefined ? ERRNO.EIO : ERRNO[name]);
}
