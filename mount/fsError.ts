/**
 * Errors of filesystem operations: the union core throws `FsError` with a
 * POSIX errno name (what the FUSE server replies with). They are defined by
 * the system-call layer (common/sys/errors.ts), whose calls fail with them.
 */
export { ERRNO, FsError, errnoName, errnoNameOf, fsError, negativeErrno, type ErrnoName } from '../common/sys/errors.js';
