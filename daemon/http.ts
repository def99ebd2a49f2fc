/**
 * A small HTTP/1.1 + JSON framework for the daemon's Unix-socket API:
 * routing by method and path pattern, bounded JSON bodies, and one mapping
 * from layerd's error codes to HTTP statuses, so every error reaches the
 * client as `{code, message, context}` and no request can crash the daemon.
 */
import { type IncomingMessage, type ServerResponse } from 'node:http';
import { ErrorCodes, type ErrorCode, LayerdError, asLayerdError } from '../common/errors.js';
import { type Logger } from '../common/log.js';

export interface RequestContext {
  req: IncomingMessage;
  res: ServerResponse;
  params: Record<string, string>;
  query: URLSearchParams;
}

export type Handler = (ctx: RequestContext) => Promise<unknown>;

interface Route {
  method: string;
  pattern: RegExp;
  names: string[];
  handler: Handler;
}

/** A value the handler already wrote to the response itself (streams). */
export const HANDLED = Symbol('handled');

export const MAX_JSON_BODY = 1024 * 1024;

export function httpStatusFor(code: ErrorCode): number {
  switch (code) {
    case ErrorCodes.ENOTFOUND: return 404;
    case ErrorCodes.EEXIST:
    case ErrorCodes.ECONFLICT:
    case ErrorCodes.EAMBIGUOUS: return 409;
    case ErrorCodes.EBUSY: return 503;
    case ErrorCodes.EAUTH: return 502; // an upstream (registry) refused us, not the API client
    case ErrorCodes.ELIMIT: return 413;
    case ErrorCodes.ENOSPC: return 507;
    case ErrorCodes.EINVAL:
    case ErrorCodes.EBADJSON:
    case ErrorCodes.EBADTAR:
    case ErrorCodes.EDIGEST:
    case ErrorCodes.EFORMAT:
    case ErrorCodes.EPLATFORM:
    case ErrorCodes.EUNSUPPORTED: return 400;
    default: return 500;
  }
}

export class Router {
  private readonly routes: Route[] = [];

  /** `path` segments like `{id}` match one URL-encoded segment. */
  add(method: string, path: string, handler: Handler): this {
    const names: string[] = [];
    const source = path.replace(/\{(\w+)\}/g, (_m, name: string) => {
      names.push(name);
      return '([^/]+)';
    });
    this.routes.push({ method, pattern: new RegExp(`^${source}$`), names, handler });
    return this;
  }

  async dispatch(req: IncomingMessage, res: ServerResponse, logger: Logger): Promise<void> {
    const started = process.hrtime.bigint();
    try {
      const url = new URL(req.url ?? '/', 'http://layerd');
      let pathMatched = false;
      for (const route of this.routes) {
        const m = route.pattern.exec(url.pathname);
        if (!m) continue;
        pathMatched = true;
        if (route.method !== req.method) continue;
        const params: Record<string, string> = {};
        route.names.forEach((name, i) => {
          const raw = m[i + 1]!;
          let value: string;
          try {
            value = decodeURIComponent(raw);
          } catch {
            throw new LayerdError(ErrorCodes.EINVAL, `invalid URL encoding in '${raw}'`);
          }
          if (value.includes('\0')) throw new LayerdError(ErrorCodes.EINVAL, 'NUL byte in a path parameter');
          params[name] = value;
        });
        const result = await route.handler({ req, res, params, query: url.searchParams });
        if (result !== HANDLED) sendJson(res, res.statusCode, result ?? {});
        return;
      }
      if (pathMatched) throw new LayerdError(ErrorCodes.EINVAL, `method ${req.method ?? ''} not allowed on ${url.pathname}`, { status: 405 });
      throw new LayerdError(ErrorCodes.ENOTFOUND, `no such endpoint: ${req.method ?? ''} ${url.pathname}`);
    } catch (err) {
      const e = asLayerdError(err, ErrorCodes.EINTERNAL);
      const status = e.context['status'] === 405 ? 405 : httpStatusFor(e.code);
      if (status >= 500) logger.error('request failed', { method: req.method, url: req.url, code: e.code, error: e.message });
      if (!res.headersSent) sendJson(res, status, e.toJSON());
      else res.destroy();
    } finally {
      logger.debug('request', { method: req.method, url: req.url, status: res.statusCode, ms: Number(process.hrtime.bigint() - started) / 1e6 });
    }
  }
}

export function sendJson(res: ServerResponse, status: number, value: unknown): void {
  const body = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

/** Read a JSON object body of at most `limit` bytes. An empty body is `{}`. */
export async function readJsonBody(req: IncomingMessage, limit = MAX_JSON_BODY): Promise<Record<string, unknown>> {
  const declared = Number(req.headers['content-length'] ?? '0');
  if (declared > limit) {
    req.resume();
    throw new LayerdError(ErrorCodes.ELIMIT, `request body of ${declared} bytes is over the ${limit} allowed`);
  }
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw new LayerdError(ErrorCodes.ELIMIT, `request body is over the ${limit} bytes allowed`);
    chunks.push(chunk);
  }
  if (size === 0) return {};
  let value: unknown;
  try {
    value = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (err) {
    throw new LayerdError(ErrorCodes.EINVAL, `request body is not valid JSON: ${(err as Error).message}`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new LayerdError(ErrorCodes.EINVAL, 'request body must be a JSON object');
  }
  return value as Record<string, unknown>;
}

type FieldType = 'string' | 'boolean' | 'number' | 'object';

/**
 * Check a body against the fields an endpoint accepts: unknown fields and
 * wrong types are refused (EINVAL), so a typo never silently does nothing.
 */
export function checkFields<T>(body: Record<string, unknown>, spec: Record<string, { type: FieldType; required?: boolean }>): T {
  for (const key of Object.keys(body)) {
    // Own keys only: `'__proto__' in spec` is true for every object.
    if (!Object.hasOwn(spec, key)) throw new LayerdError(ErrorCodes.EINVAL, `unknown field '${key}'`, { field: key });
  }
  for (const [key, { type, required }] of Object.entries(spec)) {
    const v = body[key];
    if (v === undefined || v === null) {
      if (required) throw new LayerdError(ErrorCodes.EINVAL, `missing field '${key}'`, { field: key });
      continue;
    }
    const ok = type === 'object' ? typeof v === 'object' && !Array.isArray(v) : typeof v === type;
    if (!ok) throw new LayerdError(ErrorCodes.EINVAL, `field '${key}' must be a ${type}`, { field: key });
    if (type === 'string' && (v as string).includes('\0')) throw new LayerdError(ErrorCodes.EINVAL, `field '${key}' contains a NUL byte`, { field: key });
  }
  return body as T;
}

/** Stream newline-delimited JSON events, ending with a result or an error line. */
export function ndjson(res: ServerResponse): { event(value: unknown): void; end(value: unknown): void; fail(err: unknown): void } {
  res.writeHead(200, { 'content-type': 'application/x-ndjson' });
  return {
    event: (value) => { res.write(JSON.stringify(value) + '\n'); },
    end: (value) => { res.end(JSON.stringify({ result: value }) + '\n'); },
    fail: (err) => { res.end(JSON.stringify({ error: asLayerdError(err).toJSON() }) + '\n'); },
  };
}

export function wantsNdjson(req: IncomingMessage): boolean {
  return (req.headers['accept'] ?? '').includes('application/x-ndjson');
}
