/**
 * A client of containerd's CRI image service (`runtime.v1.ImageService` on
 * containerd's own socket), as the kubelet or crictl call it: only the
 * calls the tests use (test/support/cri-image.proto).
 */
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { REPO } from './env.js';

export interface CriImage { id: string; repo_tags: string[]; repo_digests: string[]; size: number }

export interface CriImageClient {
  pullImage(image: string, timeoutMs?: number): Promise<string>;
  /** The image's status, or undefined if containerd does not have it. */
  imageStatus(image: string): Promise<CriImage | undefined>;
  close(): void;
}

type Unary = (req: object, md: grpc.Metadata, options: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: unknown) => void) => void;

export function criImageClient(socket: string): CriImageClient {
  const definition = protoLoader.loadSync('cri-image.proto', {
    includeDirs: [join(REPO, 'test', 'support')], keepCase: true, longs: Number, enums: String, defaults: true,
  });
  const pkg = grpc.loadPackageDefinition(definition) as unknown as { runtime: { v1: { ImageService: grpc.ServiceClientConstructor } } };
  const client = new pkg.runtime.v1.ImageService(`unix:${socket}`, grpc.credentials.createInsecure());
  const call = <T>(method: string, request: object, timeoutMs: number): Promise<T> => new Promise((resolve, reject) => {
    const fn = (client as unknown as Record<string, Unary>)[method]!;
    fn.call(client, request, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(err) : resolve(res as T)));
  });
  return {
    async pullImage(image: string, timeoutMs = 300_000): Promise<string> {
      return (await call<{ image_ref: string }>('PullImage', { image: { image } }, timeoutMs)).image_ref;
    },
    async imageStatus(image: string): Promise<CriImage | undefined> {
      const res = await call<{ image: CriImage | null }>('ImageStatus', { image: { image } }, 30_000);
      return res.image ?? undefined;
    },
    close(): void { client.close(); },
  };
}
