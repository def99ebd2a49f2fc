/**
 * The gRPC server of the proxy snapshotter: containerd's
 * `containerd.services.snapshots.v1.Snapshots` (snapshots.proto, as in
 * containerd 1.6) on its own Unix socket, answering from SnapshotService.
 *
 * Errors map to the gRPC codes containerd's errdefs turn back into its own
 * error kinds: ENOTFOUND → NOT_FOUND, EEXIST → ALREADY_EXISTS, ECONFLICT →
 * FAILED_PRECONDITION, EINVAL → INVALID_ARGUMENT, anything else → UNKNOWN.
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCodes, LayerdError, asLayerdError } from '../../common/errors.js';
import { type Logger } from '../../common/log.js';
import { claimSocketPath, secureSocket } from '../socket.js';
import { type Mount, type SnapshotInfo, SnapshotService } from './service.js';

/** Where the .proto files are: the repository's daemon/snapshotter (this module runs from dist/daemon/snapshotter). */
export const PROTO_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'daemon', 'snapshotter');
export const SERVICE_NAME = 'containerd.services.snapshots.v1.Snapshots';
export const DEFAULT_SNAPSHOTTER_SOCKET = '/run/layerd/snapshotter.sock';
/** Infos per List message (containerd's own server sends 100 at a time). */
const LIST_BATCH = 100;

// --- the wire shapes (proto-loader with keepCase, enums as strings, longs as numbers) ---

export interface WireTimestamp { seconds: number | string; nanos: number }
export type WireKind = 'UNKNOWN' | 'VIEW' | 'ACTIVE' | 'COMMITTED';
export interface WireInfo {
  name: string; parent: string; kind: WireKind;
  created_at: WireTimestamp | null; updated_at: WireTimestamp | null; labels: Record<string, string>;
}
export interface WireMount { type: string; source: string; target: string; options: string[] }
interface KeyRequest { snapshotter: string; key: string }
interface CreateRequest extends KeyRequest { parent: string; labels: Record<string, string> }
interface CommitRequest extends KeyRequest { name: string; labels: Record<string, string> }
interface UpdateRequest { snapshotter: string; info: WireInfo | null; update_mask: { paths: string[] } | null }
interface ListRequest { snapshotter: string; filters: string[] }

/** Load the service definition (also used by test clients). */
export function loadSnapshotsService(): grpc.ServiceClientConstructor {
  if (!existsSync(resolve(PROTO_DIR, 'snapshots.proto'))) {
    throw new LayerdError(ErrorCodes.ENOTFOUND, `the snapshots service definition ${PROTO_DIR}/snapshots.proto is missing`, { path: PROTO_DIR });
  }
  const definition = protoLoader.loadSync('snapshots.proto', {
    includeDirs: [PROTO_DIR], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition);
  const ctor = SERVICE_NAME.split('.').reduce<unknown>((obj, part) => (obj as Record<string, unknown>)[part], pkg);
  if (typeof ctor !== 'function') throw new LayerdError(ErrorCodes.EINTERNAL, `${SERVICE_NAME} is not in ${PROTO_DIR}/snapshots.proto`);
  return ctor as grpc.ServiceClientConstructor;
}

export function grpcStatusFor(err: LayerdError): grpc.status {
  switch (err.code) {
    case ErrorCodes.ENOTFOUND: return grpc.status.NOT_FOUND;
    case ErrorCodes.EEXIST: return grpc.status.ALREADY_EXISTS;
    case ErrorCodes.ECONFLICT:
    case ErrorCodes.EBUSY: return grpc.status.FAILED_PRECONDITION;
    case ErrorCodes.EINVAL: return grpc.status.INVALID_ARGUMENT;
    case ErrorCodes.EUNSUPPORTED: return grpc.status.UNIMPLEMENTED;
    case ErrorCodes.EINTERNAL: return grpc.status.INTERNAL;
    default: return grpc.status.UNKNOWN;
  }
}

function toTimestamp(date: Date): WireTimestamp {
  const ms = date.getTime();
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1_000_000 };
}

const KIND_TO_WIRE: Record<SnapshotInfo['kind'], WireKind> = { active: 'ACTIVE', view: 'VIEW', committed: 'COMMITTED' };

function toWireInfo(info: SnapshotInfo): WireInfo {
  return {
    name: info.name, parent: info.parent, kind: KIND_TO_WIRE[info.kind],
    created_at: toTimestamp(info.created), updated_at: toTimestamp(info.updated), labels: info.labels,
  };
}

function toWireMounts(mounts: Mount[]): WireMount[] {
  return mounts.map((m) => ({ type: m.type, source: m.source, target: m.target, options: m.options }));
}

/** The containerd namespace a call carries (containerd forwards it to proxy plugins as gRPC metadata). */
export function namespaceOfCall(metadata: grpc.Metadata): string | undefined {
  const value = metadata.get('containerd-namespace')[0];
  return typeof value === 'string' && value !== '' ? value : undefined;
}

export class SnapshotterServer {
  private readonly server = new grpc.Server();
  /** Unary calls being answered (their work runs on after a connection drops). */
  private readonly inflight = new Set<Promise<unknown>>();

  private constructor(readonly socket: string, readonly service: SnapshotService, private readonly logger: Logger) {}

  static async start(socket: string, service: SnapshotService, logger: Logger): Promise<SnapshotterServer> {
    const s = new SnapshotterServer(socket, service, logger);
    s.server.addService(loadSnapshotsService().service, s.handlers());
    await claimSocketPath(socket);
    await new Promise<void>((done, fail) => {
      s.server.bindAsync(`unix:${socket}`, grpc.ServerCredentials.createInsecure(), (err) => (err ? fail(asLayerdError(err, ErrorCodes.EIO, { socket })) : done()));
    });
    await secureSocket(socket, 0o600, undefined);
    logger.info('containerd snapshotter is serving', { socket });
    return s;
  }

  /**
   * Accept no more calls; let the ones in flight finish (a Commit must not
   * lose the store under it), for up to `graceMs`; then close.
   */
  async stop(graceMs = 60_000): Promise<void> {
    // (not waiting for tryShutdown itself: containerd keeps its connection open)
    this.server.tryShutdown(() => undefined);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((done) => { timer = setTimeout(done, graceMs); });
    await Promise.race([Promise.allSettled([...this.inflight]), timeout]);
    clearTimeout(timer);
    this.server.forceShutdown();
  }

  /** One unary call: log, run, map errors. */
  private unary<Req, Res>(name: string, fn: (req: Req, metadata: grpc.Metadata) => Promise<Res> | Res): grpc.handleUnaryCall<Req, Res> {
    return (call, callback) => {
      const started = Date.now();
      const work = Promise.resolve().then(() => fn(call.request, call.metadata));
      this.inflight.add(work);
      work.finally(() => this.inflight.delete(work)).catch(() => undefined);
      work.then(
        (res) => {
          this.logger.debug('snapshotter call', { method: name, ms: Date.now() - started });
          callback(null, res);
        },
        (err: unknown) => {
          const e = asLayerdError(err);
          const code = grpcStatusFor(e);
          const level = code === grpc.status.UNKNOWN || code === grpc.status.INTERNAL ? 'error' : 'debug';
          this.logger.log(level, 'snapshotter call failed', { method: name, code: e.code, error: e.message, ...e.context });
          callback({ code, details: e.message, metadata: new grpc.Metadata() });
        },
      );
    };
  }

  private handlers(): grpc.UntypedServiceImplementation {
    const svc = this.service;
    const empty = (): Record<string, never> => ({});
    return {
      Prepare: this.unary<CreateRequest, { mounts: WireMount[] }>('Prepare', async (r) => ({ mounts: toWireMounts(await svc.prepare(r.key, r.parent, r.labels ?? {})) })),
      View: this.unary<CreateRequest, { mounts: WireMount[] }>('View', async (r) => ({ mounts: toWireMounts(await svc.view(r.key, r.parent, r.labels ?? {})) })),
      Mounts: this.unary<KeyRequest, { mounts: WireMount[] }>('Mounts', async (r) => ({ mounts: toWireMounts(await svc.mounts(r.key)) })),
      Commit: this.unary<CommitRequest, Record<string, never>>('Commit', async (r, md) => { await svc.commit(r.name, r.key, r.labels ?? {}, namespaceOfCall(md)); return empty(); }),
      Remove: this.unary<KeyRequest, Record<string, never>>('Remove', async (r) => { await svc.remove(r.key); return empty(); }),
      Stat: this.unary<KeyRequest, { info: WireInfo }>('Stat', (r) => ({ info: toWireInfo(svc.stat(r.key)) })),
      Update: this.unary<UpdateRequest, { info: WireInfo }>('Update', (r) => {
        if (!r.info) throw new LayerdError(ErrorCodes.EINVAL, 'Update needs an info');
        return { info: toWireInfo(svc.update({ name: r.info.name, labels: r.info.labels ?? {} }, r.update_mask?.paths ?? [])) };
      }),
      List: (call: grpc.ServerWritableStream<ListRequest, { info: WireInfo[] }>) => {
        try {
          const infos = svc.list(call.request.filters ?? []).map(toWireInfo);
          for (let i = 0; i < infos.length; i += LIST_BATCH) call.write({ info: infos.slice(i, i + LIST_BATCH) });
          call.end();
        } catch (err) {
          const e = asLayerdError(err);
          this.logger.debug('snapshotter call failed', { method: 'List', code: e.code, error: e.message });
          call.emit('error', { code: grpcStatusFor(e), details: e.message, metadata: new grpc.Metadata() });
        }
      },
      Usage: this.unary<KeyRequest, { size: number; inodes: number }>('Usage', async (r) => svc.usage(r.key)),
      Cleanup: this.unary<{ snapshotter: string }, Record<string, never>>('Cleanup', async () => { await svc.cleanup(); return empty(); }),
    };
  }
}

/**
 * Start the snapshotter on its socket (see snapshotterSocketFor), or not at
 * all for `none`. When the socket was not asked for explicitly and the
 * service definition is missing (an installation without the .proto files),
 * the daemon goes on without it and says so.
 */
export async function startSnapshotter(
  apiSocket: string, given: string | undefined, service: SnapshotService, logger: Logger,
): Promise<SnapshotterServer | undefined> {
  const socket = snapshotterSocketFor(apiSocket, given);
  if (socket === null) return undefined;
  try {
    return await SnapshotterServer.start(socket, service, logger);
  } catch (err) {
    if (given === undefined && err instanceof LayerdError && err.code === ErrorCodes.ENOTFOUND) {
      logger.error('the containerd snapshotter is off', { error: err.message });
      return undefined;
    }
    throw err;
  }
}

/**
 * The snapshotter socket: as given (`none` = no snapshotter), else
 * `snapshotter.sock` beside the API socket — /run/layerd/snapshotter.sock
 * for the default API socket, and never shared by two daemons.
 */
export function snapshotterSocketFor(apiSocket: string, given: string | undefined): string | null {
  if (given === 'none' || given === '') return null;
  if (given !== undefined) return resolve(given);
  return resolve(dirname(resolve(apiSocket)), 'snapshotter.sock');
}
