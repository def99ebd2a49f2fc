/**
 * Shared test plumbing: where the repo and the corpus are, scratch
 * directories that are always removed, and running the real CLI.
 */
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root (tests run from dist/test/...). */
export const REPO = resolve(here, '..', '..', '..');
/**
 * The image corpus: $LAYERD_CORPUS if set, else `shared/corpus` beside the
 * repository (CI clones the repo into a fresh folder with shared/ next to it).
 * Every test finds the corpus through this, never through a fixed path.
 */
export const CORPUS = process.env['LAYERD_CORPUS'] ?? resolve(REPO, '..', 'shared', 'corpus');
export const DEBIAN_MULTI = join(CORPUS, 'oci', 'debian-multi');
export const BUSYBOX = join(CORPUS, 'oci', 'busybox');
export const LAYERCTL = join(REPO, 'bin', 'layerctl');

export const execFileAsync = promisify(execFile);

/** A scratch directory removed after the suite, whatever happens. */
export async function scratch(prefix = 'layerd-test-'): Promise<{ dir: string; remove(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run `layerctl ARGS` as a separate process, as a user would. */
export function layerctl(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(LAYERCTL, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('error', reject);
    child.on('close', (code) => resolvePromise({ code: code ?? -1, stdout, stderr }));
  });
}

/**
 * `layerctl` against the daemon listening on `socket()` (read at each call: suites start their
 * daemon in a hook): `cli` gives stdout or throws with the exit code and stderr, `json` adds `--json`.
 */
export function daemonCli(socket: () => string): { cli(...args: string[]): Promise<string>; json<T>(...args: string[]): Promise<T> } {
  const cli = async (...args: string[]): Promise<string> => {
    const r = await layerctl(['--socket', socket(), ...args]);
    if (r.code !== 0) throw new Error(`layerctl ${args.join(' ')}: ${r.code} ${r.stderr}`);
    return r.stdout;
  };
  return { cli, json: async <T>(...args: string[]): Promise<T> => JSON.parse(await cli(...args, '--json')) as T };
}

export async function layerctlJson<T>(args: string[]): Promise<T> {
  const r = await layerctl([...args, '--json']);
  if (r.code !== 0) throw new Error(`layerctl ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}
