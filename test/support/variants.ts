/**
 * The corpus image in every format and compression layerd imports, made
 * with the real tool (skopeo) from the committed OCI layout, the way
 * ../shared/corpus/make-corpus.sh makes its variants.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { DEBIAN_MULTI, execFileAsync } from './env.js';

export interface Variants {
  ociLayout: string;
  ociArchive: string;
  dockerArchive: string;
  zstdLayout: string;
  uncompressedLayout: string;
  mislabeledLayout: string;
  gzipFromDockerLayout: string;
}

async function skopeo(...args: string[]): Promise<void> {
  await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', ...args], { maxBuffer: 16 * 1024 * 1024 });
}

export async function makeVariants(dir: string): Promise<Variants> {
  await mkdir(dir, { recursive: true });
  const src = `oci:${DEBIAN_MULTI}:latest`;
  const v: Variants = {
    ociLayout: DEBIAN_MULTI,
    ociArchive: join(dir, 'debian-multi.oci.tar'),
    dockerArchive: join(dir, 'debian-multi.docker.tar'),
    zstdLayout: join(dir, 'debian-multi-zstd'),
    uncompressedLayout: join(dir, 'debian-multi-uncompressed'),
    mislabeledLayout: join(dir, 'debian-multi-mislabeled'),
    gzipFromDockerLayout: join(dir, 'debian-multi-gzip'),
  };
  await skopeo(src, `oci-archive:${v.ociArchive}:latest`);
  await skopeo(src, `docker-archive:${v.dockerArchive}:corpus/debian-multi:latest`);
  await skopeo('--dest-compress-format', 'zstd', src, `oci:${v.zstdLayout}:latest`);
  await skopeo('--dest-decompress', src, `dir:${join(dir, 'dir-uncompressed')}`);
  await skopeo('--dest-oci-accept-uncompressed-layers', `dir:${join(dir, 'dir-uncompressed')}`, `oci:${v.uncompressedLayout}:latest`);
  // skopeo 1.9.3 labels these plain tars +gzip: detection must go by the bytes.
  await skopeo('--dest-oci-accept-uncompressed-layers', `docker-archive:${v.dockerArchive}`, `oci:${v.mislabeledLayout}:latest`);
  await skopeo('--dest-compress-format', 'gzip', `docker-archive:${v.dockerArchive}`, `oci:${v.gzipFromDockerLayout}:latest`);
  return v;
}
