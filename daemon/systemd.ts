/**
 * sd_notify for Type=notify units. Node has no datagram Unix sockets, so the
 * message goes through systemd's own `systemd-notify` (the unit sets
 * NotifyAccess=all so systemd accepts it from that helper process).
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { type Logger } from '../common/log.js';

const run = promisify(execFile);

export async function notifySystemd(message: string, logger: Logger): Promise<void> {
  if (!process.env['NOTIFY_SOCKET']) return;
  try {
    await run('systemd-notify', [`--pid=${process.pid}`, ...message.split('\n')]);
  } catch (err) {
    logger.warn('could not notify systemd', { error: (err as Error).message });
  }
}
