/**
 * Prometheus metrics (prom-client), one registry per daemon.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export class DaemonMetrics {
  readonly registry = new Registry();
  readonly requests = new Counter({
    name: 'layerd_api_requests_total', help: 'API requests by method, route and status',
    labelNames: ['method', 'status'] as const, registers: [this.registry],
  });
  readonly importBytes = new Counter({
    name: 'layerd_import_bytes_total', help: 'Compressed bytes read by imports', registers: [this.registry],
  });
  readonly images = new Gauge({ name: 'layerd_images', help: 'Images in the store', registers: [this.registry] });
  readonly layers = new Gauge({ name: 'layerd_layers', help: 'Layers in the store', registers: [this.registry] });
  readonly storeBytes = new Gauge({ name: 'layerd_store_bytes', help: 'Bytes of layer tars and blobs in the store', registers: [this.registry] });
  readonly mounts = new Gauge({ name: 'layerd_mounts', help: 'Container mounts being served', registers: [this.registry] });
  readonly fuseOps = new Counter({
    name: 'layerd_fuse_operations_total', help: 'FUSE operations served, by operation',
    labelNames: ['op'] as const, registers: [this.registry],
  });
  readonly fuseLatency = new Histogram({
    name: 'layerd_fuse_operation_seconds', help: 'FUSE operation latency, by operation',
    labelNames: ['op'] as const, buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1],
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'layerd_' });
  }
}
