/**
 * One HTTP conversation partner: a registry (or mirror) endpoint speaking
 * the OCI distribution API. It adds authentication (auth.ts), retries what
 * is worth retrying — connection failures and 5xx answers, with bounded
 * exponential backoff — and turns unexpected answers into typed errors
 * naming the registry, repository and digest.
 *
 * Every request and its answer are published on the diagnostics channel
 * `layerd:registry:request` ({ method, url, headers, status }), for tests
 * and tracing; nothing is logged on this hot path.
 */
import { channel } from 'node:diagnostics_channel';
import http, { type IncomingHttpHeaders, type IncomingMessage } from 'node:http';
import https from 'node:https';
import { type Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { LayerdError } from '../../common/errors.js';
import { Authorizer } from './auth.js';
import { type Endpoint } from './config.js';
import { type RegistryErrorContext, registryError, registryErrorDetail } from './errors.js';

export const REQUEST_CHANNEL = 'layerd:registry:request';
const requestChannel = channel(REQUEST_CHANNEL);

export interface RequestEvent {
  method: string;
  url: string;
  headers: Record<string, string>;
  status: number | undefined;
  error?: string;
}

export interface RetryPolicy {
  /** Attempts after the first one. */
  retries: number;
  /** Delay before the first retry; doubles each time. */
  backoffMs: number;
  maxBackoffMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { retries: 5, backoffMs: 200, maxBackoffMs: 5_000 };

export type Method = 'GET' | 'HEAD' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

export interface RequestSpec {
  method: Method;
  /** `/v2/...` relative to the endpoint, or an absolute URL (upload Locations). */
  path: string;
  headers?: Record<string, string>;
  /** A body that can be sent again on a retry. */
  body?: Buffer | { length: number; open: () => Readable };
  /** Token scopes the request needs (`repository:NAME:pull`). */
  scopes: readonly string[];
  /** Statuses returned to the caller; others become errors. */
  expect: readonly number[];
  /** For error messages and context. */
  context?: Omit<RegistryErrorContext, 'registry'>;
  /** Never resend (a PATCH that may have been applied); the caller recovers. */
  noRetry?: boolean;
}

export interface RegistryResponse {
  status: number;
  headers: IncomingHttpHeaders;
  url: string;
  body: IncomingMessage;
}

const RETRYABLE_ERRNO = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'ECONNABORTED', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'UND_ERR_SOCKET']);

export function isRetryableNetworkError(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string' && RETRYABLE_ERRNO.has(code)) return true;
  const message = err instanceof Error ? err.message : '';
  return /socket hang up|aborted|premature close/i.test(message);
}

export function backoffDelay(policy: RetryPolicy, attempt: number): number {
  return Math.min(policy.maxBackoffMs, policy.backoffMs * 2 ** attempt);
}

export class RegistryClient {
  readonly auth: Authorizer;
  private readonly agent: http.Agent;

  constructor(readonly endpoint: Endpoint, readonly retry: RetryPolicy = DEFAULT_RETRY) {
    const tls = endpoint.baseUrl.startsWith('https:');
    this.agent = tls
      ? new https.Agent({ keepAlive: true, ...(endpoint.ca ? { ca: endpoint.ca } : {}) })
      : new http.Agent({ keepAlive: true });
    this.auth = new Authorizer(endpoint.registry, endpoint.credentials, async (url, headers) => {
      const res = await this.send('GET', url, headers, undefined);
      return { status: res.statusCode ?? 0, body: await readLimited(res, 1024 * 1024) };
    });
  }

  get registry(): string { return this.endpoint.registry; }

  close(): void {
    this.agent.destroy();
  }

  url(path: string): string {
    return new URL(path, this.endpoint.baseUrl + '/').toString();
  }

  /** Send a request, with authentication and retries; the body of the answer is the caller's to consume. */
  async request(spec: RequestSpec): Promise<RegistryResponse> {
    const url = this.url(spec.path);
    const context: RegistryErrorContext = { registry: this.registry, ...spec.context, url };
    let authRounds = 0;
    for (let attempt = 0; ; attempt++) {
      const headers: Record<string, string> = { ...spec.headers };
      const authorization = this.auth.headerFor(spec.scopes);
      if (authorization) headers['authorization'] = authorization;
      let res: IncomingMessage;
      try {
        res = await this.send(spec.method, url, headers, spec.body);
      } catch (err) {
        if (!spec.noRetry && attempt < this.retry.retries && isRetryableNetworkError(err)) {
          await sleep(backoffDelay(this.retry, attempt));
          continue;
        }
        if (err instanceof LayerdError) throw err;
        throw registryError('network', `registry ${this.registry}: ${spec.method} ${url} failed: ${(err as Error).message}`, context, err);
      }
      const status = res.statusCode ?? 0;
      // Up to two authentication rounds: the first learns the scheme (and
      // fetches a token), the second tells a refused password or token apart.
      if (status === 401 && authRounds < 2) {
        res.resume();
        await this.auth.answer(headerValue(res.headers['www-authenticate']), spec.scopes, authorization !== undefined, url);
        authRounds++;
        attempt--; // an authentication round is not a failure
        continue;
      }
      if (spec.expect.includes(status)) return { status, headers: res.headers, url, body: res };
      const detail = spec.method === 'HEAD' ? '' : registryErrorDetail(await readLimited(res, 64 * 1024).catch(() => Buffer.alloc(0)));
      if (status >= 500 && !spec.noRetry && attempt < this.retry.retries) {
        await sleep(backoffDelay(this.retry, attempt));
        continue;
      }
      throw statusError(spec, status, detail, { ...context, status });
    }
  }

  /** A request whose whole answer body is wanted (manifests, tokens, upload replies). */
  async requestBuffer(spec: RequestSpec, maxBytes: number): Promise<{ status: number; headers: IncomingHttpHeaders; body: Buffer }> {
    const res = await this.request(spec);
    return { status: res.status, headers: res.headers, body: await readLimited(res.body, maxBytes, this.registry) };
  }

  private send(method: string, url: string, headers: Record<string, string>, body: RequestSpec['body']): Promise<IncomingMessage> {
    const target = new URL(url);
    const lib = target.protocol === 'https:' ? https : http;
    const event: RequestEvent = { method, url, headers: redact(headers), status: undefined };
    return new Promise<IncomingMessage>((resolve, reject) => {
      const req = lib.request(target, { method, headers: { ...headers, ...(body ? { 'content-length': String(body.length) } : {}) }, agent: this.agent });
      req.on('response', (res) => {
        event.status = res.statusCode;
        if (requestChannel.hasSubscribers) requestChannel.publish(event);
        resolve(res);
      });
      req.on('error', (err) => {
        event.error = (err as { code?: string }).code ?? err.message;
        if (requestChannel.hasSubscribers) requestChannel.publish(event);
        reject(err);
      });
      if (!body) req.end();
      else if (Buffer.isBuffer(body)) req.end(body);
      else {
        const stream = body.open();
        stream.on('error', (err) => req.destroy(err));
        stream.pipe(req);
      }
    });
  }
}

function statusError(spec: RequestSpec, status: number, detail: string, context: RegistryErrorContext): LayerdError {
  const what = `${spec.method} ${context.url ?? spec.path}`;
  const suffix = detail ? `: ${detail}` : '';
  if (status === 401) return registryError('unauthorized', `registry ${context.registry}: ${what}: authentication failed${suffix}`, context);
  if (status === 403) return registryError('denied', `registry ${context.registry}: ${what}: access denied${suffix}`, context);
  if (status === 404) return registryError('not-found', `registry ${context.registry}: ${what}: not found${suffix}`, context);
  if (status >= 500) return registryError('server', `registry ${context.registry}: ${what}: server error ${status}${suffix}`, context);
  return registryError('protocol', `registry ${context.registry}: ${what}: unexpected status ${status}${suffix}`, context);
}

export function headerValue(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v;
}

function redact(headers: Record<string, string>): Record<string, string> {
  const out = { ...headers };
  if (out['authorization']) out['authorization'] = out['authorization'].replace(/ .*/, ' <redacted>');
  return out;
}

/** Read a whole (small) body, refusing more than `maxBytes`. */
export async function readLimited(res: Readable, maxBytes: number, registry = ''): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const chunk of res) {
    n += (chunk as Buffer).length;
    if (n > maxBytes) {
      res.destroy();
      throw registryError('protocol', `registry ${registry}: answer larger than ${maxBytes} bytes`, { registry });
    }
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks);
}
