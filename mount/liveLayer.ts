/**
 * A live directory layer: a host directory served as a read-only layer that
 * follows the directory as it is edited. chokidar reports changes; a burst
 * of them is coalesced into one walk of the directory (scanDirectory), and
 * the new index is handed to `onChange`. `.wh.` files and `.wh..wh..opq`
 * markers made by hand act as whiteouts, as in any directory layer.
 *
 * Walking the whole directory again is simpler and always right (renames,
 * hard links, xattrs); the trees developers edit live are small enough that
 * a walk costs milliseconds.
 */
import { watch, type FSWatcher } from 'chokidar';
import { join, resolve } from 'node:path';
import { silentLogger, type Logger } from '../common/log.js';
import type { LayerSource } from '../storage/layerIndex.js';
import { lowerDirSource } from './lowerDir.js';

/** How long a burst of changes may last before the directory is walked again. */
const SETTLE_MS = 75;

export class LiveLayer {
  private timer: NodeJS.Timeout | undefined;
  private scanning: Promise<void> | undefined;
  private dirty = false;
  private closed = false;
  /** Directories added to the watcher after a walk found them unwatched (watchEveryDirectory). */
  private readonly readded = new Set<string>();

  private constructor(
    readonly dir: string,
    private current: LayerSource,
    private readonly watcher: FSWatcher,
    private readonly onChange: (source: LayerSource) => Promise<void>,
    private readonly logger: Logger,
  ) {}

  /**
   * Watch `dir` and describe it. The watcher is ready before the first walk,
   * so no change can fall between the two.
   */
  static async start(dir: string, onChange: (source: LayerSource) => Promise<void>, logger: Logger = silentLogger()): Promise<LiveLayer> {
    const root = resolve(dir);
    const watcher = watch(root, { ignoreInitial: true, followSymlinks: false, persistent: true });
    let live: LiveLayer | undefined;
    let changedDuringWalk = false;
    watcher.on('all', () => { if (live) live.schedule(); else changedDuringWalk = true; });
    let initial: LayerSource;
    try {
      await new Promise<void>((done, fail) => {
        watcher.once('ready', done);
        watcher.once('error', fail);
      });
      // Walked once the watcher is ready: a change after this point is reported, none before it is missed.
      initial = await lowerDirSource(root, `live:${root}`, 'layer-dir'); // also checks that it is a readable directory
    } catch (err) {
      await watcher.close();
      throw err;
    }
    live = new LiveLayer(root, initial, watcher, onChange, logger);
    watcher.on('error', (err) => logger.warn('live layer watcher error', { dir: root, error: String(err) }));
    if (changedDuringWalk) live.schedule();
    return live;
  }

  /** The directory as last walked. */
  get source(): LayerSource {
    return this.current;
  }

  private schedule(): void {
    if (this.closed) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => { this.timer = undefined; this.rescan(); }, SETTLE_MS);
  }

  private rescan(): void {
    if (this.scanning) {
      this.dirty = true;
      return;
    }
    this.scanning = (async () => {
      do {
        this.dirty = false;
        try {
          const source = await lowerDirSource(this.dir, `live:${this.dir}`, 'layer-dir');
          if (this.closed) return;
          this.current = source;
          await this.onChange(source);
          this.watchEveryDirectory(source);
        } catch (err) {
          // E.g. the directory was removed: keep serving the last good view.
          this.logger.warn('could not read the live layer again', { dir: this.dir, error: (err as Error).message });
        }
      } while (this.dirty && !this.closed);
    })().finally(() => { this.scanning = undefined; });
  }

  /**
   * chokidar can miss a directory made while it was setting up the watch of its parent
   * (`mkdir -p` and a write at once, under load): nothing in it would ever be reported, so
   * the view would keep what the last walk saw for good. Every directory the walk found must
   * be watched; one that is not is added, and the directory walked again (what changed before
   * the watch existed was never reported).
   */
  private watchEveryDirectory(source: LayerSource): void {
    const watched = this.watcher.getWatched();
    const unwatched = source.index.entries
      .filter((e) => e.kind === 'dir')
      .map((e) => join(this.dir, e.path))
      // Once each: a directory the watcher cannot watch at all (unreadable) must not loop.
      .filter((dir) => !(dir in watched) && !this.readded.has(dir));
    if (unwatched.length === 0 || this.closed) return;
    for (const dir of unwatched) this.readded.add(dir);
    this.logger.warn('live layer: directories the watcher missed, watched now', { dir: this.dir, missed: unwatched.slice(0, 10), count: unwatched.length });
    this.watcher.add(unwatched);
    this.schedule();
  }

  /** Stop watching (idempotent); waits for a walk in progress. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    await this.watcher.close();
    await this.scanning;
  }
}
