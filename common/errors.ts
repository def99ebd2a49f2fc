/**
 * The one place where layerd's error kinds are defined.
 *
 * Every failure that crosses a module boundary is a `LayerdError` with a
 * stable `code` (the API and CLI pass it through unchanged, scripts match on
 * it) and a `context` object naming what it was about (digest, path, mount
 * id, ...). Messages are for people; codes are for programs.
 */

export const ErrorCodes = {
  /** A digest or size did not match what was promised. */
  EDIGEST: 'EDIGEST',
  /** A tar archive is malformed or hostile (traversal, escapes, truncation). */
  EBADTAR: 'EBADTAR',
  /** A manifest, index, config or other document is malformed. */
  EBADJSON: 'EBADJSON',
  /** The input is not in a format layerd understands. */
  EFORMAT: 'EFORMAT',
  /** Something named by the caller does not exist. */
  ENOTFOUND: 'ENOTFOUND',
  /** A reference matches more than one thing (e.g. a short digest prefix). */
  EAMBIGUOUS: 'EAMBIGUOUS',
  /** The thing to create already exists. */
  EEXIST: 'EEXIST',
  /** The operation conflicts with the current state (e.g. still referenced). */
  ECONFLICT: 'ECONFLICT',
  /** The store is held by another process (a running daemon). */
  EBUSY: 'EBUSY',
  /** The caller's arguments are invalid. */
  EINVAL: 'EINVAL',
  /** An input exceeds a configured limit (size, entry count, name length). */
  ELIMIT: 'ELIMIT',
  /** No image in an index matches the requested platform. */
  EPLATFORM: 'EPLATFORM',
  /** A feature is recognised but not supported (e.g. schema1 manifests). */
  EUNSUPPORTED: 'EUNSUPPORTED',
  /** The filesystem holding the store is full (or its quota is used up). */
  ENOSPC: 'ENOSPC',
  /** The store's on-disk state is inconsistent. */
  ECORRUPT: 'ECORRUPT',
  /** A remote service (a registry) refused our credentials. */
  EAUTH: 'EAUTH',
  /** An operating-system call failed in a way not covered above. */
  EIO: 'EIO',
  /** A bug: an invariant of layerd itself did not hold. */
  EINTERNAL: 'EINTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

export type ErrorContext = Readonly<Record<string, string | number | boolean | undefined>>;

export class LayerdError extends Error {
  readonly code: ErrorCode;
  readonly context: ErrorContext;

  constructor(code: ErrorCode, message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'LayerdError';
    this.code = code;
    this.context = context;
  }

  /** A JSON-friendly form for the API and `--json` output. */
  toJSON(): { code: ErrorCode; message: string; context: ErrorContext } {
    return { code: this.code, message: this.message, context: this.context };
  }
}

export function isLayerdError(err: unknown, code?: ErrorCode): err is LayerdError {
  return err instanceof LayerdError && (code === undefined || err.code === code);
}

/** Node's system errors carry an errno `code` string such as 'ENOENT'. */
export function errnoCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err) {
    const code = (err as { code: unknown }).code;
    return typeof code === 'string' ? code : undefined;
  }
  return undefined;
}

/** Wrap any thrown value as a LayerdError, keeping an existing one as it is. */
export function asLayerdError(err: unknown, fallback: ErrorCode = ErrorCodes.EIO, context: ErrorContext = {}): LayerdError {
  if (err instanceof LayerdError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new LayerdError(fallback, message, context, { cause: err });
}

/** Exit status for the CLI: stable per code so scripts can branch on it. */
export function exitStatusFor(code: ErrorCode): number {
  switch (code) {
    case ErrorCodes.EINVAL: return 2;
    case ErrorCodes.ENOTFOUND: return 3;
    case ErrorCodes.EEXIST:
    case ErrorCodes.ECONFLICT:
    case ErrorCodes.EAMBIGUOUS: return 4;
    case ErrorCodes.EBUSY: return 5;
    case ErrorCodes.EDIGEST:
    case ErrorCodes.EBADTAR:
    case ErrorCodes.EBADJSON:
    case ErrorCodes.EFORMAT:
    case ErrorCodes.ELIMIT:
    case ErrorCodes.EPLATFORM:
    case ErrorCodes.EUNSUPPORTED: return 6;
    case ErrorCodes.ECORRUPT: return 7;
    case ErrorCodes.EAUTH: return 8;
    default: return 1;
  }
}
