/**
 * Finding mounts in /proc/self/mountinfo, and clearing a dead FUSE mount:
 * one whose server is gone or hung, so every access fails with ENOTCONN (or
 * blocks). Clearing = abort the FUSE connection through fusectl
 * (`/sys/fs/fuse/connections/<minor>/abort`, minor = the mount's device
 * minor) so nothing blocks on it any more, then detach it with `umount -l`.
 * Safe to call from any process except the one serving the mount.
 */
import { execFile } from 'node:child_process';
import { access, readFile, statfs, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { isWithin } from './paths.js';

export interface MountInfoEntry {
  mountpoint: string;
  major: number;
  minor: number;
  fstype: string;
  source: string;
}

const FUSECTL = '/sys/fs/fuse/connections';

function unescapeMountinfo(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

export function parseMountinfo(text: string): MountInfoEntry[] {
  const entries: MountInfoEntry[] = [];
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    const dash = fields.indexOf('-');
    if (fields.length < 10 || dash < 6) continue;
    const [major, minor] = fields[2]!.split(':').map(Number);
    entries.push({
      mountpoint: unescapeMountinfo(fields[4]!), major: major!, minor: minor!,
      fstype: fields[dash + 1]!, source: unescapeMountinfo(fields[dash + 2] ?? ''),
    });
  }
  return entries;
}

/** The topmost mount at `mountpoint`, if any. */
export async function findMount(mountpoint: string): Promise<MountInfoEntry | undefined> {
  const target = resolve(mountpoint);
  const entries = parseMountinfo(await readFile('/proc/self/mountinfo', 'utf8'));
  return entries.filter((e) => e.mountpoint === target).pop();
}

/**
 * True if `mountpoint` is a mount whose statfs fails with ENOTCONN or does
 * not answer in time. statfs, not stat: the kernel may answer a stat from
 * its attribute cache long after the server died; statfs always asks.
 */
export async function isDeadMount(mountpoint: string, timeoutMs = 2000): Promise<boolean> {
  if ((await findMount(mountpoint)) === undefined) return false;
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((done) => { timer = setTimeout(() => done(true), timeoutMs); });
  const probed = statfs(mountpoint).then(() => false, (err: NodeJS.ErrnoException) => err.code === 'ENOTCONN');
  try {
    return await Promise.race([probed, timedOut]);
  } finally {
    clearTimeout(timer);
  }
}

function run(command: string, args: string[]): Promise<void> {
  return new Promise((done, fail) => execFile(command, args, (err, _out, stderr) => (err ? fail(new Error(`${command} ${args.join(' ')}: ${stderr.trim() || err.message}`)) : done())));
}

/** Mount fusectl if the system has not; returns whether we did (and so should unmount it). */
async function ensureFusectl(): Promise<boolean> {
  const mounted = parseMountinfo(await readFile('/proc/self/mountinfo', 'utf8')).some((e) => e.fstype === 'fusectl');
  if (mounted) return false;
  return run('mount', ['-t', 'fusectl', 'fusectl', FUSECTL]).then(() => true, () => false);
}

/** Abort the FUSE connection behind `mountpoint` (if it is FUSE) and lazily unmount it. */
export async function clearDeadMount(mountpoint: string): Promise<boolean> {
  const mount = await findMount(mountpoint);
  if (mount === undefined) return false;
  if (mount.fstype === 'fuse' || mount.fstype.startsWith('fuse.')) {
    const mountedFusectl = await ensureFusectl();
    const abort = `${FUSECTL}/${mount.minor}/abort`;
    if (await access(abort).then(() => true, () => false)) await writeFile(abort, '1').catch(() => undefined);
    if (mountedFusectl) await run('umount', [FUSECTL]).catch(() => undefined);
  }
  await run('umount', ['-l', resolve(mountpoint)]);
  return true;
}

/**
 * Clear (abort + lazy unmount) every mount at or below `dir`, innermost
 * first; returns how many there were. For tests and benchmarks, which must
 * never leave a mount behind, whatever failed.
 */
export async function clearMountsUnder(dir: string): Promise<number> {
  const root = resolve(dir);
  const entries = parseMountinfo(await readFile('/proc/self/mountinfo', 'utf8')).filter((e) => isWithin(e.mountpoint, root));
  for (const e of entries.reverse()) await clearDeadMount(e.mountpoint).catch(() => undefined);
  return entries.length;
}
