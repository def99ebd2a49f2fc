/**
 * Counts and latency histograms of the FUSE operations a mount serves. A
 * mount server keeps them in memory and writes them to a small JSON file
 * now and then; the daemon turns the files of all its mounts into
 * Prometheus metrics (layerd_fuse_operations_total, _seconds).
 */
import { readFile, rename, writeFile } from 'node:fs/promises';

/** Upper bounds (seconds) of the latency buckets; +Inf is implied. */
export const LATENCY_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1];

export interface OpCounters {
  count: number;
  sumSeconds: number;
  /** Cumulative counts per bucket of LATENCY_BUCKETS (then +Inf = count). */
  buckets: number[];
}

export type OpStatsSnapshot = Record<string, OpCounters>;

/** Add `snap` into `total` (operation by operation). */
export function addSnapshot(total: OpStatsSnapshot, snap: OpStatsSnapshot): void {
  for (const [op, c] of Object.entries(snap)) {
    const t = (total[op] ??= { count: 0, sumSeconds: 0, buckets: LATENCY_BUCKETS.map(() => 0) });
    t.count += c.count;
    t.sumSeconds += c.sumSeconds;
    c.buckets.forEach((b, i) => { t.buckets[i] = (t.buckets[i] ?? 0) + b; });
  }
}

function isCounters(v: unknown): v is OpCounters {
  if (typeof v !== 'object' || v === null) return false;
  const c = v as Partial<OpCounters>;
  return Number.isSafeInteger(c.count) && c.count! >= 0 && typeof c.sumSeconds === 'number' && Number.isFinite(c.sumSeconds)
    && Array.isArray(c.buckets) && c.buckets.length === LATENCY_BUCKETS.length && c.buckets.every((b) => Number.isSafeInteger(b) && b >= 0);
}

/** A stats file as written by writeTo, or undefined if it is missing or not one. */
export async function readSnapshot(path: string): Promise<OpStatsSnapshot | undefined> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(path, 'utf8'));
  } catch {
    return undefined;
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return undefined;
  const entries = Object.entries(parsed as Record<string, unknown>);
  return entries.every(([, c]) => isCounters(c)) ? Object.fromEntries(entries) as OpStatsSnapshot : undefined;
}

export class OpStats {
  private readonly ops = new Map<string, OpCounters>();
  /** The write in progress, and whether another must follow it (writes to one file never overlap). */
  private writing: Promise<void> | undefined;
  private writeAgain = false;

  /**
   * Counters that go on from `base`: a mount served again (a new host after
   * one died, a remount) keeps counting where its stats file stopped, so the
   * daemon's sums never go backwards while the container lives.
   */
  constructor(base?: OpStatsSnapshot) {
    if (base) for (const [op, c] of Object.entries(base)) this.ops.set(op, { count: c.count, sumSeconds: c.sumSeconds, buckets: [...c.buckets] });
  }

  /** Stats that continue those in the file at `path` (if it holds any). */
  static async continuing(path: string): Promise<OpStats> {
    return new OpStats(await readSnapshot(path));
  }

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

  /**
   * Write the snapshot atomically (tmp + rename), for a reader in another
   * process. A call made while a write runs is folded into one write after
   * it: two writes through one tmp name at once could rename a half-written
   * file into place.
   */
  writeTo(path: string): Promise<void> {
    if (this.writing) {
      this.writeAgain = true;
      return this.writing;
    }
    const run = async (): Promise<void> => {
      try {
        do {
          this.writeAgain = false;
          const tmp = `${path}.tmp`;
          await writeFile(tmp, JSON.stringify(this.snapshot()));
          await rename(tmp, path);
        } while (this.writeAgain);
      } finally {
        this.writing = undefined;
      }
    };
    return (this.writing = run());
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
