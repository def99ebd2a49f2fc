/**
 * A client of containerd's content service (`containerd.services.content.v1.Content`,
 * content.proto) on containerd's own socket, and what the snapshotter asks
 * it: the original compressed blob of a layer containerd unpacked into a
 * snapshot, found by the chain ID the snapshot was committed as.
 *
 * containerd names the layer in two places of its content store (both in
 * the namespace that pulled the image):
 *
 * - a layer blob it has applied once carries `containerd.io/uncompressed` =
 *   its diffID (set right *after* the snapshot's Commit, so not yet for the
 *   layer being committed now, but for every layer applied before);
 * - an image manifest carries GC labels naming its config
 *   (`containerd.io/gc.ref.content.config`) and its layer blobs in order
 *   (`containerd.io/gc.ref.content.l.<i>`, set when the image was fetched);
 *   the config lists the diffIDs, and so the chain IDs, of those layers.
 *
 * A candidate is only a candidate: the caller verifies the blob's digest and
 * the diffID while it ingests it.
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { Readable } from 'node:stream';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, digestOf, isDigest } from '../../storage/digest.js';
import { type OriginalBlob, chainIdOf } from '../../storage/snapshots.js';
import { PROTO_DIR } from './server.js';

export const DEFAULT_CONTAINERD_SOCKET = '/run/containerd/containerd.sock';
/** containerd's label on a layer blob: the diffID of its uncompressed tar. */
export const LABEL_UNCOMPRESSED = 'containerd.io/uncompressed';
const LABEL_GC_CONFIG = 'containerd.io/gc.ref.content.config';
const LABEL_GC_LAYER = 'containerd.io/gc.ref.content.l.';
/** How long a List or Info may take; a Read, how long it may go without data. */
const CALL_MS = 15_000;
/** The largest image config read (they are a few KiB). */
const MAX_CONFIG_BYTES = 4 * 1024 * 1024;
/** Configs' diffIDs remembered (content-addressed: they never change). */
const CONFIG_CACHE = 256;

export interface ContentInfo {
  digest: Digest;
  size: number;
  labels: Record<string, string>;
}

interface WireInfo { digest: string; size: number; labels: Record<string, string> | null }
interface WireChunk { offset: number; data: Buffer }
type Unary = (req: object, md: grpc.Metadata, options: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: unknown) => void) => void;
type Streaming<T> = (req: object, md: grpc.Metadata, options?: grpc.CallOptions) => grpc.ClientReadableStream<T>;

function loadContentService(): grpc.ServiceClientConstructor {
  const definition = protoLoader.loadSync('content.proto', {
    includeDirs: [PROTO_DIR], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition) as unknown as { containerd: { services: { content: { v1: { Content: grpc.ServiceClientConstructor } } } } };
  return pkg.containerd.services.content.v1.Content;
}

function contentError(what: string, address: string, err: unknown): LayerdError {
  const e = err as Partial<grpc.ServiceError>;
  const code = e.code === grpc.status.NOT_FOUND ? ErrorCodes.ENOTFOUND : ErrorCodes.EIO;
  return new LayerdError(code, `containerd's content service (${address}): ${what}: ${e.details ?? e.message ?? String(err)}`, { address }, { cause: err });
}

/** containerd's content store, as one containerd namespace sees it. */
export class ContainerdContent {
  private readonly client: grpc.Client;
  private readonly methods: Record<string, unknown>;

  constructor(readonly address: string) {
    const Ctor = loadContentService();
    this.client = new Ctor(address.includes(':') ? address : `unix:${address}`, grpc.credentials.createInsecure());
    this.methods = this.client as unknown as Record<string, unknown>;
  }

  private static metadata(namespace: string): grpc.Metadata {
    const md = new grpc.Metadata();
    md.set('containerd-namespace', namespace);
    return md;
  }

  /** Content whose info matches any of `filters` (containerd's filter syntax). */
  list(namespace: string, filters: string[]): Promise<ContentInfo[]> {
    return new Promise((resolve, reject) => {
      const infos: ContentInfo[] = [];
      const stream = (this.methods['List'] as Streaming<{ info: WireInfo[] }>).call(
        this.client, { filters }, ContainerdContent.metadata(namespace), { deadline: Date.now() + CALL_MS });
      stream.on('data', (msg: { info: WireInfo[] }) => {
        for (const i of msg.info) if (isDigest(i.digest)) infos.push({ digest: i.digest, size: Number(i.size), labels: i.labels ?? {} });
      });
      stream.on('error', (err) => reject(contentError('List', this.address, err)));
      stream.on('end', () => resolve(infos));
    });
  }

  info(namespace: string, digest: Digest): Promise<ContentInfo> {
    return new Promise((resolve, reject) => {
      (this.methods['Info'] as Unary).call(this.client, { digest }, ContainerdContent.metadata(namespace), { deadline: Date.now() + CALL_MS }, (err, res) => {
        if (err) { reject(contentError(`Info ${digest}`, this.address, err)); return; }
        const i = (res as { info: WireInfo | null }).info;
        if (!i || i.digest !== digest) { reject(new LayerdError(ErrorCodes.EIO, `containerd answered Info ${digest} with another blob`, { digest })); return; }
        resolve({ digest, size: Number(i.size), labels: i.labels ?? {} });
      });
    });
  }

  /** The bytes of blob `digest`, as a stream (ends with an error if containerd goes quiet for CALL_MS). */
  read(namespace: string, digest: Digest): Readable {
    const call = (this.methods['Read'] as Streaming<WireChunk>).call(this.client, { digest, offset: 0, size: 0 }, ContainerdContent.metadata(namespace));
    const address = this.address;
    async function* chunks(): AsyncGenerator<Buffer> {
      let offset = 0;
      let idle: NodeJS.Timeout | undefined;
      let wentQuiet = false;
      const quiet = (): void => { clearTimeout(idle); idle = setTimeout(() => { wentQuiet = true; call.cancel(); }, CALL_MS); };
      quiet();
      try {
        for await (const msg of call as AsyncIterable<WireChunk>) {
          quiet();
          if (Number(msg.offset) !== offset) throw new LayerdError(ErrorCodes.EIO, `containerd sent blob ${digest} out of order (offset ${msg.offset}, expected ${offset})`, { digest });
          offset += msg.data.length;
          yield msg.data;
        }
      } catch (err) {
        if (wentQuiet) throw new LayerdError(ErrorCodes.EIO, `containerd sent nothing of blob ${digest} for ${CALL_MS / 1000} s (after ${offset} bytes)`, { digest, address });
        throw err instanceof LayerdError ? err : contentError(`Read ${digest}`, address, err);
      } finally {
        clearTimeout(idle);
        call.cancel(); // (no-op once it has ended)
      }
    }
    return Readable.from(chunks(), { objectMode: false });
  }

  /** A small blob whole, its digest checked. */
  async readSmall(namespace: string, digest: Digest, maxBytes: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    let size = 0;
    for await (const chunk of this.read(namespace, digest)) {
      size += (chunk as Buffer).length;
      if (size > maxBytes) throw new LayerdError(ErrorCodes.ELIMIT, `containerd's blob ${digest} is larger than ${maxBytes} bytes`, { digest });
      parts.push(chunk as Buffer);
    }
    const bytes = Buffer.concat(parts);
    if (digestOf(bytes) !== digest) throw new LayerdError(ErrorCodes.EDIGEST, `containerd's blob ${digest} does not match its digest`, { digest });
    return bytes;
  }

  close(): void {
    this.client.close();
  }
}

/** What the snapshotter asks for: the layer that gives chain ID `target` on top of `parentChain` (null: a base layer). */
export interface OriginalLayerRequest {
  namespace: string;
  parentChain: Digest | null;
  target: Digest;
}

/**
 * Where a committed unpack snapshot's original layer blob may be: undefined
 * when the source has none for that chain (then the snapshot's directory
 * becomes the layer); throws when it cannot tell (unreachable).
 */
export interface OriginalLayerSource {
  find(request: OriginalLayerRequest): Promise<(OriginalBlob & { how: string }) | undefined>;
}

/** The original layers in containerd's content store. */
export class ContainerdOriginalLayers implements OriginalLayerSource {
  private readonly configs = new Map<Digest, Digest[]>();

  constructor(private readonly content: ContainerdContent) {}

  async find(request: OriginalLayerRequest): Promise<(OriginalBlob & { how: string }) | undefined> {
    const { namespace, parentChain, target } = request;
    // 1. blobs containerd labelled with their diffID (applied before)
    for (const info of await this.content.list(namespace, [`labels."${LABEL_UNCOMPRESSED}"`])) {
      const diffId = info.labels[LABEL_UNCOMPRESSED];
      if (isDigest(diffId) && chainIdOf(parentChain, diffId) === target) return this.blob(namespace, info, diffId, 'uncompressed label');
    }
    // 2. the images' manifests: their configs' diffIDs give the chain; their GC labels, the blobs
    for (const manifest of await this.content.list(namespace, [`labels."${LABEL_GC_CONFIG}"`])) {
      const config = manifest.labels[LABEL_GC_CONFIG];
      if (!isDigest(config)) continue;
      const diffIds = await this.diffIdsOf(namespace, config).catch(() => undefined); // (a config not here: another platform's)
      if (diffIds === undefined) continue;
      let chain: Digest | null = null;
      for (let i = 0; i < diffIds.length; i++) {
        const previous: Digest | null = chain;
        chain = chainIdOf(chain, diffIds[i]!);
        if (chain !== target) continue;
        if (previous !== parentChain) break;
        const layer = manifest.labels[`${LABEL_GC_LAYER}${i}`];
        if (!isDigest(layer)) break;
        const info = await this.content.info(namespace, layer).catch(() => undefined);
        if (info !== undefined) return this.blob(namespace, info, diffIds[i]!, `image manifest ${manifest.digest}`);
        break;
      }
    }
    return undefined;
  }

  private blob(namespace: string, info: ContentInfo, diffId: Digest, how: string): OriginalBlob & { how: string } {
    return { digest: info.digest, size: info.size, diffId, how, open: async () => this.content.read(namespace, info.digest) };
  }

  /** The diffIDs an image config lists (read once per config). */
  private async diffIdsOf(namespace: string, config: Digest): Promise<Digest[]> {
    const known = this.configs.get(config);
    if (known !== undefined) return known;
    const parsed = JSON.parse((await this.content.readSmall(namespace, config, MAX_CONFIG_BYTES)).toString('utf8')) as { rootfs?: { diff_ids?: unknown } };
    const list = parsed.rootfs?.diff_ids;
    const diffIds = Array.isArray(list) && list.every(isDigest) ? list : [];
    if (this.configs.size >= CONFIG_CACHE) this.configs.delete(this.configs.keys().next().value!);
    this.configs.set(config, diffIds);
    return diffIds;
  }
}
