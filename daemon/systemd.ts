/**
 * sd_notify for Type=notify units, sent by the daemon itself: one datagram
 * of `NAME=value` lines to $NOTIFY_SOCKET (a path, or '@name' in the
 * abstract namespace) through common/sys/unixDatagram.ts. Being sent from
 * the main process, the unit needs only NotifyAccess=main.
 */
import { type Logger } from '../common/log.js';
import { UnixDatagramSender } from '../common/sys/unixDatagram.js';

export interface DaemonCounts {
  images: number;
  containers: number;
  mounts: number;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** The STATUS= line `systemctl status layerd` shows. */
export function statusLine(socket: string, counts: DaemonCounts): string {
  return `serving ${socket}: ${plural(counts.images, 'image')}, ${plural(counts.containers, 'container')}, ${plural(counts.mounts, 'mount')}`;
}

export class SystemdNotifier {
  private constructor(private readonly socket: string, private readonly logger: Logger) {}

  /**
   * The notifier for $NOTIFY_SOCKET, or undefined when systemd did not ask
   * for notifications. The variable is taken out of the environment, so
   * the processes the daemon starts (mount hosts) do not inherit it and
   * cannot speak for the service.
   */
  static fromEnvironment(logger: Logger, env: NodeJS.ProcessEnv = process.env): SystemdNotifier | undefined {
    const socket = env['NOTIFY_SOCKET'];
    delete env['NOTIFY_SOCKET'];
    if (!socket) return undefined;
    if (!socket.startsWith('/') && !socket.startsWith('@')) {
      logger.warn('NOTIFY_SOCKET is not a Unix socket path or abstract name: systemd is not notified', { socket });
      return undefined;
    }
    return new SystemdNotifier(socket, logger);
  }

  /** Send `state` (e.g. { READY: '1', STATUS: '…' }); a failure is logged, never thrown. */
  notify(state: Readonly<Record<string, string>>): void {
    const message = Object.entries(state).map(([name, value]) => `${name}=${value.replace(/\n/g, ' ')}`).join('\n');
    let sender: UnixDatagramSender | undefined;
    try {
      sender = new UnixDatagramSender();
      sender.send(this.socket, Buffer.from(message));
    } catch (err) {
      this.logger.warn('could not notify systemd', { socket: this.socket, error: (err as Error).message });
    } finally {
      sender?.close();
    }
  }
}
