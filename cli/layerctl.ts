/**
 * `layerctl`: the admin and developer CLI. Every listing takes `--json`;
 * exit codes follow the error codes (common/errors.ts exitStatusFor) so
 * scripts can trust them.
 */
import { Command, Option } from 'commander';
import { ErrorCodes, LayerdError, asLayerdError, exitStatusFor } from '../common/errors.js';
import { existsSync } from 'node:fs';
import { resolve as resolvePath } from 'node:path';
import { type Logger, createLogger } from '../common/log.js';
import { DEFAULT_SOCKET } from '../daemon/config.js';
import { resolveRoot } from '../storage/layout.js';
import { type Backend } from './backend.js';
import { humanSize, short, table } from './format.js';
import { openOfflineBackend } from './offline.js';
import { LayerProgress } from './progress.js';
import { socketBackend } from './socketBackend.js';

interface GlobalOptions {
  root?: string;
  socket?: string;
  json?: boolean;
  logLevel?: string;
}

function print(text: string): void {
  process.stdout.write(text);
}

function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

/**
 * --socket (or $LAYERD_SOCKET) → the daemon; --root → the store directly;
 * neither → the daemon's default socket if present, else the default root.
 */
async function chooseBackend(opts: GlobalOptions, logger: Logger): Promise<Backend> {
  if (opts.socket && opts.root) throw new LayerdError(ErrorCodes.EINVAL, 'give --socket or --root, not both');
  const socket = opts.socket ?? (opts.root ? undefined : process.env['LAYERD_SOCKET']);
  if (socket) return socketBackend(socket);
  if (!opts.root && !process.env['LAYERD_ROOT'] && existsSync(DEFAULT_SOCKET)) return socketBackend(DEFAULT_SOCKET);
  return openOfflineBackend(resolveRoot(opts.root), logger);
}

export function buildProgram(): Command {
  const program = new Command('layerctl')
    .description('Drive layerd: import, inspect and manage container image layers')
    .option('--socket <path>', `talk to the layerd daemon on PATH (default $LAYERD_SOCKET, else ${DEFAULT_SOCKET} if it exists)`)
    .option('--root <dir>', 'work on the store under DIR directly, without a daemon (offline mode; default $LAYERD_ROOT or /var/lib/layerd)')
    .option('--log-level <level>', 'error, warn, info or debug', 'warn')
    .showHelpAfterError()
    .exitOverride();

  const withBackend = async <T>(cmd: Command, fn: (backend: Backend, opts: GlobalOptions) => Promise<T>): Promise<T> => {
    const opts = cmd.optsWithGlobals<GlobalOptions>();
    const logger = createLogger({ level: (opts.logLevel ?? 'warn') as 'warn', component: 'layerctl' });
    const backend = await chooseBackend(opts, logger);
    try {
      return await fn(backend, opts);
    } finally {
      await backend.close();
    }
  };

  program.command('import')
    .description('import an OCI layout, OCI archive, docker-save archive or raw layer tar')
    .argument('<path>', 'what to import')
    .option('--name <name>', 'image NAME (default: the base name of PATH)')
    .option('--platform <os/arch[/variant]>', 'platform to select from image indexes (default: this host)')
    .addOption(new Option('--format <format>', 'do not detect the format').choices(['oci-layout', 'oci-archive', 'docker-archive', 'layer']))
    .option('--json', 'print the result as JSON')
    .action(async (path: string, opts: { name?: string; platform?: string; format?: 'oci-layout'; json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const progress = new LayerProgress();
        const result = await backend.importPath(
          { path: resolvePath(path), ...(opts.name ? { name: opts.name } : {}), ...(opts.platform ? { platform: opts.platform } : {}), ...(opts.format ? { format: opts.format } : {}) },
          progress.enabled ? progress.update : undefined,
        );
        if (opts.json) return printJson(result);
        for (const img of result) {
          print(`imported ${img.id} (${img.platform}, ${img.layers} layers)${img.refs.length ? ' as ' + img.refs.join(', ') : ''}\n`);
        }
      });
    });

  program.command('images')
    .description('list images')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const images = await backend.images();
        if (opts.json) return printJson(images);
        print(table(['REFERENCE', 'IMAGE ID', 'PLATFORM', 'LAYERS', 'SIZE'], images.flatMap((i) =>
          (i.refs.length ? i.refs : ['<none>']).map((r) => [r, short(i.id), i.platform, String(i.layers), humanSize(i.size)]))));
      });
    });

  program.command('layers')
    .description('list the layers in the store')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const layers = await backend.layers();
        if (opts.json) return printJson(layers);
        print(table(['DIFF ID', 'ENTRIES', 'SIZE', 'BLOBS', 'USED BY'], layers.map((l) =>
          [short(l.diffId), String(l.entries), humanSize(l.size), l.blobs.map(short).join(',') || '-', String(l.usedBy)])));
      });
    });

  program.command('inspect')
    .description('show an image: config, platform, layers with both digests, history')
    .argument('<image>', 'NAME[:TAG], digest or digest prefix')
    .addOption(new Option('--format <format>', 'output format').choices(['json', 'table']).default('json'))
    .option('--json', 'same as --format json')
    .action(async (ref: string, opts: { format: 'json' | 'table'; json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const info = await backend.inspect(ref);
        if (opts.format === 'json' || opts.json) return printJson(info);
        print(`Id:        ${info.Id}\nTags:      ${info.RepoTags.join(', ') || '<none>'}\nPlatform:  ${info.Platform}\n` +
          `Created:   ${info.Created ?? '-'}\nSize:      ${humanSize(info.Size)} (${humanSize(info.CompressedSize)} compressed)\n\n`);
        print(table(['#', 'DIFF ID', 'BLOB', 'COMPRESSED', 'SIZE', 'ENTRIES'], info.Layers.map((l) =>
          [String(l.position), short(l.diffId), l.digest ? short(l.digest) : '-', humanSize(l.size), humanSize(l.uncompressedSize), String(l.entries)])));
      });
    });

  program.command('tag')
    .description('give an image another NAME:TAG')
    .argument('<source>', 'image')
    .argument('<target>', 'NAME[:TAG]')
    .option('--json', 'print JSON')
    .action(async (source: string, target: string, opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const r = await backend.tag(source, target);
        if (opts.json) return printJson(r);
        print(`tagged ${short(r.id)} as ${r.ref}\n`);
      });
    });

  program.command('rmi')
    .description('remove images (by tag: untag; the image goes with its last tag) and collect unused layers')
    .argument('<images...>', 'images')
    .option('-f, --force', 'remove an image by digest even if it has several tags')
    .option('--json', 'print JSON')
    .action(async (refs: string[], opts: { force?: boolean; json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const results = [];
        for (const ref of refs) results.push(await backend.removeImage(ref, opts.force === true));
        if (opts.json) return printJson(results);
        for (const r of results) {
          for (const t of r.untagged) print(`Untagged: ${t}\n`);
          for (const d of r.deleted) print(`Deleted: ${d}\n`);
          for (const l of r.gc.layers) print(`Deleted layer: ${l}\n`);
        }
      });
    });

  program.command('prune')
    .description('remove untagged images and all content no image uses')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const r = await backend.prune();
        if (opts.json) return printJson(r);
        print(`removed ${r.images.length} images, ${r.gc.layers.length} layers, ${r.gc.blobs.length} blobs; reclaimed ${humanSize(r.gc.bytes)}\n`);
      });
    });

  program.command('fsck')
    .description('re-verify every blob and layer digest and every record; exit 7 on problems')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const report = await backend.fsck();
        if (opts.json) printJson(report);
        else {
          print(`checked ${report.checked.blobs} blobs, ${report.checked.layers} layers, ${report.checked.files} files, ${report.checked.images} images\n`);
          for (const p of report.problems) print(`${p.kind} ${p.id}: ${p.message}\n`);
          print(report.ok ? 'store is consistent\n' : `${report.problems.length} problems\n`);
        }
        if (!report.ok) throw new LayerdError(ErrorCodes.ECORRUPT, `fsck found ${report.problems.length} problems`);
      });
    });

  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (typeof code === 'string' && code.startsWith('commander.')) {
      // commander has printed its message already
      return code === 'commander.helpDisplayed' || code === 'commander.version' || code === 'commander.help' ? 0 : 2;
    }
    const e = asLayerdError(err);
    process.stderr.write(`layerctl: ${e.code}: ${e.message}\n`);
    return exitStatusFor(e.code);
  }
}
