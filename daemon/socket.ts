/**
 * The API socket: created with the permissions that decide who may talk to
 * the daemon (root and the socket's group), and never stolen from a live
 * daemon: a socket file that still answers means another layerd runs.
 */
import { execFile } from 'node:child_process';
import { connect } from 'node:net';
import { chmod, chown, mkdir, unlink } from 'node:fs/promises';
import { dirname } from 'node:path';
import { promisify } from 'node:util';
import { ErrorCodes, LayerdError, errnoCode } from '../common/errors.js';

const run = promisify(execFile);

/** Remove a stale socket file; refuse if a live daemon still answers on it. */
export async function claimSocketPath(path: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o755 });
  const alive = await new Promise<boolean>((resolve) => {
    const s = connect(path);
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
  if (alive) throw new LayerdError(ErrorCodes.EBUSY, `another layerd is listening on ${path}`, { socket: path });
  await unlink(path).catch((err: unknown) => {
    if (errnoCode(err) !== 'ENOENT') throw err;
  });
}

/** Mode 0660 owned by root and `group` (a name or gid), so only they may connect. */
export async function secureSocket(path: string, mode: number, group: string | number | undefined): Promise<void> {
  await chmod(path, mode);
  if (group === undefined) return;
  const gid = typeof group === 'number' ? group : await groupId(group);
  await chown(path, 0, gid);
}

async function groupId(name: string): Promise<number> {
  if (/^\d+$/.test(name)) return Number(name);
  try {
    const { stdout } = await run('getent', ['group', name]);
    const gid = Number(stdout.split(':')[2]);
    if (Number.isInteger(gid)) return gid;
  } catch {
    // fall through
  }
  throw new LayerdError(ErrorCodes.EINVAL, `unknown group '${name}' for the API socket`, { group: name });
}
