/**
 * How long a registry transfer may take, and how it is stopped early.
 *
 * - connect: from sending a request to having a connected socket;
 * - idle: no byte received or sent for this long (while we are reading:
 *   bytes the consumer has not taken yet do not count as a stall);
 * - total: the whole pull or push, 0 for no limit.
 *
 * A transfer is stopped by aborting its AbortSignal with an `AbortCause`
 * (the overall deadline, or the API client that went away); the client
 * turns the cause into a typed error naming the registry and what was
 * being fetched.
 */
import { ErrorCodes, LayerdError } from '../../common/errors.js';

export interface RegistryTimeouts {
  connectMs: number;
  idleMs: number;
  /** The whole operation (pull or push); 0: no limit. */
  totalMs: number;
}

export const DEFAULT_TIMEOUTS: RegistryTimeouts = { connectMs: 30_000, idleMs: 60_000, totalMs: 0 };

/** The configuration's form (daemon config key `registryTimeouts`, layerctl flags): seconds. */
export interface TimeoutSettings {
  connectSeconds?: number;
  idleSeconds?: number;
  totalSeconds?: number;
}

export const TIMEOUT_KEYS = ['connectSeconds', 'idleSeconds', 'totalSeconds'] as const;

/** Check a `TimeoutSettings` value from outside; `what` names where it came from. */
export function checkTimeoutSettings(value: unknown, what: string): TimeoutSettings {
  const bad = (message: string, key?: string): LayerdError =>
    new LayerdError(ErrorCodes.EINVAL, `${what}: ${message}`, key ? { key } : {});
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw bad('must be an object');
  const out: TimeoutSettings = {};
  for (const [key, v] of Object.entries(value)) {
    if (!(TIMEOUT_KEYS as readonly string[]).includes(key)) throw bad(`unknown key '${key}' (known: ${TIMEOUT_KEYS.join(', ')})`, key);
    const min = key === 'totalSeconds' ? 0 : Number.MIN_VALUE;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min) {
      throw bad(`'${key}' must be a number of seconds${key === 'totalSeconds' ? ' (0: no limit)' : ' above 0'}`, key);
    }
    out[key as keyof TimeoutSettings] = v;
  }
  return out;
}

export function timeoutsFrom(settings: TimeoutSettings | undefined): RegistryTimeouts {
  return {
    connectMs: settings?.connectSeconds !== undefined ? settings.connectSeconds * 1000 : DEFAULT_TIMEOUTS.connectMs,
    idleMs: settings?.idleSeconds !== undefined ? settings.idleSeconds * 1000 : DEFAULT_TIMEOUTS.idleMs,
    totalMs: settings?.totalSeconds !== undefined ? settings.totalSeconds * 1000 : DEFAULT_TIMEOUTS.totalMs,
  };
}

/** Why a transfer's signal was aborted. */
export type AbortCause =
  | { kind: 'deadline'; ms: number }
  | { kind: 'cancelled'; why: string };

export function isAbortCause(value: unknown): value is AbortCause {
  const kind = (value as { kind?: unknown } | null)?.kind;
  return kind === 'deadline' || kind === 'cancelled';
}

/**
 * A signal that aborts when `outer` does or when `totalMs` (if > 0) has
 * passed; `dispose()` stops the clock once the operation is over.
 */
export function withDeadline(outer: AbortSignal | undefined, totalMs: number): { signal: AbortSignal; dispose(): void } {
  const controller = new AbortController();
  const onOuter = (): void => controller.abort(outer!.reason);
  if (outer?.aborted) onOuter();
  else outer?.addEventListener('abort', onOuter, { once: true });
  const cause: AbortCause = { kind: 'deadline', ms: totalMs };
  const timer = totalMs > 0 ? setTimeout(() => controller.abort(cause), totalMs) : undefined;
  return {
    signal: controller.signal,
    dispose: () => {
      clearTimeout(timer);
      outer?.removeEventListener('abort', onOuter);
    },
  };
}

export function seconds(ms: number): string {
  return `${ms / 1000} s`;
}
