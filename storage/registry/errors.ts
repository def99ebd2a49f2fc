/**
 * How registry failures map onto layerd's error codes, in one place.
 *
 * Refused credentials are EAUTH; a registry that cannot be reached (or
 * answers 5xx, or does not answer in time, or a transfer was cancelled) is
 * EIO; a redirect loop is EFORMAT; `reason` and `status` in the context say
 * more.
 */
import { type ErrorCode, ErrorCodes, LayerdError } from '../../common/errors.js';

export type RegistryFailure = 'unauthorized' | 'denied' | 'not-found' | 'server' | 'network' | 'protocol' | 'redirects' | 'timeout' | 'cancelled';

const CODE_OF: Record<RegistryFailure, ErrorCode> = {
  unauthorized: ErrorCodes.EAUTH,
  denied: ErrorCodes.EAUTH,
  'not-found': ErrorCodes.ENOTFOUND,
  server: ErrorCodes.EIO,
  network: ErrorCodes.EIO,
  protocol: ErrorCodes.EFORMAT,
  redirects: ErrorCodes.EFORMAT,
  timeout: ErrorCodes.EIO,
  cancelled: ErrorCodes.EIO,
};

export interface RegistryErrorContext {
  registry: string;
  repository?: string;
  digest?: string;
  ref?: string;
  status?: number;
  url?: string;
}

export function registryError(
  reason: RegistryFailure, message: string, context: RegistryErrorContext, cause?: unknown,
): LayerdError {
  return new LayerdError(CODE_OF[reason], message, { ...context, reason }, cause === undefined ? undefined : { cause });
}

/** The registry's own error text (`{"errors":[{"code":..,"message":..}]}`), if any. */
export function registryErrorDetail(body: Buffer): string {
  try {
    const parsed = JSON.parse(body.toString()) as { errors?: { code?: string; message?: string }[] };
    const first = parsed.errors?.[0];
    if (first) return `${first.code ?? ''}${first.message ? `: ${first.message}` : ''}`;
  } catch {
    // not JSON
  }
  return body.toString('utf8', 0, Math.min(body.length, 200)).trim();
}
