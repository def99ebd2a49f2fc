/**
 * `layerd`: run the daemon in the foreground; `layerd mount-host …` is the
 * process the daemon starts to serve the mounts of one image, and
 * `layerd mount …` serves one union mount in the foreground.
 */
import { Command } from 'commander';
import { resolve } from 'node:path';
import { asLayerdError, exitStatusFor } from '../common/errors.js';
import { type LogLevel, createLogger } from '../common/log.js';
import { resolveRoot } from '../storage/layout.js';
import { DEFAULT_CONFIG_PATH, DEFAULT_SOCKET, loadConfig } from './config.js';
import { Daemon } from './daemon.js';
import { SystemdNotifier } from './systemd.js';

interface DaemonFlags {
  root?: string;
  socket?: string;
  config?: string;
  socketGroup?: string;
  logLevel?: LogLevel;
  mountRoot?: string;
  unmountOnStop?: boolean;
  snapshotterSocket?: string;
  containerdSocket?: string;
}

async function runDaemon(flags: DaemonFlags): Promise<number> {
  const configPath = flags.config ?? process.env['LAYERD_CONFIG'] ?? DEFAULT_CONFIG_PATH;
  const config = await loadConfig(configPath, flags.config !== undefined);
  const logger = createLogger({ level: flags.logLevel ?? config.logLevel ?? 'info', component: 'layerd', json: !process.stderr.isTTY });
  const root = flags.root ?? config.root ?? resolveRoot();
  const socket = flags.socket ?? process.env['LAYERD_SOCKET'] ?? config.socket ?? DEFAULT_SOCKET;
  const group = flags.socketGroup ?? config.socketGroup;
  const notifier = SystemdNotifier.fromEnvironment(logger);
  // Handlers first: the API answers before start() has returned, and a
  // SIGTERM in that window must stop the daemon gracefully, not kill it.
  let early: string | undefined;
  let onSignal = (signal: string): void => { early ??= signal; };
  process.once('SIGTERM', () => onSignal('SIGTERM'));
  process.once('SIGINT', () => onSignal('SIGINT'));
  const daemon = await Daemon.start({
    root, socket, config, configPath, logger, ...(group !== undefined ? { socketGroup: group } : {}),
    ...(flags.mountRoot ? { mountRoot: flags.mountRoot } : {}), unmountOnStop: flags.unmountOnStop === true,
    ...(flags.snapshotterSocket !== undefined ? { snapshotterSocket: flags.snapshotterSocket } : {}),
    ...(flags.containerdSocket !== undefined ? { containerdSocket: flags.containerdSocket === 'none' ? 'none' : resolve(flags.containerdSocket) } : {}),
    ...(notifier ? { notifier } : {}),
  });
  await new Promise<void>((resolve) => {
    const stop = (signal: string): void => {
      logger.info('signal received', { signal });
      daemon.stop().then(resolve, (err: unknown) => { logger.error('stop failed', { error: String(err) }); resolve(); });
    };
    if (early !== undefined) stop(early);
    else onSignal = stop;
  });
  return 0;
}

export async function main(argv: string[]): Promise<number> {
  if (argv[2] === 'mount-host') {
    const { mountHostCommand } = await import('../mount/mountHost.js');
    process.exit(await mountHostCommand(argv.slice(3)));
  }
  if (argv[2] === 'mount') {
    const { mountCommand } = await import('../mount/mountCommand.js');
    // Exit explicitly once the mount is gone, rather than rely on every
    // handle having closed.
    process.exit(await mountCommand(argv.slice(3)));
  }
  const program = new Command('layerd')
    .description('layerd: the union-filesystem layer daemon (runs in the foreground)')
    .option('--root <dir>', 'store root (default $LAYERD_ROOT or /var/lib/layerd)')
    .option('--socket <path>', `API socket (default $LAYERD_SOCKET or ${DEFAULT_SOCKET})`)
    .option('--config <file>', `configuration file (default ${DEFAULT_CONFIG_PATH})`)
    .option('--socket-group <group>', 'group allowed to use the socket besides root')
    .option('--log-level <level>', 'error, warn, info or debug')
    .option('--mount-root <dir>', 'where containers are mounted by default (default /run/layerd/mounts)')
    .option('--unmount-on-stop', 'unmount every container on SIGTERM (default: mounts keep being served)')
    .option('--snapshotter-socket <path>', 'containerd proxy snapshotter socket (default: snapshotter.sock beside the API socket, /run/layerd/snapshotter.sock; "none": off)')
    .option('--containerd-socket <path>', 'containerd\'s socket, whose content store holds the original blobs of the layers it unpacks into layerd (default: config containerdSocket, else /run/containerd/containerd.sock; "none": not asked)')
    .addHelpText('after', '\nAlso: layerd mount --help   serve one union mount in the foreground')
    .exitOverride();
  try {
    program.parse(argv);
    return await runDaemon(program.opts<DaemonFlags>());
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (typeof code === 'string' && code.startsWith('commander.')) {
      return code === 'commander.helpDisplayed' || code === 'commander.help' ? 0 : 2;
    }
    const e = asLayerdError(err);
    process.stderr.write(`layerd: ${e.code}: ${e.message}\n`);
    return exitStatusFor(e.code);
  }
}
