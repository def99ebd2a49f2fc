/**
 * On which CPU the kernel wakes the other side of a FUSE round trip.
 *
 * Every synchronous FUSE request is two wake-ups: the caller queues it and
 * wakes the server, the server answers and wakes the caller. By default
 * the woken task runs on the CPU it last ran on, so on a machine with idle
 * CPUs each wake-up is an inter-processor interrupt, and on a virtual
 * machine that interrupt costs more than serving the request (measured
 * with perf on the 2-CPU machines layerd is built on: 40 % of the server's
 * samples in `__wake_up` and `finish_task_switch`).
 *
 * The kernel layerd runs on (6.18.44-fc, fuse module parameter `wake_here`,
 * undocumented; its symbol `fuse_wakes_here` sits beside the scheduler's
 * `__wake_up_on_current_cpu`) wakes the other side on the waking CPU
 * instead: caller and server then take turns on one CPU, as a function
 * call would. Measured in two runs of bench/mount.ts on a quiet machine,
 * one each way (the setting is the host's, so it cannot be interleaved):
 * create 10k files 5.3 → 1.7 s, untar 3.6 → 0.9 s, read-all warm 0.72 →
 * 0.30 s (docs/performance.md). It changes where a woken task runs, not
 * what a request does or when it is answered.
 *
 * The parameter is the host's, shared by every FUSE filesystem on it, so
 * turning it on is a host setting, as the sysctls kubelet sets are: the
 * daemon turns it on once when it starts (a standalone `layerd mount`, when
 * it mounts), says so in its log, and never turns it off (other mounts may
 * rely on it by then); its mount hosts leave it alone, so an admin who turns
 * it off by hand is not overruled until the daemon starts again.
 * LAYERD_FUSE_WAKE_HERE=0 leaves it as found. Kernels without the
 * parameter, and read-only /sys (a container), are left alone.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { errnoNameOf } from '../common/sys/errors.js';
import type { Logger } from '../common/log.js';

export const WAKE_HERE_PARAMETER = '/sys/module/fuse/parameters/wake_here';

/**
 * Where this process looks for the parameter: WAKE_HERE_PARAMETER, or
 * LAYERD_FUSE_WAKE_HERE_FILE (tests give their processes a file of their
 * own, so test runs side by side never see each other's host setting).
 */
export function wakeHereParameter(): string {
  return process.env['LAYERD_FUSE_WAKE_HERE_FILE'] || WAKE_HERE_PARAMETER;
}

/**
 * What was found and done: 'absent' (no such parameter), 'on' (found on),
 * 'turned-on', 'left-off' (LAYERD_FUSE_WAKE_HERE=0), 'refused' (could not
 * be written: no root, read-only /sys).
 */
export type WakeHereState = 'absent' | 'on' | 'turned-on' | 'left-off' | 'refused';

export interface WakeHereOptions {
  /** The parameter's file (tests point it elsewhere). */
  path?: string;
  /** Whether to turn it on (default: unless the environment has LAYERD_FUSE_WAKE_HERE=0). */
  enable?: boolean;
  logger?: Logger;
}

/** Read the parameter and turn it on where wanted; never throws. */
export async function preferWakeupsHere(options: WakeHereOptions = {}): Promise<WakeHereState> {
  const path = options.path ?? wakeHereParameter();
  const enable = options.enable ?? process.env['LAYERD_FUSE_WAKE_HERE'] !== '0';
  let value: string;
  try {
    value = (await readFile(path, 'utf8')).trim();
  } catch (err) {
    if (errnoNameOf(err) !== 'ENOENT') options.logger?.debug('fuse wake_here unreadable', { path, error: String(err) });
    return 'absent';
  }
  if (value === 'Y' || value === '1') return 'on';
  if (!enable) return 'left-off';
  try {
    await writeFile(path, 'Y\n');
  } catch (err) {
    options.logger?.info('fuse wake_here left off: it cannot be written', { path, error: errnoNameOf(err) ?? String(err) });
    return 'refused';
  }
  options.logger?.info('FUSE wake-ups now run on the waking CPU (fuse module parameter wake_here=Y, for the whole host; LAYERD_FUSE_WAKE_HERE=0 leaves it as found)', { path });
  return 'turned-on';
}

let once: Promise<WakeHereState> | undefined;

/** preferWakeupsHere with the host's parameter, once per process. */
export function preferWakeupsHereOnce(logger?: Logger): Promise<WakeHereState> {
  once ??= preferWakeupsHere(logger ? { logger } : {});
  return once;
}
