/**
 * An HTTP relay on 127.0.0.1 in front of a plain-HTTP registry that throttles
 * every answer body to one shared rate, as a single network link would: all
 * connections draw from one pacing clock in slices of SLICE bytes, in the order
 * they ask, so a background download and on-demand range requests share the
 * link fairly. It counts what it relays (all bytes; bytes of blob answers to
 * a closed Range `bytes=a-b`, as lazy chunk reads ask) so a benchmark can say
 * what was fetched before a given moment.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { listenLoopback } from '../test/support/loopback.js';

const SLICE = 16 * 1024;

export interface RelayCounters {
  /** Body bytes of every answer. */
  bytes: number;
  /** Body bytes of blob answers to a closed range (`bytes=a-b`). */
  rangeBytes: number;
  /** Blob requests with a closed range. */
  rangeRequests: number;
}

export interface ThrottledRelay {
  host: string;
  /** Live counters (copy them to snapshot). */
  readonly counters: RelayCounters;
  close(): Promise<void>;
}

/** Pacing of one link: `take(n)` resolves when n more bytes may leave at `bytesPerSecond`. */
class Pacer {
  private nextFree = 0;

  constructor(private readonly bytesPerSecond: number) {}

  async take(n: number): Promise<void> {
    const now = performance.now();
    const start = Math.max(now, this.nextFree);
    this.nextFree = start + (n / this.bytesPerSecond) * 1000;
    const wait = this.nextFree - now;
    if (wait >= 1) await sleep(wait);
  }
}

/** Until `res` can take more, or is gone. */
function drainOrClose(res: ServerResponse): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => { res.off('drain', done); res.off('close', done); resolve(); };
    res.on('drain', done);
    res.on('close', done);
  });
}

function isClosedBlobRange(req: IncomingMessage): boolean {
  return (req.url ?? '').includes('/blobs/') && /^bytes=\d+-\d+$/.test(req.headers.range ?? '');
}

export async function startThrottledRelay(upstreamHost: string, bytesPerSecond: number): Promise<ThrottledRelay> {
  const [upHost, upPort] = upstreamHost.split(':') as [string, string];
  const pacer = new Pacer(bytesPerSecond);
  const counters: RelayCounters = { bytes: 0, rangeBytes: 0, rangeRequests: 0 };
  const server = http.createServer((req, res) => {
    const ranged = isClosedBlobRange(req);
    if (ranged) counters.rangeRequests++;
    const upstream = http.request({ host: upHost, port: Number(upPort), method: req.method, path: req.url, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers);
      void (async () => {
        try {
          for await (const chunk of up as AsyncIterable<Buffer>) {
            for (let at = 0; at < chunk.length; at += SLICE) {
              if (res.destroyed) { up.destroy(); return; }
              const slice = chunk.subarray(at, at + SLICE);
              await pacer.take(slice.length);
              counters.bytes += slice.length;
              if (ranged) counters.rangeBytes += slice.length;
              if (!res.write(slice)) await drainOrClose(res);
            }
          }
          res.end();
        } catch {
          res.destroy();
        }
      })();
    });
    upstream.on('error', () => { if (!res.headersSent) res.statusCode = 502; res.destroy(); });
    res.on('close', () => upstream.destroy());
    req.pipe(upstream);
  });
  const { host, close } = await listenLoopback(server);
  return { host, counters, close };
}
