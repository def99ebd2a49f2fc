/** /v1/health, /metrics and /v1/openapi.json. */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HANDLED, type Router } from '../http.js';
import { type DaemonMetrics } from '../metrics.js';
import { type Store } from '../../storage/store.js';

export function systemRoutes(router: Router, store: Store, metrics: DaemonMetrics, docsDir: string, version: string): void {
  const started = Date.now();
  router.add('GET', '/v1/health', async () => ({ status: 'ok', version, root: store.layout.root, uptimeSeconds: Math.round((Date.now() - started) / 1000) }));
  router.add('GET', '/v1/openapi.json', async (ctx) => {
    const body = await readFile(join(docsDir, 'openapi.json'));
    ctx.res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length });
    ctx.res.end(body);
    return HANDLED;
  });
  router.add('GET', '/metrics', async (ctx) => {
    metrics.images.set(store.db.listImages().length);
    metrics.mounts.set(store.db.listContainers().filter((c) => c.server_pid !== null).length);
    const layers = store.db.listLayers();
    metrics.layers.set(layers.length);
    metrics.storeBytes.set(layers.reduce((n, l) => n + l.size, 0) + store.db.listBlobs().reduce((n, b) => n + b.size, 0));
    const body = await metrics.registry.metrics();
    ctx.res.writeHead(200, { 'content-type': metrics.registry.contentType });
    ctx.res.end(body);
    return HANDLED;
  });
}
