/**
 * The spool directory: an image archive dropped into it is imported, then
 * moved to `done/` — or to `failed/`, with `<name>.error` saying why. Files
 * are picked up once they stop growing (chokidar's awaitWriteFinish), and
 * one at a time, in the order they arrived.
 */
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { watch, type FSWatcher } from 'chokidar';
import { asLayerdError } from '../common/errors.js';
import { type Logger } from '../common/log.js';
import { type StoreOperations } from '../storage/operations.js';

export class Spool {
  private watcher: FSWatcher | undefined;
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly dir: string, private readonly ops: StoreOperations, private readonly logger: Logger) {}

  async start(): Promise<void> {
    await mkdir(join(this.dir, 'done'), { recursive: true });
    await mkdir(join(this.dir, 'failed'), { recursive: true });
    this.watcher = watch(this.dir, {
      depth: 0,
      ignored: (path, stats) => basename(path).startsWith('.') || (stats?.isDirectory() === true && path !== this.dir),
      awaitWriteFinish: { stabilityThreshold: 500, pollInterval: 100 },
    });
    this.watcher.on('add', (path) => { this.queue = this.queue.then(() => this.take(path)); });
    await new Promise<void>((resolve) => this.watcher!.once('ready', () => resolve()));
  }

  private async take(path: string): Promise<void> {
    const name = basename(path);
    try {
      const images = await this.ops.importPath({ path });
      await rename(path, join(this.dir, 'done', name));
      this.logger.info('spool: imported', { file: name, images: images.map((i) => i.refs).flat() });
    } catch (err) {
      const e = asLayerdError(err);
      await rename(path, join(this.dir, 'failed', name)).catch(() => undefined);
      await writeFile(join(this.dir, 'failed', `${name}.error`), `${e.code}: ${e.message}\n`).catch(() => undefined);
      this.logger.warn('spool: import failed', { file: name, code: e.code, error: e.message });
    }
  }

  /** Stop watching; an import under way finishes first. */
  async stop(): Promise<void> {
    await this.watcher?.close();
    await this.queue;
  }
}
