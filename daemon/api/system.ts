/** /v1/health, /metrics and /v1/openapi.json. */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HANDLED, type Router } from '../http.js';
import { type DaemonMetrics } from '../metrics.js';
import { type Store } from '../../storage/store.js';
import { type LazyStats, sumLazyStats } from '../../storage/lazy/lazyLayer.js';
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

/** Counters of lazy reads, summed over every process that served a lazy layer (storage/lazy/lazyLayer.ts). */
function lazyMetricsText(stats: LazyStats): string {
  const counter = (name: string, help: string, value: number): string => `# HELP ${name} ${help}\n# TYPE ${name} counter\n${name} ${value}\n`;
  return counter('layerd_lazy_fetched_bytes_total', 'Compressed bytes fetched by reads of lazily pulled layers', stats.fetchedBytes)
    + counter('layerd_lazy_range_requests_total', 'Range requests made by reads of lazily pulled layers', stats.rangeRequests)
    + counter('layerd_lazy_read_stalls_total', 'Chunk reads of lazily pulled layers that had to wait for the registry', stats.stalls)
    + counter('layerd_lazy_verify_failures_total', 'Fetched chunks that did not match their TOC digest', stats.verifyFailures)
    + counter('layerd_lazy_prefetch_requests_total', 'Background prefetch range requests (landmark and read-ahead) of lazily pulled layers', stats.prefetchRequests)
    + counter('layerd_lazy_prefetched_chunks_total', 'Chunks the background prefetch verified and cached', stats.prefetchedChunks);
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
    metrics.lazyLayers.reset();
    for (const state of ['lazy', 'filling', 'broken'] as const) metrics.lazyLayers.set({ state }, 0);
    for (const l of store.db.listLazyLayers()) metrics.lazyLayers.inc({ state: l.state });
    const lazy = await sumLazyStats(store.layout.lazyStatsDir);
    const body = (await metrics.registry.metrics()) + fuseMetricsText(await fuseStats()) + lazyMetricsText(lazy);
    ctx.res.writeHead(200, { 'content-type': metrics.registry.contentType });
    ctx.res.end(body);
    return HANDLED;
  });
}
