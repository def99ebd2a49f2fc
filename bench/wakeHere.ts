/**
 * The host's FUSE wake-up setting for one bench run (mount/fuseWakeups.ts).
 * It is one setting for the whole host, so a run cannot interleave both
 * ways: `--fuse-wake-here on|off|as-is` picks it for the run (default on,
 * what the daemon sets when it starts), every FUSE implementation of the run
 * (layerd and fuse-overlayfs alike) runs with it, the report says which,
 * and the value found is put back at the end.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { WAKE_HERE_PARAMETER } from '../mount/fuseWakeups.js';
import { argOf } from './report.js';

export interface WakeHereRun {
  /** For the report: what the run ran with. */
  readonly note: string;
  /** Put the value found back. */
  restore(): Promise<void>;
}

async function current(): Promise<string | undefined> {
  return readFile(WAKE_HERE_PARAMETER, 'utf8').then((v) => v.trim(), () => undefined);
}

/** Apply `--fuse-wake-here` (sets LAYERD_FUSE_WAKE_HERE=0 for the layerd processes of an `off` run). */
export async function fuseWakeHereForRun(): Promise<WakeHereRun> {
  const wanted = argOf('--fuse-wake-here', 'on');
  if (!['on', 'off', 'as-is'].includes(wanted)) throw new Error('--fuse-wake-here must be on, off or as-is');
  const found = await current();
  if (found === undefined) return { note: 'FUSE wake_here: this kernel has no such parameter.', restore: async () => undefined };
  if (wanted !== 'as-is') {
    await writeFile(WAKE_HERE_PARAMETER, wanted === 'on' ? 'Y\n' : 'N\n');
    if (wanted === 'off') process.env['LAYERD_FUSE_WAKE_HERE'] = '0';
  }
  const during = await current();
  return {
    note: `FUSE wake_here (host setting, mount/fuseWakeups.ts; \`--fuse-wake-here\`): ${during === 'Y' ? 'on' : 'off'} for every FUSE implementation of this run.`,
    restore: async () => { await writeFile(WAKE_HERE_PARAMETER, `${found}\n`).catch(() => undefined); },
  };
}
