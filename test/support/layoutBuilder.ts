/**
 * Small OCI image layouts built from scratch for tests, with switches to
 * break exactly one thing (a digest, a size, a diffID, a document).
 */
import { createHash } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';

export interface LayoutOptions {
  /** Layer blobs as they are to be stored (compressed or not). */
  layers: Buffer[];
  /** Override the size the manifest states for layer i. */
  wrongSize?: number;
  /** Put a wrong diffID in the config for the first layer. */
  wrongDiffId?: boolean;
  /** Replace the manifest with these bytes. */
  manifestBytes?: Buffer;
  /** Replace index.json with these bytes. */
  indexBytes?: Buffer;
  tag?: string;
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

export async function writeLayout(dir: string, options: LayoutOptions): Promise<{ manifestDigest: string; layerDigests: string[] }> {
  const blobs = join(dir, 'blobs', 'sha256');
  await mkdir(blobs, { recursive: true });
  const put = async (b: Buffer): Promise<string> => {
    const hex = sha(b);
    await writeFile(join(blobs, hex), b);
    return hex;
  };
  const layerDigests: string[] = [];
  const diffIds: string[] = [];
  for (const layer of options.layers) {
    layerDigests.push(await put(layer));
    const plain = layer[0] === 0x1f && layer[1] === 0x8b ? gunzipSync(layer) : layer;
    diffIds.push(`sha256:${sha(plain)}`);
  }
  if (options.wrongDiffId) diffIds[0] = `sha256:${'0'.repeat(64)}`;
  const config = Buffer.from(JSON.stringify({
    architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: diffIds },
    config: { Env: ['PATH=/bin'] }, history: options.layers.map(() => ({ created_by: 'test' })),
  }));
  const configHex = await put(config);
  const manifest = options.manifestBytes ?? Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: `sha256:${configHex}`, size: config.length },
    layers: options.layers.map((l, i) => ({
      mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip',
      digest: `sha256:${layerDigests[i]}`,
      size: i === 0 && options.wrongSize !== undefined ? options.wrongSize : l.length,
    })),
  }));
  const manifestHex = await put(manifest);
  await writeFile(join(dir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
  await writeFile(join(dir, 'index.json'), options.indexBytes ?? JSON.stringify({
    schemaVersion: 2,
    manifests: [{
      mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: `sha256:${manifestHex}`, size: manifest.length,
      annotations: { 'org.opencontainers.image.ref.name': options.tag ?? 'latest' },
    }],
  }));
  return { manifestDigest: `sha256:${manifestHex}`, layerDigests };
}

export async function readBytes(path: string): Promise<Buffer> {
  return readFile(path);
}
