/**
 * Prometheus metrics (prom-client), one registry per daemon.
 */
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';

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
  readonly mountHosts = new Gauge({ name: 'layerd_mount_hosts', help: 'Mount host processes of this store (the spare included)', registers: [this.registry] });
  readonly mountHostsRss = new Gauge({
    name: 'layerd_mount_hosts_resident_bytes', help: 'Resident memory of the mount host processes (the spare included)', registers: [this.registry],
  });
  readonly lazyLayers = new Gauge({
    name: 'layerd_lazy_layers', help: 'Layers pulled lazily and not complete yet, by state', labelNames: ['state'] as const, registers: [this.registry],
  });
  // FUSE operation metrics come from the mount servers' stats files, lazy-read counters from the
  // serving processes' files under lazy/stats (api/system.ts).

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'layerd_' });
  }
}
