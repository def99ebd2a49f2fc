/**
 * Running the real daemon (bin/layerd) for tests: started on a scratch root
 * and socket, waited for through /v1/health, and always stopped by PID.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { request } from 'node:http';
import { join } from 'node:path';
import { REPO } from './env.js';

export interface RunningDaemon {
  pid: number;
  socket: string;
  root: string;
  child: ChildProcess;
  log(): string;
  /** SIGTERM and wait; resolves with the exit code. */
  stop(): Promise<number | null>;
}

export interface HttpResult {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
  json<T = unknown>(): T;
}

export function http(socketPath: string, method: string, path: string, body?: string | Buffer, headers: Record<string, string> = {}): Promise<HttpResult> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method, path, headers: { ...(body !== undefined ? { 'content-length': String(Buffer.byteLength(body)) } : {}), ...headers } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, json: <T>() => JSON.parse(text) as T });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

export async function startDaemon(dir: string, extraArgs: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<RunningDaemon> {
  const root = join(dir, 'root');
  const socket = join(dir, 'layerd.sock');
  // Containers are mounted beneath the test's own directory unless a test says where: the
  // daemon's default (/run/layerd/mounts) is shared by every run on the machine, and two runs
  // creating a container of one name there mounted and removed each other's.
  const mountRoot = extraArgs.includes('--mount-root') ? [] : ['--mount-root', join(dir, 'mounts')];
  const child = spawn(join(REPO, 'bin', 'layerd'), ['--root', root, '--socket', socket, ...mountRoot, ...extraArgs], {
    stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env },
  });
  let output = '';
  child.stdout!.on('data', (d: Buffer) => { output += d.toString(); });
  child.stderr!.on('data', (d: Buffer) => { output += d.toString(); });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const daemon: RunningDaemon = {
    pid: child.pid!, socket, root, child, log: () => output,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
  };
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`layerd exited (${child.exitCode}): ${output}`);
    try {
      const r = await http(socket, 'GET', '/v1/health');
      if (r.status === 200) return daemon;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      await daemon.stop();
      throw new Error(`layerd did not become ready: ${output}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Poll `condition` until it holds; fail naming `what` after `timeoutMs`. */
export async function waitFor(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 20_000, intervalMs = 50): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
