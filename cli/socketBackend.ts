/**
 * The daemon backend: the CLI talks HTTP/1.1 + JSON to layerd's Unix socket.
 * Errors come back as `{code, message, context}` and are re-raised as the
 * same LayerdError, so exit codes match the offline mode.
 */
import { request } from 'node:http';
import { Writable } from 'node:stream';
import { ErrorCodes, type ErrorCode, LayerdError } from '../common/errors.js';
import { type ImportProgress } from '../storage/importer.js';
import { type Backend, type ImportRequest } from './backend.js';

export class DaemonClient {
  constructor(readonly socketPath: string) {}

  /** A request whose successful answer is raw bytes, copied to `out`. */
  stream(method: string, path: string, out: NodeJS.WritableStream): Promise<void> {
    return new Promise((resolve, reject) => {
      const req = request({ socketPath: this.socketPath, method, path }, (res) => {
        if ((res.statusCode ?? 500) >= 400) {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            try {
              const e = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { code: ErrorCode; message: string };
              reject(new LayerdError(e.code, e.message));
            } catch {
              reject(new LayerdError(ErrorCodes.EIO, `layerd answered ${res.statusCode ?? 0}`));
            }
          });
          return;
        }
        res.pipe(out);
        res.on('end', () => resolve());
        res.on('error', reject);
      });
      req.on('error', (err) => reject(new LayerdError(ErrorCodes.EIO, `cannot reach layerd at ${this.socketPath}: ${err.message}`)));
      req.end();
    });
  }

  /** One request; with `onEvent`, an NDJSON stream whose last line is the result. */
  call<T>(method: string, path: string, body?: unknown, onEvent?: (event: unknown) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
      const req = request({
        socketPath: this.socketPath, method, path,
        headers: {
          ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}),
          ...(onEvent ? { accept: 'application/x-ndjson' } : {}),
        },
      }, (res) => {
        const ndjson = (res.headers['content-type'] ?? '').includes('ndjson');
        let buffered = '';
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => {
          if (!ndjson) { chunks.push(chunk); return; }
          buffered += chunk.toString('utf8');
          let nl: number;
          while ((nl = buffered.indexOf('\n')) >= 0) {
            const line = buffered.slice(0, nl);
            buffered = buffered.slice(nl + 1);
            if (line.trim() === '') continue;
            const value = JSON.parse(line) as { result?: T; error?: { code: ErrorCode; message: string; context?: Record<string, string> } };
            if (value.error) reject(new LayerdError(value.error.code, value.error.message, value.error.context ?? {}));
            else if ('result' in value) resolve(value.result as T);
            else onEvent?.(value);
          }
        });
        res.on('end', () => {
          if (ndjson) return;
          const text = Buffer.concat(chunks).toString('utf8');
          let value: unknown;
          try {
            value = text === '' ? {} : JSON.parse(text);
          } catch {
            reject(new LayerdError(ErrorCodes.EIO, `layerd answered ${res.statusCode ?? 0} with a body that is not JSON`));
            return;
          }
          if ((res.statusCode ?? 500) >= 400) {
            const e = value as { code?: ErrorCode; message?: string; context?: Record<string, string> };
            reject(new LayerdError(e.code ?? ErrorCodes.EIO, e.message ?? `layerd answered ${res.statusCode ?? 0}`, e.context ?? {}));
          } else {
            resolve(value as T);
          }
        });
        res.on('error', reject);
      });
      req.on('error', (err: NodeJS.ErrnoException) => {
        const why = err.code === 'ENOENT' || err.code === 'ECONNREFUSED' ? 'is layerd running?' : err.code === 'EACCES' ? 'permission denied (root or the socket group only)' : err.message;
        reject(new LayerdError(err.code === 'EACCES' ? ErrorCodes.EINVAL : ErrorCodes.EIO, `cannot reach layerd at ${this.socketPath}: ${why}`, { socket: this.socketPath }));
      });
      req.end(payload);
    });
  }
}

const enc = encodeURIComponent;

export function socketBackend(socketPath: string): Backend {
  const client = new DaemonClient(socketPath);
  return {
    async importPath(request: ImportRequest, onProgress?: (event: ImportProgress) => void) {
      const r = await client.call<{ images: Awaited<ReturnType<Backend['importPath']>> }>(
        'POST', '/v1/images/import', request, onProgress ? (e) => onProgress(e as ImportProgress) : undefined);
      return r.images;
    },
    images: () => client.call('GET', '/v1/images'),
    layers: () => client.call('GET', '/v1/layers'),
    diskUsage: () => client.call('GET', '/v1/df'),
    inspect: (ref) => client.call('GET', `/v1/images/${enc(ref)}`),
    tag: (source, target) => client.call('POST', `/v1/images/${enc(source)}/tag`, { target }),
    removeImage: (ref, force) => client.call('DELETE', `/v1/images/${enc(ref)}${force ? '?force=1' : ''}`),
    prune: () => client.call('POST', '/v1/prune'),
    fsck: () => client.call('POST', '/v1/fsck'),
    which: (ref, path) => client.call('GET', `/v1/images/${enc(ref)}/which?path=${enc(path)}`),
    history: (ref) => client.call('GET', `/v1/images/${enc(ref)}/history`),
    commitLayerDir: (image, dir, ref) => client.call('POST', `/v1/images/${enc(image)}/commit`, { layerDir: dir, ...(ref !== undefined ? { ref } : {}) }),
    layerDiff: (ref, layer) => client.call('GET', `/v1/images/${enc(ref)}/layers/${layer}/diff`),
    tree: (ref, path, depth) => client.call('GET', `/v1/images/${enc(ref)}/tree?path=${enc(path)}${Number.isFinite(depth) ? `&depth=${depth}` : ''}`),
    efficiency: (ref) => client.call('GET', `/v1/images/${enc(ref)}/efficiency`),
    report: async (ref) => {
      const chunks: Buffer[] = [];
      const sink = new Writable({ write(chunk: Buffer, _e, cb) { chunks.push(chunk); cb(); } });
      await client.stream('GET', `/v1/images/${enc(ref)}/report`, sink);
      return Buffer.concat(chunks).toString('utf8');
    },
    close: async () => undefined,
    containers: {
      create: (request) => client.call('POST', '/v1/containers', request),
      list: () => client.call('GET', '/v1/containers'),
      inspect: (id) => client.call('GET', `/v1/containers/${enc(id)}`),
      remove: (id, keep) => client.call('DELETE', `/v1/containers/${enc(id)}${keep ? '?keep=1' : ''}`),
      commit: (id, ref) => client.call('POST', `/v1/containers/${enc(id)}/commit`, ref ? { ref } : {}),
      diff: (id) => client.call('GET', `/v1/containers/${enc(id)}/diff`),
      export: (id, out) => client.stream('GET', `/v1/containers/${enc(id)}/export`, out),
      health: () => client.call('GET', '/v1/health'),
    },
  };
}
