/**
 * A real registry for tests: Debian's `docker-registry` (distribution
 * 2.8.2) on 127.0.0.1 with a free port and its own storage directory
 * (docker-registry cannot report a port it chose, so a port found free is
 * used and, when someone else took it in between, another one is tried),
 * optionally with TLS (a CA made here with openssl) and htpasswd auth
 * (bcrypt, the only hash distribution accepts). Registries are stopped by
 * PID in `stop()` and, as a last resort, when the test process exits.
 * Also: pushing corpus images with skopeo, as make-corpus.sh does, and
 * running `layerctl` with the registry commands.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { closeSync, existsSync, openSync } from 'node:fs';
import { mkdir, readFile, readdir, readlink, stat, writeFile } from 'node:fs/promises';
import http, { type IncomingMessage, type OutgoingHttpHeaders, type ServerResponse } from 'node:http';
import https from 'node:https';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BUSYBOX, CORPUS, DEBIAN_MULTI, type CliResult, execFileAsync, layerctl } from './env.js';
import { listenLoopback } from './loopback.js';

export interface RegistryOptions {
  /** Reuse a port and storage (restart after a kill). */
  port?: number;
  storageDir?: string;
  tls?: TlsFiles;
  htpasswd?: string;
}

export interface TlsFiles {
  caCert: string;
  cert: string;
  key: string;
}

const running = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of running) if (child.exitCode === null && child.pid) process.kill(child.pid, 'SIGKILL');
});

/** A port nothing listened on a moment ago: only for a server that cannot bind port 0 itself, with a retry on EADDRINUSE. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

export class TestRegistry {
  private child: ChildProcess | undefined;

  private constructor(readonly dir: string, readonly port: number, readonly storageDir: string, private readonly options: RegistryOptions) {}

  /** `127.0.0.1:PORT`, the registry part of references. */
  get host(): string { return `127.0.0.1:${this.port}`; }
  get pid(): number | undefined { return this.child?.pid; }
  get scheme(): 'http' | 'https' { return this.options.tls ? 'https' : 'http'; }

  static async start(dir: string, options: RegistryOptions = {}): Promise<TestRegistry> {
    await mkdir(dir, { recursive: true });
    const storageDir = options.storageDir ?? join(dir, 'storage');
    await mkdir(storageDir, { recursive: true });
    for (let attempt = 1; ; attempt++) {
      const registry = new TestRegistry(dir, options.port ?? await freePort(), storageDir, options);
      try {
        await registry.launch();
        return registry;
      } catch (err) {
        // The port was free when looked at, taken when docker-registry bound it (another test run): another one.
        if (!(err instanceof PortTaken) || options.port !== undefined || attempt >= 5) throw err;
      }
    }
  }

  private async launch(): Promise<void> {
    const o = this.options;
    const config = [
      'version: 0.1',
      'log:',
      '  level: warn',
      '  accesslog:',
      '    disabled: true',
      'storage:',
      '  filesystem:',
      `    rootdirectory: ${this.storageDir}`,
      '  delete:',
      '    enabled: true',
      'http:',
      `  addr: 127.0.0.1:${this.port}`,
      ...(o.tls ? ['  tls:', `    certificate: ${o.tls.cert}`, `    key: ${o.tls.key}`] : []),
      ...(o.htpasswd ? ['auth:', '  htpasswd:', '    realm: layerd-test', `    path: ${o.htpasswd}`] : []),
      '',
    ].join('\n');
    const configPath = join(this.dir, 'config.yml');
    await writeFile(configPath, config);
    const logPath = join(this.dir, 'registry.log');
    const logStart = await stat(logPath).then((s) => s.size, () => 0);
    const log = openSync(logPath, 'a');
    try {
      this.child = spawn('docker-registry', ['serve', configPath], { stdio: ['ignore', log, log] });
    } finally {
      closeSync(log);
    }
    running.add(this.child);
    const child = this.child;
    child.on('exit', () => running.delete(child));
    for (let i = 0; i < 100; i++) {
      if (child.exitCode !== null) {
        const output = (await readFile(logPath)).subarray(logStart).toString();
        if (/address already in use/i.test(output)) throw new PortTaken(this.port);
        throw new Error(`docker-registry exited (${child.exitCode}); see ${logPath}`);
      }
      // Answers, and from our child: a registry of another test run may hold the port.
      if (await this.answers() && await listensOn(child.pid!, this.port)) return;
      await sleep(100);
    }
    throw new Error(`docker-registry did not answer on ${this.host}`);
  }

  private answers(): Promise<boolean> {
    return new Promise((resolve) => {
      const lib = this.options.tls ? https : http;
      const req = lib.get(`${this.scheme}://${this.host}/v2/`, { rejectUnauthorized: false, timeout: 1000 }, (res) => {
        res.resume();
        resolve(res.statusCode === 200 || res.statusCode === 401);
      });
      req.on('error', () => resolve(false));
      req.on('timeout', () => { req.destroy(); resolve(false); });
    });
  }

  /** SIGKILL, as a crash would (no graceful close of open connections). */
  async kill(): Promise<void> {
    await this.stopWith('SIGKILL');
  }

  async stop(): Promise<void> {
    await this.stopWith('SIGTERM');
  }

  /** Start again on the same port and storage. */
  async restart(): Promise<void> {
    await this.stop();
    await this.launch();
  }

  private async stopWith(signal: NodeJS.Signals): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    process.kill(child.pid!, signal);
    const timeout = sleep(5000).then(() => { if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGKILL'); });
    await Promise.race([exited, timeout]);
    await exited;
    this.child = undefined;
  }
}

/** Whether process `pid` holds the socket listening on 127.0.0.1:`port` (from /proc/net/tcp and /proc/PID/fd). */
async function listensOn(pid: number, port: number): Promise<boolean> {
  const local = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  const inodes = new Set<string>();
  for (const line of (await readFile('/proc/net/tcp', 'utf8')).split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[1] === local && f[3] === '0A') inodes.add(f[9]!);
  }
  if (inodes.size === 0) return false;
  const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
  for (const fd of fds) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    const m = /^socket:\[(\d+)\]$/.exec(target);
    if (m && inodes.has(m[1]!)) return true;
  }
  return false;
}

class PortTaken extends Error {
  constructor(port: number) {
    super(`port ${port} was taken before docker-registry could bind it`);
  }
}

/** A CA, a server certificate for 127.0.0.1 signed by it, and an htpasswd file (bcrypt). */
export async function makeTlsAndHtpasswd(dir: string, username: string, password: string): Promise<{ tls: TlsFiles; htpasswd: string }> {
  await mkdir(dir, { recursive: true });
  const f = (n: string): string => join(dir, n);
  const openssl = async (...args: string[]): Promise<void> => { await execFileAsync('openssl', args); };
  await openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=layerd test CA',
    '-keyout', f('ca.key'), '-out', f('ca.pem'));
  await openssl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=127.0.0.1', '-keyout', f('server.key'), '-out', f('server.csr'));
  await writeFile(f('ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n');
  await openssl('x509', '-req', '-in', f('server.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial',
    '-days', '2', '-extfile', f('ext.cnf'), '-out', f('server.pem'));
  // distribution 2.8 accepts only bcrypt in htpasswd files (not apr1/MD5).
  const hash = execFileSync('python3', ['-W', 'ignore', '-c',
    'import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))', password]).toString().trim();
  await writeFile(f('htpasswd'), `${username}:${hash}\n`);
  return { tls: { caCert: f('ca.pem'), cert: f('server.pem'), key: f('server.key') }, htpasswd: f('htpasswd') };
}

async function skopeo(...args: string[]): Promise<void> {
  await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', '--dest-tls-verify=false', ...args], { maxBuffer: 16 * 1024 * 1024 });
}

export type CorpusPush = 'debian-multi:latest' | 'debian-multi:zstd' | 'debian-multi:v2s2' | 'debian-multiarch:latest' | 'debian-multiarch:docker-list' | 'busybox:latest';

/**
 * Push corpus images into `host` under `corpus/...` the way
 * make-corpus.sh's registry step does. `debian-multiarch` is an index over
 * the amd64 debian-multi image and a relabelled arm64 copy, made here.
 */
export async function pushCorpus(host: string, which: readonly CorpusPush[], work: string): Promise<void> {
  const D = `docker://${host}/corpus`;
  for (const w of which) {
    switch (w) {
      case 'debian-multi:latest': await skopeo('--preserve-digests', `oci:${DEBIAN_MULTI}:latest`, `${D}/debian-multi:latest`); break;
      case 'debian-multi:zstd': {
        // Compressed into a fresh layout first, then pushed byte for byte: pushing with
        // --dest-compress-format straight to the registry lets skopeo's blob-info cache
        // substitute the gzip blobs the registry already has.
        const layout = join(work, 'debian-multi-zstd');
        if (!existsSync(join(layout, 'index.json'))) await skopeo('--dest-compress-format', 'zstd', `oci:${DEBIAN_MULTI}:latest`, `oci:${layout}:latest`);
        await skopeo('--preserve-digests', `oci:${layout}:latest`, `${D}/debian-multi:zstd`);
        break;
      }
      case 'debian-multi:v2s2': await skopeo('-f', 'v2s2', `oci:${DEBIAN_MULTI}:latest`, `${D}/debian-multi:v2s2`); break;
      case 'debian-multiarch:latest': await skopeo('--all', '--preserve-digests', `oci:${await multiarchLayout(work)}:latest`, `${D}/debian-multiarch:latest`); break;
      case 'debian-multiarch:docker-list': await skopeo('--all', '-f', 'v2s2', `oci:${await multiarchLayout(work)}:latest`, `${D}/debian-multiarch:docker-list`); break;
      case 'busybox:latest': await skopeo('--all', '--preserve-digests', `oci:${BUSYBOX}:latest`, `${D}/busybox:latest`); break;
    }
  }
}

/** debian-multiarch, made as make-corpus.sh's multiarch step makes it (index over amd64 + a relabelled arm64/v8). */
async function multiarchLayout(work: string): Promise<string> {
  const out = join(work, 'debian-multiarch');
  if (existsSync(join(out, 'index.json'))) return out;
  const tool = join(CORPUS, 'tools', 'oci_index.py');
  await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', `oci:${DEBIAN_MULTI}:latest`, `oci:${out}:amd64`]);
  await execFileAsync('python3', [tool, 'clone-platform', out, 'amd64', 'arm64', 'arm64', 'v8']);
  await execFileAsync('python3', [tool, 'make-index', out, 'latest', 'amd64', 'arm64']);
  return out;
}

/** Run the real `layerctl ARGS` (bin/layerctl) as a separate process. */
export function layerctlR(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return layerctl(args, env);
}

export async function layerctlRJson<T>(args: string[], env: NodeJS.ProcessEnv = {}): Promise<T> {
  const r = await layerctlR([...args, '--json'], env);
  if (r.code !== 0) throw new Error(`layerctl ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

export interface ProxyHooks {
  /** Answer a request here instead of passing it on; return true if answered. */
  intercept?(req: IncomingMessage, res: ServerResponse): boolean;
  /** Headers to send upstream (default: the client's). */
  requestHeaders?(req: IncomingMessage): OutgoingHttpHeaders;
  /** Change the upstream answer's headers. */
  responseHeaders?(req: IncomingMessage, headers: http.IncomingHttpHeaders): http.IncomingHttpHeaders;
  /** Change a chunk of the upstream answer's body; `offset` is where the chunk starts. */
  mapChunk?(req: IncomingMessage, chunk: Buffer, offset: number): Buffer;
}

export interface TestProxy {
  host: string;
  /** Every request seen, in order: `METHOD /path?query`. */
  seen: string[];
  close(): Promise<void>;
}

/**
 * A small HTTP proxy in front of a plain-HTTP registry, for faults a real
 * registry does not make (corrupt bytes, 5xx, a different Accept) and for an
 * authenticating front. The Host header is passed on unchanged, so the
 * registry's Location headers point back at the proxy.
 */
export async function startProxy(upstreamHost: string, hooks: ProxyHooks = {}): Promise<TestProxy> {
  const seen: string[] = [];
  const [upHost, upPort] = upstreamHost.split(':') as [string, string];
  const server = http.createServer((req, res) => {
    seen.push(`${req.method} ${req.url}`);
    if (hooks.intercept?.(req, res)) return;
    const upstream = http.request({
      host: upHost, port: Number(upPort), method: req.method, path: req.url,
      headers: hooks.requestHeaders ? hooks.requestHeaders(req) : req.headers,
    }, (up) => {
      res.writeHead(up.statusCode ?? 502, hooks.responseHeaders ? hooks.responseHeaders(req, up.headers) : up.headers);
      let offset = 0;
      up.on('data', (chunk: Buffer) => {
        const out = hooks.mapChunk ? hooks.mapChunk(req, chunk, offset) : chunk;
        offset += chunk.length;
        res.write(out);
      });
      up.on('end', () => res.end());
      up.on('error', () => res.destroy());
    });
    upstream.on('error', () => { res.statusCode = 502; res.end(); });
    req.pipe(upstream);
  });
  const { host, close } = await listenLoopback(server);
  return { host, seen, close };
}
