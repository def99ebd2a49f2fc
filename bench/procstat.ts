/**
 * What the benchmarks read about a server process from /proc: CPU time
 * (/proc/PID/stat: utime, stime and the reaped children's cutime, cstime,
 * in clock ticks) and memory (VmRSS from /proc/PID/status, Pss from
 * /proc/PID/smaps_rollup).
 */
import { execFileSync } from 'node:child_process';
import { readFile } from 'node:fs/promises';

let ticks: number | undefined;

/** Clock ticks per second (`getconf CLK_TCK`). */
export function clockTicks(): number {
  ticks ??= Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
  return ticks;
}

export interface CpuTimes {
  /** utime + stime (fields 14, 15), seconds. */
  self: number;
  /** cutime + cstime (fields 16, 17): children the server waited for (layerd runs mknod/setfattr), seconds. */
  children: number;
}

export async function cpuTimes(pid: number): Promise<CpuTimes> {
  const text = await readFile(`/proc/${pid}/stat`, 'utf8');
  // comm (field 2) may hold spaces and parentheses: count fields after the last ')'.
  const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const field = (n: number): number => Number(rest[n - 3]);
  const hz = clockTicks();
  return { self: (field(14) + field(15)) / hz, children: (field(16) + field(17)) / hz };
}

/** CPU seconds between two readings, the server's own plus its reaped children's. */
export function cpuDelta(before: CpuTimes, after: CpuTimes): CpuTimes {
  return { self: after.self - before.self, children: after.children - before.children };
}

/** VmRSS of a process, KiB. */
export async function rssKiB(pid: number): Promise<number> {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]);
}

/** Proportional set size of a process, KiB (shared pages split between their users). */
export async function pssKiB(pid: number): Promise<number> {
  const m = /^Pss:\s+(\d+) kB$/m.exec(await readFile(`/proc/${pid}/smaps_rollup`, 'utf8'));
  if (!m) throw new Error(`no Pss for ${pid}`);
  return Number(m[1]);
}
