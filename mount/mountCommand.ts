/**
 * `layerd mount --lower DIR[:DIR...] --upper DIR MOUNTPOINT`: serve a union
 * of plain directories in the foreground. As with overlayfs, the leftmost
 * lower directory is the top layer. Prints `ready <mountpoint>` on stdout
 * once the mount is live; unmounts and exits 0 on SIGTERM/SIGINT, and exits
 * 0 when someone else unmounts it. Meant to run as its own process (the
 * daemon spawns it), never inside a process that uses the mount.
 */
import { Command, CommanderError } from 'commander';
import { pathToFileURL } from 'node:url';
import { createLogger } from '../common/log.js';
import { exitStatusFor, isLayerdError } from '../common/errors.js';
import { lowerDirSource } from './lowerDir.js';
import { mountUnion } from './mountUnion.js';

export { mountUnion, type MountUnionOptions, type MountedUnion } from './mountUnion.js';
export { clearDeadMount, isDeadMount, findMount } from './deadMount.js';

interface MountArgs { lower: string; upper: string; readOnly?: boolean; debug?: boolean }

export async function mountCommand(argv: string[]): Promise<number> {
  const program = new Command('layerd mount')
    .description('serve a union of directories with FUSE (leftmost lower = top layer)')
    .requiredOption('--lower <dirs>', 'lower directories, colon-separated, top first')
    .requiredOption('--upper <dir>', 'writable upper directory (receives an OCI changeset)')
    .option('--read-only', 'refuse all changes')
    .option('--debug', 'log every FUSE request (libfuse debug)')
    .argument('<mountpoint>')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  try {
    program.parse(argv, { from: 'user' });
  } catch (err) {
    return err instanceof CommanderError && err.exitCode === 0 ? 0 : 2;
  }
  const args = program.opts<MountArgs>();
  const mountpoint = program.args[0]!;
  const logger = createLogger({ component: 'mount', level: args.debug ? 'debug' : undefined });

  try {
    const lowers = args.lower.split(':').filter((d) => d !== '');
    const layers = await Promise.all(lowers.reverse().map((dir, i) => lowerDirSource(dir, `lower${i}:${dir}`)));
    const mounted = await mountUnion({ layers, upper: args.upper, mountpoint, readOnly: args.readOnly ?? false, logger });
    process.stdout.write(`ready ${mounted.mountpoint}\n`);

    const stop = (): void => { void mounted.unmount(); };
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
    await mounted.gone;
    await mounted.unmount();
    process.off('SIGTERM', stop);
    process.off('SIGINT', stop);
    return 0;
  } catch (err) {
    logger.error(err instanceof Error ? err.message : String(err), isLayerdError(err) ? { code: err.code, ...err.context } : {});
    return isLayerdError(err) ? exitStatusFor(err.code) : 1;
  }
}

// Direct entry (`node dist/mount/mountCommand.js ...`) until bin/layerd dispatches here.
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  mountCommand(process.argv.slice(2)).then((code) => process.exit(code), () => process.exit(1));
}
