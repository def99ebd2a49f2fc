/**
 * Counts and latency histograms of the FUSE operations a mount serves. A
 * mount server keeps them in memory and writes them to a small JSON file
 * now and then; the daemon turns the files of all its mounts into
 * Prometheus metrics (layerd_fuse_operations_total, _seconds).
 */
import { rename, writeFile } from 'node:fs/promises';

/** Upper bounds (seconds) of the latency buckets; +Inf is implied. */
export const LATENCY_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1];

export interface OpCounters {
  count: number;
  sumSeconds: number;
  /** Cumulative counts per bucket of LATENCY_BUCKETS (then +Inf = count). */
  buckets: number[];
}

export type OpStatsSnapshot = Record<string, OpCounters>;

export class OpStats {
  private readonly ops = new Map<string, OpCounters>();

  record(op: string, seconds: number): void {
    let c = this.ops.get(op);
    if (!c) this.ops.set(op, (c = { count: 0, sumSeconds: 0, buckets: LATENCY_BUCKETS.map(() => 0) }));
    c.count++;
    c.sumSeconds += seconds;
    for (let i = 0; i < LATENCY_BUCKETS.length; i++) if (seconds <= LATENCY_BUCKETS[i]!) c.buckets[i]!++;
  }

  snapshot(): OpStatsSnapshot {
    return Object.fromEntries([...this.ops].map(([op, c]) => [op, { ...c, buckets: [...c.buckets] }]));
  }

  /** Write the snapshot atomically (tmp + rename), for a reader in another process. */
  async writeTo(path: string): Promise<void> {
    const tmp = `${path}.tmp`;
    await writeFile(tmp, JSON.stringify(this.snapshot()));
    await rename(tmp, path);
  }
}

/** Wrap every operation so that the time until its callback is recorded. */
export function instrumentOperations<T extends object>(ops: T, stats: OpStats): T {
  const out: Record<string, unknown> = {};
  for (const [name, fn] of Object.entries(ops)) {
    if (typeof fn !== 'function' || name === 'init') { out[name] = fn; continue; }
    out[name] = (...args: unknown[]): unknown => {
      const started = process.hrtime.bigint();
      const last = args.length - 1;
      const cb = args[last] as (...result: unknown[]) => void;
      args[last] = (...result: unknown[]): void => {
        stats.record(name, Number(process.hrtime.bigint() - started) / 1e9);
        cb(...result);
      };
      return (fn as (...a: unknown[]) => unknown)(...args);
    };
  }
  return out as T;
}
