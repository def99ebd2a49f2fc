/**
 * One HTTP conversation partner: a registry (or mirror) endpoint speaking
 * the OCI distribution API. It adds authentication (auth.ts), retries what
 * is worth retrying — connection failures and 5xx answers, with bounded
 * exponential backoff — and turns unexpected answers into typed errors
 * naming the registry, repository and digest.
 *
 * Redirects (301, 302, 303, 307, 308) are followed, at most MAX_REDIRECTS
 * in a row and never in a loop; Range and the other headers go along, the
 * registry's Authorization only to the registry's own origin (blob GETs
 * are redirected to storage hosts and CDNs that must not see it). Every
 * request has a connect and an idle timeout (timeouts.ts) and ends at once
 * when the client's signal is aborted (an overall deadline, a cancelled
 * API request); neither is retried.
 *
 * Every request and its answer are published on the diagnostics channel
 * `layerd:registry:request` ({ method, url, headers, status }), for tests
 * and tracing; nothing is logged on this hot path.
 */
import { channel } from 'node:diagnostics_channel';
import http, { type IncomingHttpHeaders, type IncomingMessage } from 'node:http';
import https from 'node:https';
import { type Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import { type Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { LayerdError } from '../../common/errors.js';
import { Authorizer } from './auth.js';
import { type Endpoint } from './config.js';
import { type RegistryErrorContext, registryError, registryErrorDetail } from './errors.js';
import { DEFAULT_TIMEOUTS, type RegistryTimeouts, isAbortCause, seconds } from './timeouts.js';

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

/** How long requests may take and what stops them (timeouts.ts). */
export interface Transfer {
  timeouts?: RegistryTimeouts;
  /** Aborted (with an AbortCause as reason) to end every request of the client at once. */
  signal?: AbortSignal;
}

/** Redirects followed in a row before giving up (Go's net/http, which docker and containerd use, allows 10). */
export const MAX_REDIRECTS = 10;
const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);
/** Headers describing a request body: dropped when a redirect turns the request into a GET. */
const BODY_HEADERS = ['content-type', 'content-length', 'content-range'];

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
  /** Where the answer came from, after redirects: relative Locations resolve against it. */
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
  readonly timeouts: RegistryTimeouts;
  readonly signal: AbortSignal | undefined;
  /** For the endpoint's own origin (with its CA); other hosts (redirect targets) get plain agents. */
  private readonly endpointAgent: http.Agent;
  private readonly otherAgents = new Map<string, http.Agent>();
  private readonly origin: string;

  constructor(readonly endpoint: Endpoint, readonly retry: RetryPolicy = DEFAULT_RETRY, transfer: Transfer = {}) {
    const tls = endpoint.baseUrl.startsWith('https:');
    this.origin = new URL(endpoint.baseUrl).origin;
    this.timeouts = transfer.timeouts ?? DEFAULT_TIMEOUTS;
    this.signal = transfer.signal;
    this.endpointAgent = tls
      ? new https.Agent({ keepAlive: true, ...(endpoint.ca ? { ca: endpoint.ca } : {}) })
      : new http.Agent({ keepAlive: true });
    this.auth = new Authorizer(endpoint.registry, endpoint.credentials, async (url, headers) => {
      const res = await this.send('GET', url, headers, undefined, { registry: this.registry });
      return { status: res.statusCode ?? 0, body: await readLimited(res, 1024 * 1024) };
    });
  }

  get registry(): string { return this.endpoint.registry; }

  close(): void {
    this.endpointAgent.destroy();
    for (const agent of this.otherAgents.values()) agent.destroy();
  }

  url(path: string): string {
    return new URL(path, this.endpoint.baseUrl + '/').toString();
  }

  /** Send a request, with authentication, redirects and retries; the body of the answer is the caller's to consume. */
  async request(spec: RequestSpec): Promise<RegistryResponse> {
    const url = this.url(spec.path);
    const context: RegistryErrorContext = { registry: this.registry, ...spec.context, url };
    let authRounds = 0;
    for (let attempt = 0; ; attempt++) {
      const authorization = this.auth.headerFor(spec.scopes);
      let res: IncomingMessage;
      let at: string;
      try {
        ({ res, url: at } = await this.follow(spec, url, authorization, context));
      } catch (err) {
        if (err instanceof LayerdError) throw err; // timeouts, cancellation, redirect loops: not worth repeating
        if (!spec.noRetry && attempt < this.retry.retries && isRetryableNetworkError(err)) {
          await this.pause(backoffDelay(this.retry, attempt), spec.method, url, context);
          continue;
        }
        throw registryError('network', `registry ${this.registry}: ${spec.method} ${url} failed: ${(err as Error).message}`, context, err);
      }
      const status = res.statusCode ?? 0;
      // Up to two authentication rounds: the first learns the scheme (and
      // fetches a token), the second tells a refused password or token apart.
      // Only the registry itself is answered so: a storage host's 401 is its own.
      if (status === 401 && authRounds < 2 && new URL(at).origin === this.origin) {
        res.resume();
        await this.auth.answer(headerValue(res.headers['www-authenticate']), spec.scopes, authorization !== undefined, at);
        authRounds++;
        attempt--; // an authentication round is not a failure
        continue;
      }
      if (spec.expect.includes(status)) return { status, headers: res.headers, url: at, body: res };
      const detail = spec.method === 'HEAD' ? '' : registryErrorDetail(await readLimited(res, 64 * 1024).catch(() => Buffer.alloc(0)));
      if (status >= 500 && !spec.noRetry && attempt < this.retry.retries) {
        await this.pause(backoffDelay(this.retry, attempt), spec.method, url, context);
        continue;
      }
      throw statusError(spec, status, detail, { ...context, url: at, status });
    }
  }

  /** A request whose whole answer body is wanted (manifests, tokens, upload replies). */
  async requestBuffer(spec: RequestSpec, maxBytes: number): Promise<{ status: number; headers: IncomingHttpHeaders; url: string; body: Buffer }> {
    const res = await this.request(spec);
    return { status: res.status, headers: res.headers, url: res.url, body: await readLimited(res.body, maxBytes, this.registry) };
  }

  /** Wait before a retry; an abort ends the wait with the abort's error. */
  async pause(ms: number, method: string, url: string, context: RegistryErrorContext): Promise<void> {
    if (this.signal?.aborted) throw this.abortedError(method, url, context);
    try {
      await sleep(ms, undefined, this.signal ? { signal: this.signal } : {});
    } catch {
      throw this.abortedError(method, url, context);
    }
  }

  /** The typed error for a request ended by the client's signal. */
  abortedError(method: string, url: string, context: RegistryErrorContext | undefined): LayerdError {
    const cause: unknown = this.signal?.reason;
    const ctx = { registry: this.registry, ...context, url };
    if (isAbortCause(cause) && cause.kind === 'deadline') {
      return registryError('timeout', `registry ${this.registry}: ${method} ${url}: over the overall time limit of ${seconds(cause.ms)}`, ctx);
    }
    const why = isAbortCause(cause) && cause.kind === 'cancelled' ? cause.why : 'cancelled';
    return registryError('cancelled', `registry ${this.registry}: ${method} ${url}: cancelled (${why})`, ctx);
  }

  /** One request and the redirects it is answered with. */
  private async follow(spec: RequestSpec, start: string, authorization: string | undefined, context: RegistryErrorContext): Promise<{ res: IncomingMessage; url: string }> {
    let method: string = spec.method;
    let body = spec.body;
    let target = start;
    const visited = new Set<string>([start]);
    for (let hops = 0; ; hops++) {
      const headers: Record<string, string> = { ...spec.headers };
      if (!body && method !== spec.method) for (const h of BODY_HEADERS) delete headers[h];
      if (authorization && new URL(target).origin === this.origin) headers['authorization'] = authorization;
      const res = await this.send(method, target, headers, body, context);
      const status = res.statusCode ?? 0;
      const location = headerValue(res.headers.location);
      if (!REDIRECT_STATUSES.has(status) || spec.expect.includes(status) || !location) return { res, url: target };
      res.resume();
      const redirectContext = { ...context, url: start, status };
      let next: URL;
      try {
        next = new URL(location, target);
      } catch {
        throw registryError('protocol', `registry ${this.registry}: ${spec.method} ${start}: redirected to an invalid Location '${location}'`, redirectContext);
      }
      if (next.protocol !== 'http:' && next.protocol !== 'https:') {
        throw registryError('protocol', `registry ${this.registry}: ${spec.method} ${start}: redirected to a ${next.protocol} URL`, redirectContext);
      }
      if (visited.has(next.toString())) {
        throw registryError('redirects', `registry ${this.registry}: ${spec.method} ${start}: redirect loop (back to ${next.toString()} after ${hops + 1} redirects)`, redirectContext);
      }
      if (hops + 1 > MAX_REDIRECTS) {
        throw registryError('redirects', `registry ${this.registry}: ${spec.method} ${start}: more than ${MAX_REDIRECTS} redirects (the last to ${next.toString()})`, redirectContext);
      }
      visited.add(next.toString());
      // As browsers and Go do: 303, and 301/302 of anything but GET/HEAD, go on as a GET without the body.
      if ((status === 303 && method !== 'HEAD') || ((status === 301 || status === 302) && method !== 'GET' && method !== 'HEAD')) {
        method = 'GET';
        body = undefined;
      }
      target = next.toString();
    }
  }

  private agentFor(target: URL): http.Agent {
    if (target.origin === this.origin) return this.endpointAgent;
    let agent = this.otherAgents.get(target.protocol);
    if (!agent) {
      agent = target.protocol === 'https:' ? new https.Agent({ keepAlive: true }) : new http.Agent({ keepAlive: true });
      this.otherAgents.set(target.protocol, agent);
    }
    return agent;
  }

  /**
   * One HTTP exchange, watched: no connected socket within the connect
   * timeout, or no byte either way for the idle timeout (while the body is
   * being read too), or an abort of the client's signal destroys the
   * request and its answer with a typed error.
   */
  private send(method: string, url: string, headers: Record<string, string>, body: RequestSpec['body'], context: RegistryErrorContext | undefined): Promise<IncomingMessage> {
    const target = new URL(url);
    const lib = target.protocol === 'https:' ? https : http;
    const event: RequestEvent = { method, url, headers: redact(headers), status: undefined };
    const { connectMs, idleMs } = this.timeouts;
    const signal = this.signal;
    const ctx = { registry: this.registry, ...context, url };
    return new Promise<IncomingMessage>((resolve, reject) => {
      if (signal?.aborted) {
        reject(this.abortedError(method, url, context));
        return;
      }
      const req = lib.request(target, { method, headers: { ...headers, ...(body ? { 'content-length': String(body.length) } : {}) }, agent: this.agentFor(target) });
      let res: IncomingMessage | undefined;
      let idleTimer: NodeJS.Timeout | undefined;
      let connectTimer: NodeJS.Timeout | undefined = setTimeout(() => {
        fail(registryError('timeout', `registry ${this.registry}: ${method} ${url}: no connection within ${seconds(connectMs)} (connect timeout)`, ctx));
      }, connectMs);
      const onAbort = (): void => fail(this.abortedError(method, url, context));
      signal?.addEventListener('abort', onAbort, { once: true });
      const finish = (): void => {
        clearTimeout(connectTimer);
        clearInterval(idleTimer);
        signal?.removeEventListener('abort', onAbort);
      };
      const fail = (err: LayerdError): void => {
        finish();
        res?.destroy(err);
        req.destroy(err);
      };
      const watchIdle = (socket: Socket): void => {
        clearTimeout(connectTimer);
        connectTimer = undefined;
        let bytes = socket.bytesRead + socket.bytesWritten;
        let lastProgress = Date.now();
        idleTimer = setInterval(() => {
          if (res?.complete) {
            clearInterval(idleTimer); // all received: only our consumer is left, however slow
            return;
          }
          const now = socket.bytesRead + socket.bytesWritten;
          // Bytes our consumer has not taken yet: the stall is ours, not the registry's.
          if (now !== bytes || (res?.readableLength ?? 0) > 0) {
            bytes = now;
            lastProgress = Date.now();
          } else if (Date.now() - lastProgress >= idleMs) {
            fail(registryError('timeout', `registry ${this.registry}: ${method} ${url}: nothing received for ${seconds(idleMs)} (idle timeout)`, ctx));
          }
        }, Math.max(10, Math.min(1000, idleMs / 4)));
      };
      req.on('socket', (socket: Socket) => {
        if (!socket.connecting) watchIdle(socket);
        else socket.once(socket instanceof TLSSocket ? 'secureConnect' : 'connect', () => watchIdle(socket));
      });
      req.on('response', (answer) => {
        res = answer;
        answer.on('end', finish);
        answer.on('close', finish);
        event.status = answer.statusCode;
        if (requestChannel.hasSubscribers) requestChannel.publish(event);
        resolve(answer);
      });
      req.on('error', (err) => {
        finish();
        if (res) return; // the answer's consumer sees it
        event.error = (err as { code?: string }).code ?? err.message;
        if (requestChannel.hasSubscribers) requestChannel.publish(event);
        reject(err);
      });
      if (!body) req.end();
      else if (Buffer.isBuffer(body)) req.end(body);
      else {
        const stream = body.open();
        stream.on('error', (err) => req.destroy(err));
        req.on('close', () => stream.destroy());
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
