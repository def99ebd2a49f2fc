/** /v1/health, /metrics and /v1/openapi.json. */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HANDLED, type Router } from '../http.js';
import { type DaemonMetrics } from '../metrics.js';
import { type Store } from '../../storage/store.js';
import { LATENCY_BUCKETS, type OpStatsSnapshot } from '../../mount/opStats.js';

/** Prometheus text for the FUSE operations of all mount servers (they run in other processes). */
function fuseMetricsText(stats: OpStatsSnapshot): string {
  const ops = Object.keys(stats).sort();
  const lines = [
    '# HELP layerd_fuse_operations_total FUSE operations served by all mounts, by operation',
    '# TYPE layerd_fuse_operations_total counter',
    ...ops.map((op) => `layerd_fuse_operations_total{op="${op}"} ${stats[op]!.count}`),
    '# HELP layerd_fuse_operation_seconds FUSE operation latency of all mounts, by operation',
    '# TYPE layerd_fuse_operation_seconds histogram',
  ];
  for (const op of ops) {
    const c = stats[op]!;
    LATENCY_BUCKETS.forEach((le, i) => lines.push(`layerd_fuse_operation_seconds_bucket{op="${op}",le="${le}"} ${c.buckets[i] ?? 0}`));
    lines.push(`layerd_fuse_operation_seconds_bucket{op="${op}",le="+Inf"} ${c.count}`);
    lines.push(`layerd_fuse_operation_seconds_sum{op="${op}"} ${c.sumSeconds}`);
    lines.push(`layerd_fuse_operation_seconds_count{op="${op}"} ${c.count}`);
  }
  return lines.join('\n') + '\n';
}

export function systemRoutes(
  router: Router, store: Store, metrics: DaemonMetrics, docsDir: string, version: string, fuseStats: () => Promise<OpStatsSnapshot>,
  hostMemory: () => Promise<{ hosts: number; residentBytes: number }>,
): void {
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
    const memory = await hostMemory();
    metrics.mountHosts.set(memory.hosts);
    metrics.mountHostsRss.set(memory.residentBytes);
    const body = (await metrics.registry.metrics()) + fuseMetricsText(await fuseStats());
    ctx.res.writeHead(200, { 'content-type': metrics.registry.contentType });
    ctx.res.end(body);
    return HANDLED;
  });
}
