/**
 * `layerctl`: the admin and developer CLI. Every listing takes `--json`;
 * exit codes follow the error codes (common/errors.ts exitStatusFor) so
 * scripts can trust them.
 */
import { Command, Option } from 'commander';
import { ErrorCodes, LayerdError, asLayerdError, exitStatusFor } from '../common/errors.js';
import { createWriteStream, existsSync } from 'node:fs';
import { resolve as resolvePath } from 'node:path';
import { writeFile } from 'node:fs/promises';
import { type Logger, createLogger } from '../common/log.js';
import { DEFAULT_SOCKET } from '../daemon/config.js';
import { DEFAULT_ROOT, StoreLayout, resolveRoot } from '../storage/layout.js';
import { type Backend, type ContainerBackend } from './backend.js';
import { humanSize, short, table } from './format.js';
import { layerLabel } from '../storage/analysis.js';
import { openOfflineBackend } from './offline.js';
import { LayerProgress } from './progress.js';
import { DaemonClient, socketBackend } from './socketBackend.js';
import { offlineStore, registerRegistryCommands } from './registryCommands.js';

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
function daemonSocket(opts: GlobalOptions): string | undefined {
  if (opts.socket && opts.root) throw new LayerdError(ErrorCodes.EINVAL, 'give --socket or --root, not both');
  const socket = opts.socket ?? (opts.root ? undefined : process.env['LAYERD_SOCKET']);
  if (socket) return socket;
  if (!opts.root && !process.env['LAYERD_ROOT'] && existsSync(DEFAULT_SOCKET)) return DEFAULT_SOCKET;
  return undefined;
}

async function chooseBackend(opts: GlobalOptions, logger: Logger): Promise<Backend> {
  const socket = daemonSocket(opts);
  if (socket) return socketBackend(socket);
  // Nothing named and no daemon: a store already at the default root may be
  // used offline, but never a new empty one made there without being asked.
  if (!opts.root && !process.env['LAYERD_ROOT'] && !existsSync(new StoreLayout(DEFAULT_ROOT).metadataDb)) {
    throw new LayerdError(
      ErrorCodes.ENOTFOUND,
      `no layerd daemon found (no socket at ${DEFAULT_SOCKET}, $LAYERD_SOCKET not set) and no store at ${DEFAULT_ROOT}: `
        + 'point at a daemon with --socket PATH (or $LAYERD_SOCKET), or at a store with --root DIR (or $LAYERD_ROOT)',
      { socket: DEFAULT_SOCKET, root: DEFAULT_ROOT },
    );
  }
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
        print(table(['REFERENCE', 'IMAGE ID', 'PLATFORM', 'LAYERS', 'SIZE', 'STATE'], images.flatMap((i) =>
          (i.refs.length ? i.refs : ['<none>']).map((r) => [r, short(i.id), i.platform, String(i.layers), humanSize(i.size), i.state]))));
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

  program.command('df')
    .description('bytes stored, and how much images and snapshots share')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const u = await backend.diskUsage();
        if (opts.json) return printJson(u);
        print(`stored: ${humanSize(u.storedBytes)} (layers ${humanSize(u.layers.bytes)} in ${u.layers.count}`
          + `${u.layers.skeletons > 0 ? `, ${u.layers.skeletons} of them as skeletons` : ''}, `
          + `compressed blobs kept for pushes ${humanSize(u.blobs.bytes)} in ${u.blobs.count}, `
          + `files by content ${humanSize(u.objects.bytes)} in ${u.objects.count})\n`);
        if (u.objects.savedByDedup > 0) print(`files the same in several layers are kept once: saves ${humanSize(u.objects.savedByDedup)}\n`);
        print(`used by ${u.images.length} images and ${u.snapshots.count} containerd snapshots: ${humanSize(u.referencedBytes)} `
          + `if each kept its own layers; storing each layer once saves ${humanSize(u.savedBySharing)}\n`);
        if (u.layers.unused > 0) print(`${u.layers.unused} layers (${humanSize(u.layers.unusedBytes)}) used by nothing: \`layerctl prune\` frees them\n`);
        if (u.images.length === 0) return;
        print('\n' + table(['REFERENCE', 'IMAGE ID', 'LAYERS', 'SIZE', 'SHARED', 'UNIQUE'], u.images.flatMap((i) =>
          (i.refs.length ? i.refs : ['<none>']).map((r) => [r, short(i.id), String(i.layers), humanSize(i.size), humanSize(i.shared), humanSize(i.unique)]))));
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
        print(table(['#', 'DIFF ID', 'BLOB', 'COMPRESSED', 'SIZE', 'ENTRIES', 'STATE'], info.Layers.map((l) =>
          [String(l.position), short(l.diffId), l.digest ? short(l.digest) : '-', humanSize(l.size), humanSize(l.uncompressedSize), String(l.entries), l.state === 'filling' ? `filling ${l.filled ?? 0} %` : l.state])));
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
        print(`removed ${r.images.length} images, ${r.gc.layers.length} layers, ${r.gc.blobs.length} blobs, ${r.gc.objects} file objects; reclaimed ${humanSize(r.gc.bytes)}\n`);
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
          print(`checked ${report.checked.blobs} blobs, ${report.checked.layers} layers, ${report.checked.files} files, ${report.checked.images} images, ${report.checked.objects} file objects\n`);
          for (const p of report.problems) print(`${p.kind} ${p.id}: ${p.message}\n`);
          print(report.ok ? 'store is consistent\n' : `${report.problems.length} problems\n`);
        }
        if (!report.ok) throw new LayerdError(ErrorCodes.ECORRUPT, `fsck found ${report.problems.length} problems`);
      });
    });

  const needDaemon = (backend: Backend): ContainerBackend => {
    if (!backend.containers) {
      throw new LayerdError(ErrorCodes.EUNSUPPORTED, 'containers live in the daemon: run layerd and use --socket (or $LAYERD_SOCKET)');
    }
    return backend.containers;
  };

  for (const name of ['create', 'run']) {
    program.command(name)
      .description(name === 'run' ? 'same as create: mount IMAGE as a new container' : 'mount IMAGE as a new container with its own writable layer')
      .argument('<image>', 'image')
      .option('--name <id>', 'container id (default: random)')
      .option('--mountpoint <dir>', 'where to mount (default: the daemon\'s mount root / ID)')
      .option('--read-only', 'a read-only mount')
      .option('--label <key=value...>', 'labels')
      .option('--layer-dir <dir>', 'serve this host directory live as the top read-only layer (edits show at once)')
      .option('--json', 'print {"id", "mountpoint"}')
      .action(async (image: string, opts: { name?: string; mountpoint?: string; readOnly?: boolean; label?: string[]; layerDir?: string; json?: boolean }, cmd: Command) => {
        await withBackend(cmd, async (backend) => {
          const labels: Record<string, string> = {};
          for (const l of opts.label ?? []) {
            const eq = l.indexOf('=');
            if (eq <= 0) throw new LayerdError(ErrorCodes.EINVAL, `label '${l}' is not key=value`);
            labels[l.slice(0, eq)] = l.slice(eq + 1);
          }
          const r = await needDaemon(backend).create({
            image, ...(opts.name ? { id: opts.name } : {}), ...(opts.mountpoint ? { mountpoint: resolvePath(opts.mountpoint) } : {}),
            ...(opts.readOnly ? { readOnly: true } : {}), ...(opts.label ? { labels } : {}),
            ...(opts.layerDir !== undefined ? { layerDir: resolvePath(opts.layerDir) } : {}),
          });
          if (opts.json) return printJson(r);
          print(`${r.id} ${r.mountpoint}\n`);
        });
      });
  }

  program.command('ps')
    .description('list containers')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const list = await needDaemon(backend).list();
        if (opts.json) return printJson(list);
        print(table(['CONTAINER', 'IMAGE', 'STATE', 'MOUNTPOINT'], list.map((c) =>
          [c.id, c.imageRefs[0] ?? short(c.image), c.state, c.mountpoint])));
      });
    });

  program.command('rm')
    .description('unmount containers and delete their writable layers')
    .argument('<ids...>', 'containers')
    .option('--keep', 'keep the writable layer on disk')
    .option('--json', 'print JSON')
    .action(async (ids: string[], opts: { keep?: boolean; json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const results = [];
        for (const id of ids) results.push(await needDaemon(backend).remove(id, opts.keep === true));
        if (opts.json) return printJson(results);
        for (const r of results) print(`${r.id}\n`);
      });
    });

  program.command('commit')
    .description('turn a container\'s writable layer into a new layer and image; with --layer-dir, a directory on top of IMAGE')
    .argument('<id>', 'container (or, with --layer-dir, the base image)')
    .argument('[ref]', 'NAME[:TAG] for the new image')
    .option('--layer-dir <dir>', 'commit this directory (`.wh.` files are whiteouts) as a layer on top of the image <id>')
    .option('--json', 'print JSON')
    .action(async (id: string, ref: string | undefined, opts: { layerDir?: string; json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const r = opts.layerDir !== undefined
          ? await backend.commitLayerDir(id, resolvePath(opts.layerDir), ref)
          : await needDaemon(backend).commit(id, ref);
        if (opts.json) return printJson(r);
        print(`${r.image}${r.ref ? ` (${r.ref})` : ''} layer ${r.diffId}\n`);
      });
    });

  program.command('diff')
    .description('what a container changed (A added, C changed, D deleted), or with --layer N what layer N of an image changes')
    .argument('<id>', 'container, or image with --layer')
    .option('--layer <n>', 'layer of the image (1 = base) to compare against the stack below it')
    .option('--json', 'print JSON')
    .action(async (id: string, opts: { layer?: string; json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const lines = opts.layer !== undefined ? await backend.layerDiff(id, Number(opts.layer)) : await needDaemon(backend).diff(id);
        if (opts.json) return printJson(lines);
        for (const l of lines) print(`${l.kind} ${l.path}\n`);
      });
    });

  program.command('which')
    .description('which layer provides PATH in an image, what it shadows, or what deleted it')
    .argument('<image>', 'image')
    .argument('<path>', 'path in the merged tree')
    .option('--json', 'print JSON')
    .action(async (image: string, path: string, opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const w = await backend.which(image, path);
        if (opts.json) return printJson(w);
        if (w.visible && w.layer && w.entry) {
          const x = Object.keys(w.entry.xattrs ?? {});
          print(`${w.path}: layer ${layerLabel(w.layer)} (${w.entry.kind}, mode ${w.entry.mode.toString(8).padStart(4, '0')}, ${w.entry.uid}:${w.entry.gid}, ${humanSize(w.entry.size)}${x.length ? `, xattrs ${x.join(' ')}` : ''})\n`);
        } else if (w.deletedBy) {
          print(`${w.path}: deleted by layer ${layerLabel(w.deletedBy.layer)} (${w.deletedBy.kind} ${w.deletedBy.marker})\n`);
        } else {
          print(`${w.path}: not visible\n`);
        }
        for (const s of w.shadows) print(`  shadows layer ${layerLabel(s.layer)}: ${s.kind}, mode ${s.mode.toString(8).padStart(4, '0')}, ${humanSize(s.size)}\n`);
      });
    });

  program.command('history')
    .description('one row per layer: digests, sizes, files added/modified/deleted, created_by')
    .argument('<image>', 'image')
    .option('--json', 'print JSON')
    .action(async (image: string, opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const rows = await backend.history(image);
        if (opts.json) return printJson(rows);
        print(table(['LAYER', 'BLOB', 'COMPRESSED', 'SIZE', 'ADDED', 'MODIFIED', 'DELETED', 'CREATED BY'], rows.map((r) => [
          layerLabel(r.layer), r.digest ? short(r.digest) : '-', humanSize(r.compressedSize), humanSize(r.size),
          String(r.added), String(r.modified), String(r.deleted), (r.createdBy ?? '').slice(0, 60)])));
      });
    });

  program.command('tree')
    .description('the merged tree of an image, each entry with the layer providing it')
    .argument('<image>', 'image')
    .argument('[path]', 'subtree', '/')
    .option('--depth <n>', 'levels below PATH')
    .option('--json', 'print JSON')
    .action(async (image: string, path: string, opts: { depth?: string; json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const entries = await backend.tree(image, path, opts.depth !== undefined ? Number(opts.depth) : Infinity);
        if (opts.json) return printJson(entries);
        for (const e of entries) print(`${layerLabel(e.layer).padEnd(15)} ${e.kind.padEnd(7)} ${humanSize(e.size).padStart(9)}  ${e.path}\n`);
      });
    });

  program.command('report')
    .description('write a self-contained HTML page about an image\'s layers (sizes, changes, treemap, wasted space)')
    .argument('<image>', 'image')
    .requiredOption('-o, --output <file>', 'the HTML file to write (- for stdout)')
    .action(async (image: string, opts: { output: string }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const html = await backend.report(image);
        if (opts.output === '-') print(html);
        else await writeFile(opts.output, html);
      });
    });

  program.command('efficiency')
    .description('wasted space: bytes shadowed or deleted by upper layers, duplicated files, dive-style score')
    .argument('<image>', 'image')
    .option('--min <score>', 'exit 9 when the score is below this (0..1), for CI')
    .option('--json', 'print JSON')
    .action(async (image: string, opts: { min?: string; json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const e = await backend.efficiency(image);
        if (opts.json) printJson(e);
        else {
          print(`efficiency ${(e.score * 100).toFixed(2)}%: ${humanSize(e.wastedBytes)} wasted of ${humanSize(e.totalBytes)} ` +
            `(${humanSize(e.shadowedBytes)} shadowed, ${humanSize(e.deletedBytes)} deleted, ${e.duplicated} files in several layers)\n`);
          print(table(['WASTED', 'COPIES', 'LAYERS', 'PATH'], e.offenders.slice(0, 10).map((o) => [humanSize(o.wastedBytes), String(o.count), o.layers.join(','), o.path])));
        }
        if (opts.min !== undefined && e.score < Number(opts.min)) {
          process.exitCode = 9;
          if (!opts.json) process.stderr.write(`layerctl: efficiency ${e.score.toFixed(4)} is below --min ${opts.min}\n`);
        }
      });
    });

  program.command('export')
    .description('write a container\'s writable layer as an OCI layer tar')
    .argument('<id>', 'container')
    .requiredOption('-o, --output <file>', 'where to write the tar (- for stdout)')
    .action(async (id: string, opts: { output: string }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const out = opts.output === '-' ? process.stdout : createWriteStream(opts.output, { mode: 0o644 });
        await needDaemon(backend).export(id, out);
        if (out !== process.stdout) await new Promise<void>((r) => out.end(r));
      });
    });

  program.command('status')
    .description('is the daemon up, and what does it hold')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      await withBackend(cmd, async (backend) => {
        const c = needDaemon(backend);
        const [health, containers, images] = await Promise.all([c.health(), c.list(), backend.images()]);
        const status = { ...health, images: images.length, containers: containers.length, mounted: containers.filter((x) => x.state === 'mounted').length };
        if (opts.json) return printJson(status);
        print(`layerd ${status.version}: up ${status.uptimeSeconds}s, root ${status.root}, ${status.images} images, ${status.containers} containers (${status.mounted} mounted)\n`);
      });
    });

  registerRegistryCommands(program, offlineStore, (cmd) => {
    const opts = cmd.optsWithGlobals<GlobalOptions>();
    const socket = daemonSocket(opts);
    return socket ? new DaemonClient(socket) : undefined;
  });

  return program;
}

export async function main(argv: string[]): Promise<number> {
  // `layerctl tree … | head`: a closed pipe is the reader's choice, not an error.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
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
