/**
 * Aborting a FUSE connection from outside, as an admin clearing a hung
 * mount does (`echo 1 > /sys/fs/fuse/connections/N/abort`): the mount stays
 * in the mount table, every access fails with ENOTCONN, and its server sees
 * the connection end while it keeps running.
 */
import { execFile } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import { findMount } from '../../mount/deadMount.js';

const run = promisify(execFile);
const CONNECTIONS = '/sys/fs/fuse/connections';

export async function abortFuseConnection(mountpoint: string): Promise<void> {
  const entry = await findMount(mountpoint);
  if (entry === undefined || !entry.fstype.startsWith('fuse')) throw new Error(`${mountpoint} is not a FUSE mount`);
  // fusectl is mounted for the abort only if nobody had (and unmounted again).
  const mounted = (await readFile('/proc/self/mountinfo', 'utf8')).includes(' - fusectl ');
  if (!mounted) await run('mount', ['-t', 'fusectl', 'fusectl', CONNECTIONS]);
  try {
    await writeFile(`${CONNECTIONS}/${entry.minor}/abort`, '1');
  } finally {
    if (!mounted) await run('umount', [CONNECTIONS]);
  }
}
