/**
 * Stopping processes a test started, and waiting for them to be gone, always
 * with a bound: a process that will not go is a failure with a message, never
 * a hang until mocha's (or CI's) timeout.
 */
import type { ChildProcess } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { processAlive, sleep } from '../../common/process.js';

export interface ChildExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** The child's exit, or a rejection naming `what` after `timeoutMs`. */
export function waitForExit(child: ChildProcess, timeoutMs: number, what = `process ${child.pid}`): Promise<ChildExit> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve, reject) => {
    const onExit = (code: number | null, signal: NodeJS.Signals | null): void => {
      clearTimeout(timer);
      resolve({ code, signal });
    };
    const timer = setTimeout(() => {
      child.off('exit', onExit);
      reject(new Error(`${what} did not exit within ${timeoutMs} ms`));
    }, timeoutMs);
    child.once('exit', onExit);
  });
}

/**
 * Send `signal` to a child (by its PID) and wait for it to exit; if it has not
 * after `graceMs`, SIGKILL it and wait again (bounded). Rejects only if even
 * SIGKILL does not end it (e.g. stuck in the kernel on a hung FUSE mount).
 */
export async function stopChild(child: ChildProcess, options: { signal?: NodeJS.Signals; graceMs?: number; what?: string } = {}): Promise<ChildExit> {
  const what = options.what ?? `process ${child.pid}`;
  if (child.exitCode !== null || child.signalCode !== null) return { code: child.exitCode, signal: child.signalCode };
  child.kill(options.signal ?? 'SIGTERM');
  try {
    return await waitForExit(child, options.graceMs ?? 15_000, what);
  } catch {
    child.kill('SIGKILL');
    return waitForExit(child, 10_000, `${what} (after SIGKILL)`);
  }
}

/** Whether the PID is a process that still runs (a zombie has ended; only its parent's reaping is left). */
async function running(pid: number): Promise<boolean> {
  if (!processAlive(pid)) return false;
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  return stat !== undefined && stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
}

/** Poll until no process runs with this PID (for processes that are not our children); false after `timeoutMs`. */
export async function waitPidGone(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (await running(pid)) {
    if (Date.now() > deadline) return false;
    await sleep(50);
  }
  return true;
}

/** Signal each PID and wait until all are gone; rejects naming those still there after `timeoutMs`. */
export async function signalAndWait(pids: number[], signal: NodeJS.Signals, timeoutMs: number): Promise<void> {
  for (const pid of pids) {
    try { process.kill(pid, signal); } catch { /* already gone */ }
  }
  const left: number[] = [];
  for (const pid of pids) if (!(await waitPidGone(pid, timeoutMs))) left.push(pid);
  if (left.length > 0) throw new Error(`processes ${left.join(', ')} still alive ${timeoutMs} ms after ${signal}`);
}
