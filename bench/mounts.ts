/**
 * Mounting one layer stack three ways for the benchmarks: layerd (one
 * `layerd mount --layers …` process, as the daemon passes store layers),
 * kernel overlayfs and fuse-overlayfs (lower directories laid out from the
 * same layer tars, test/support/overlayLower.ts), each with its own fresh
 * upper. A mount counts as ready once it shows in /proc/self/mountinfo.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { sleep } from '../common/process.js';
import { clearDeadMount, findMount } from '../mount/deadMount.js';
export { clearMountsUnder } from '../mount/deadMount.js';
import { StoreOperations } from '../storage/operations.js';
import { Store } from '../storage/store.js';
import { overlayLower } from '../test/support/overlayLower.js';
import { CORPUS, REPO } from './report.js';

const run = promisify(execFile);
export const LAYERD_BIN = join(REPO, 'bin', 'layerd');

/**
 * `layerd-wb`: layerd with FUSE passthrough off (LAYERD_FUSE_PASSTHROUGH=0), so with the kernel's
 * writeback cache; `layerd-nopt`: neither (LAYERD_FUSE_WRITEBACK=0 too), serving every read and write itself.
 */
export type Impl = 'layerd' | 'layerd-wb' | 'layerd-nopt' | 'overlayfs' | 'fuse-overlayfs';
export const IMPLS: Impl[] = ['layerd', 'overlayfs', 'fuse-overlayfs'];
/** For workloads that write: what passthrough and writeback caching change shows beside the peers. */
export const IMPLS_WITH_PASSTHROUGH_OFF: Impl[] = ['layerd', 'layerd-wb', 'layerd-nopt', 'overlayfs', 'fuse-overlayfs'];

const LAYERD_ENV: Record<'layerd' | 'layerd-wb' | 'layerd-nopt', NodeJS.ProcessEnv> = {
  'layerd': { LAYERD_FUSE_PASSTHROUGH: '1', LAYERD_FUSE_WRITEBACK: '1' },
  'layerd-wb': { LAYERD_FUSE_PASSTHROUGH: '0', LAYERD_FUSE_WRITEBACK: '1' },
  'layerd-nopt': { LAYERD_FUSE_PASSTHROUGH: '0', LAYERD_FUSE_WRITEBACK: '0' },
};

/** The same layers as layerd and as overlayfs see them. */
export interface LayerStack {
  /** Store layer directories (layers/sha256/<hex>), bottom → top. */
  layerDirs: string[];
  /** overlayfs lower directories of the same layer tars, bottom → top. */
  lowers: string[];
}

export interface Mounted {
  impl: Impl;
  mnt: string;
  /** The serving process (FUSE implementations); none for kernel overlayfs. */
  pid?: number;
  /** From spawn (or the mount command) until the mount showed in mountinfo. */
  readyMs: number;
  stop(): Promise<void>;
}

const topFirst = (dirs: string[]): string => [...dirs].reverse().join(':');

async function waitMounted(mnt: string, server: ChildProcess | undefined, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if ((await findMount(mnt))?.fstype.startsWith('fuse')) return;
    if (server && server.exitCode !== null) throw new Error(`the server of ${mnt} exited with ${server.exitCode}`);
    if (Date.now() > deadline) throw new Error(`${mnt} did not mount`);
    await sleep(2);
  }
}

async function stopServer(mnt: string, server: ChildProcess): Promise<void> {
  const exited = server.exitCode !== null || server.signalCode !== null ? Promise.resolve() : new Promise<void>((r) => server.once('exit', () => r()));
  await run('umount', [mnt]).catch(() => clearDeadMount(mnt));
  const timer = setTimeout(() => { if (server.exitCode === null) server.kill('SIGTERM'); }, 5000);
  await exited;
  clearTimeout(timer);
}

export interface MountOptions {
  /**
   * Kernel name/attribute cache lifetime for the FUSE implementations
   * (layerd `--cache-seconds`, fuse-overlayfs `timeout=`); default: each one's own.
   */
  cacheSeconds?: number;
}

/**
 * Mount `stack` with `impl` at `<base>/mnt`, upper `<base>/upper`; stop()
 * unmounts. `base` stays until the caller removes its work directory at the
 * end of the run: deleting thousands of files right before the next
 * workload made ext4 search its inode bitmaps past "recently deleted"
 * inodes (measured: 1.7 ms of kernel time per create in whichever server
 * ran next), which is noise, not a property of any implementation.
 */
export async function mountStack(impl: Impl, stack: LayerStack, base: string, options: MountOptions = {}): Promise<Mounted> {
  const [upper, wd, mnt] = [join(base, 'upper'), join(base, 'work'), join(base, 'mnt')];
  for (const d of [upper, wd, mnt]) await mkdir(d, { recursive: true });
  const cache = options.cacheSeconds;
  const overlayOpts = `lowerdir=${topFirst(stack.lowers)},upperdir=${upper},workdir=${wd}`;
  const layerdCacheArgs = cache === undefined ? [] : ['--cache-seconds', String(cache)];
  const fuseOverlayOpts = cache === undefined ? overlayOpts : `${overlayOpts},timeout=${cache}`;
  if (impl === 'overlayfs') {
    const t0 = performance.now();
    await run('mount', ['-t', 'overlay', 'overlay', '-o', overlayOpts, mnt]);
    if (!(await findMount(mnt))) throw new Error(`${mnt} did not mount`);
    const readyMs = performance.now() - t0;
    return { impl, mnt, readyMs, stop: async () => { await run('umount', [mnt]); } };
  }
  // A server that exits before mounting is started once more: other people's
  // builds rewrite dist/ under a starting `layerd mount` on a shared machine.
  for (let attempt = 1; ; attempt++) {
    const t0 = performance.now();
    const server = impl === 'layerd' || impl === 'layerd-wb' || impl === 'layerd-nopt'
      ? spawn(process.execPath, [LAYERD_BIN, 'mount', '--layers', topFirst(stack.layerDirs), '--upper', upper, ...layerdCacheArgs, mnt], {
        stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...LAYERD_ENV[impl] },
      })
      : spawn('fuse-overlayfs', ['-f', '-o', fuseOverlayOpts, mnt], { stdio: ['ignore', 'ignore', 'pipe'] });
    // The server's log (a line per mount and unmount) is kept out of the report; its tail explains a failure.
    let log = '';
    server.stderr!.on('data', (chunk: Buffer) => { log = (log + chunk.toString()).slice(-4000); });
    try {
      await waitMounted(mnt, server);
    } catch (err) {
      await stopServer(mnt, server).catch(() => undefined);
      if (attempt < 3 && server.exitCode !== null) {
        process.stderr.write(`${impl} server for ${mnt} exited before mounting (${log.trim().split('\n').pop() ?? ''}); starting it again\n`);
        await sleep(1000);
        continue;
      }
      throw new Error(`${impl}: ${(err as Error).message}\n${log}`);
    }
    const readyMs = performance.now() - t0;
    return {
      impl, mnt, pid: server.pid!, readyMs,
      stop: async () => { await stopServer(mnt, server); },
    };
  }
}


/** debian-multi:latest from the corpus, imported into a store under `work`, with its overlayfs lowers. */
export async function debianMultiStack(work: string): Promise<LayerStack> {
  const store = await Store.open(join(work, 'store'), { durability: 'none' });
  let tars: string[];
  try {
    await new StoreOperations(store).importPath({ path: join(CORPUS, 'oci', 'debian-multi') });
    tars = (await store.imageLayers('debian-multi:latest')).map((l) => l.tarPath);
  } finally {
    store.close();
  }
  const lowers: string[] = [];
  for (const [i, tar] of tars.entries()) {
    lowers.push(join(work, `lower-${i}`));
    await overlayLower(tar, lowers[i]!);
  }
  return { layerDirs: tars.map((t) => dirname(t)), lowers };
}
