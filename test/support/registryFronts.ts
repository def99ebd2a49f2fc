/**
 * Small HTTP servers on 127.0.0.1 (port 0, bound by themselves) that stand
 * in front of a real registry and behave as real registries' surroundings
 * do: a front that requires a password and redirects manifest and blob
 * GETs to a separate storage host (as Docker Hub, ECR, GCR, GHCR and
 * S3-backed distribution do), a storage host that serves them, a server
 * that accepts connections and never answers, and fronts that hang or drip
 * one blob. Each records what it saw, so tests can assert where an
 * Authorization header went and when a connection was closed by layerd.
 */
import http, { type IncomingMessage, type OutgoingHttpHeaders, type ServerResponse } from 'node:http';
import { type Socket, createServer as createNetServer } from 'node:net';
import { listenLoopback } from './loopback.js';

export interface SeenRequest {
  method: string;
  url: string;
  authorization: string | undefined;
  range: string | undefined;
}

export interface TestServer {
  /** `127.0.0.1:PORT` */
  host: string;
  seen: SeenRequest[];
  close(): Promise<void>;
}

async function serve(handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<TestServer> {
  const seen: SeenRequest[] = [];
  const server = http.createServer((req, res) => {
    seen.push({ method: req.method ?? '', url: req.url ?? '', authorization: req.headers.authorization, range: req.headers.range });
    handler(req, res);
  });
  const { host, close } = await listenLoopback(server);
  return { host, seen, close };
}

interface ForwardOptions {
  /** Change the upstream answer's Location. */
  location?: (location: string) => string;
  /** Break the connection after this many body bytes. */
  cutAfter?: number;
}

/** Pass a request on to `upstream` (Host unchanged, so the registry's Locations point back here). */
function forward(req: IncomingMessage, res: ServerResponse, upstream: string, options: ForwardOptions = {}): void {
  const [host, port] = upstream.split(':') as [string, string];
  const up = http.request({ host, port: Number(port), method: req.method, path: req.url, headers: req.headers }, (answer) => {
    const headers: OutgoingHttpHeaders = { ...answer.headers };
    if (typeof headers.location === 'string' && options.location) headers.location = options.location(headers.location);
    res.writeHead(answer.statusCode ?? 502, headers);
    const cutAfter = options.cutAfter;
    if (cutAfter === undefined) {
      answer.pipe(res);
      return;
    }
    let sent = 0;
    answer.on('data', (chunk: Buffer) => {
      if (sent + chunk.length >= cutAfter) {
        answer.destroy();
        res.write(chunk.subarray(0, cutAfter - sent), () => res.socket?.destroy());
        sent = cutAfter;
        return;
      }
      sent += chunk.length;
      if (!res.write(chunk)) {
        answer.pause();
        res.once('drain', () => answer.resume());
      }
    });
    answer.on('end', () => res.end());
  });
  up.on('error', () => res.destroy());
  req.pipe(up);
}

const BLOB_OR_MANIFEST = /^\/v2\/.+\/(manifests\/[^/?]+|blobs\/sha256:[0-9a-f]{64})(\?.*)?$/;

export interface StorageHost extends TestServer {
  /** Break the first GET of `digest` after `bytes` bytes (a resume with Range must follow). */
  cutOnce(digest: string, bytes: number): void;
}

/** The "storage host" blobs and manifests are redirected to: serves them from the registry, honouring Range. */
export async function startStorageHost(registryHost: string): Promise<StorageHost> {
  const cuts = new Map<string, number>();
  const server = await serve((req, res) => {
    const digest = /\/blobs\/(sha256:[0-9a-f]{64})/.exec(req.url ?? '')?.[1];
    const cutAfter = req.method === 'GET' && digest ? cuts.get(digest) : undefined;
    if (cutAfter !== undefined) cuts.delete(digest!);
    forward(req, res, registryHost, cutAfter !== undefined ? { cutAfter } : {});
  });
  return { ...server, cutOnce: (digest, bytes) => { cuts.set(digest, bytes); } };
}

export interface RedirectingFront extends TestServer {
  /** The redirect statuses answered, in order. */
  statuses: number[];
}

/**
 * A registry front requiring Basic auth (`username:password`) for every
 * request. Manifest and blob GETs and HEADs are answered with 307, 302, 301
 * and 308 in turn, to the same path on `storage`; upload sessions get an
 * absolute Location on `storage`; everything else is passed to the registry.
 */
export async function startRedirectingFront(registryHost: string, storage: TestServer, username: string, password: string): Promise<RedirectingFront> {
  const expected = `Basic ${Buffer.from(`${username}:${password}`).toString('base64')}`;
  const cycle = [307, 302, 301, 308];
  const statuses: number[] = [];
  const server = await serve((req, res) => {
    if (req.headers.authorization !== expected) {
      res.writeHead(401, { 'www-authenticate': 'Basic realm="front"', 'content-type': 'application/json' })
        .end('{"errors":[{"code":"UNAUTHORIZED","message":"password please"}]}');
      return;
    }
    if ((req.method === 'GET' || req.method === 'HEAD') && BLOB_OR_MANIFEST.test(req.url ?? '')) {
      const status = cycle[statuses.length % cycle.length]!;
      statuses.push(status);
      res.writeHead(status, { location: `http://${storage.host}${req.url ?? ''}` }).end();
      return;
    }
    const uploadStart = req.method === 'POST' && /\/blobs\/uploads\/(\?.*)?$/.test(req.url ?? '');
    forward(req, res, registryHost, uploadStart ? {
      location: (location) => {
        const url = new URL(location, `http://${req.headers.host ?? ''}`);
        url.host = storage.host;
        return url.toString();
      },
    } : {});
  });
  return { ...server, statuses };
}

/**
 * Answers manifest GETs of repository `loop` with a 302 to the same URL, and
 * those of `chain` with a 307 to a new URL every time (never the same one).
 */
export async function startLoopingServer(): Promise<TestServer> {
  return serve((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    if (url.pathname === '/v2/loop/x/manifests/latest') {
      res.writeHead(302, { location: req.url }).end();
    } else if (url.pathname.startsWith('/v2/chain/x/manifests/latest')) {
      const hop = Number(url.searchParams.get('hop') ?? '0') + 1;
      res.writeHead(307, { location: `/v2/chain/x/manifests/latest?hop=${hop}` }).end();
    } else {
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}');
    }
  });
}

export interface SilentServer {
  host: string;
  /** Connections accepted so far. */
  connections: number;
  close(): Promise<void>;
}

/** A TCP server that accepts connections and never sends a byte. */
export async function startSilentServer(): Promise<SilentServer> {
  const sockets = new Set<Socket>();
  const server = createNetServer((socket) => {
    state.connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    socket.resume(); // read and ignore the request
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  const state: SilentServer = {
    host: `127.0.0.1:${port}`,
    connections: 0,
    close: () => new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
  return state;
}

export interface FaultyFront extends TestServer {
  /** GETs of the faulty blob that started. */
  faultStarted: number;
  /** Of those, the ones whose connection layerd closed. */
  faultClosed: number;
}

/**
 * Passes everything to the registry except the requests `faulty` picks
 * (by default GETs of blob `digest`), which it either never answers
 * ('hang') or answers with the blob's size and then one byte a second
 * ('drip').
 */
export async function startFaultyFront(
  registryHost: string, digest: string, mode: 'hang' | 'drip', size: number,
  faulty: (req: IncomingMessage) => boolean = (req) => req.method === 'GET' && (req.url ?? '').endsWith(`/blobs/${digest}`),
): Promise<FaultyFront> {
  const timers = new Set<NodeJS.Timeout>();
  const state = { faultStarted: 0, faultClosed: 0 };
  const server = await serve((req, res) => {
    if (!faulty(req)) {
      forward(req, res, registryHost);
      return;
    }
    state.faultStarted++;
    res.on('close', () => { state.faultClosed++; });
    if (mode === 'hang') {
      req.resume(); // take an upload's body, answer nothing
      return;
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(size) });
    const timer = setInterval(() => res.write(Buffer.alloc(1)), 1000);
    timers.add(timer);
    res.on('close', () => { clearInterval(timer); timers.delete(timer); });
  });
  return {
    host: server.host,
    seen: server.seen,
    get faultStarted() { return state.faultStarted; },
    get faultClosed() { return state.faultClosed; },
    close: async () => {
      for (const t of timers) clearInterval(t);
      await server.close();
    },
  };
}

/** Poll `condition` every 50 ms until it holds; fail after `timeoutMs` naming `what`. */
export async function waitFor(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await condition()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A descriptor as the referrers API lists it. */
export interface ReferrerDescriptor {
  mediaType: string;
  digest: string;
  size: number;
  artifactType?: string;
  annotations?: Record<string, string>;
}

export interface ReferrersFront extends TestServer {
  /** Subjects whose manifests with a `subject` the front answered with OCI-Subject. */
  subjectsProcessed: string[];
  /** What `GET /v2/<name>/referrers/<subject>` answers from now on, instead of what was pushed. */
  forge(name: string, subject: string, referrers: ReferrerDescriptor[]): void;
}

const REFERRERS = /^\/v2\/(.+)\/referrers\/([^/?]+)(\?.*)?$/;
const MANIFEST_PUT = /^\/v2\/(.+)\/manifests\/[^/?]+$/;
const OCI_INDEX_TYPE = 'application/vnd.oci.image.index.v1+json';

/**
 * The referrers API of the OCI distribution spec 1.1 in front of a registry
 * that has none (docker-registry 2.8): manifest PUTs go through; those with a
 * `subject` the registry accepted are remembered and answered with
 * `OCI-Subject: <subject digest>`, as a registry with the API answers them.
 * `GET /v2/<name>/referrers/<digest>[?artifactType=T]` is answered with an
 * image index of those manifests' descriptors (artifactType: the manifest's,
 * else its config's media type; annotations), filtered by `artifactType`
 * (`OCI-Filters-Applied: artifactType`); an unknown subject lists nothing
 * (200, never 404). Everything else is passed through unchanged.
 */
export async function startReferrersFront(registryHost: string): Promise<ReferrersFront> {
  const pushed = new Map<string, ReferrerDescriptor[]>();
  const forged = new Map<string, ReferrerDescriptor[]>();
  const subjectsProcessed: string[] = [];
  const [host, port] = registryHost.split(':') as [string, string];
  const server = await serve((req, res) => {
    const url = req.url ?? '';
    const referrers = req.method === 'GET' ? REFERRERS.exec(url) : null;
    if (referrers) {
      const [, name, subject, query] = referrers as unknown as [string, string, string, string | undefined];
      if (!/^sha256:[0-9a-f]{64}$/.test(subject)) {
        res.writeHead(400, { 'content-type': 'application/json' }).end('{"errors":[{"code":"DIGEST_INVALID","message":"bad digest"}]}');
        return;
      }
      const artifactType = new URLSearchParams(query?.slice(1) ?? '').get('artifactType');
      const key = `${name}@${subject}`;
      const all = forged.get(key) ?? pushed.get(key) ?? [];
      const manifests = artifactType === null ? all : all.filter((d) => d.artifactType === artifactType);
      res.writeHead(200, { 'content-type': OCI_INDEX_TYPE, ...(artifactType !== null ? { 'oci-filters-applied': 'artifactType' } : {}) })
        .end(JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX_TYPE, manifests }));
      return;
    }
    const put = req.method === 'PUT' ? MANIFEST_PUT.exec(url) : null;
    if (!put) {
      forward(req, res, registryHost);
      return;
    }
    // A manifest: read it whole, pass it on, and list it if the registry took it and it has a subject.
    const parts: Buffer[] = [];
    req.on('data', (c: Buffer) => parts.push(c));
    req.on('end', () => {
      const body = Buffer.concat(parts);
      const up = http.request({ host, port: Number(port), method: 'PUT', path: url, headers: req.headers }, (answer) => {
        const headers: OutgoingHttpHeaders = { ...answer.headers };
        let doc: { mediaType?: string; artifactType?: string; config?: { mediaType?: string }; subject?: { digest?: string }; annotations?: Record<string, string> } = {};
        try {
          doc = JSON.parse(body.toString('utf8')) as typeof doc;
        } catch {
          // not JSON: the registry says what it thinks of it
        }
        const subject = doc.subject?.digest;
        const digest = answer.headers['docker-content-digest'];
        if (answer.statusCode === 201 && typeof subject === 'string' && typeof digest === 'string') {
          const key = `${put[1]!}@${subject}`;
          const artifactType = doc.artifactType ?? doc.config?.mediaType;
          const descriptor: ReferrerDescriptor = {
            mediaType: doc.mediaType ?? String(req.headers['content-type'] ?? ''), digest, size: body.length,
            ...(artifactType !== undefined ? { artifactType } : {}), ...(doc.annotations ? { annotations: doc.annotations } : {}),
          };
          pushed.set(key, [...(pushed.get(key) ?? []).filter((d) => d.digest !== digest), descriptor]);
          subjectsProcessed.push(subject);
          headers['oci-subject'] = subject;
        }
        res.writeHead(answer.statusCode ?? 502, headers);
        answer.pipe(res);
      });
      up.on('error', () => res.destroy());
      up.end(body);
    });
  });
  return {
    ...server,
    subjectsProcessed,
    forge: (name, subject, referrers) => { forged.set(`${name}@${subject}`, referrers); },
  };
}
