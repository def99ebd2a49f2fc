/**
 * Errors of filesystem operations. The union core throws `FsError` with a
 * POSIX errno name (what the FUSE adapter replies with); it is a LayerdError
 * so code outside mount/ can treat it like any other layerd failure.
 */
import { ErrorCodes, LayerdError, errnoCode, type ErrorCode } from '../common/errors.js';

/** errno values (Linux) the union filesystem may answer with. */
export const ERRNO = {
  EPERM: 1, ENOENT: 2, EIO: 5, EBADF: 9, EACCES: 13, EEXIST: 17, EXDEV: 18, ENOTDIR: 20,
  EISDIR: 21, EINVAL: 22, ENOSPC: 28, EROFS: 30, EMLINK: 31, ERANGE: 34, ENAMETOOLONG: 36,
  ENOSYS: 38, ENOTEMPTY: 39, ELOOP: 40, ENODATA: 61, EOPNOTSUPP: 95, E2BIG: 7, EFBIG: 27,
  EDQUOT: 122, ENOTCONN: 107,
} as const;

export type ErrnoName = keyof typeof ERRNO;

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
