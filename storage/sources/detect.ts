/**
 * Working out what a path given to `import` is: an OCI layout directory, an
 * OCI archive, a docker-save archive, or a raw layer tar. Detection reads
 * the bytes (and an archive's table of contents), never the file name.
 */
import { basename } from 'node:path';
import { ErrorCodes, LayerdError, errnoCode } from '../../common/errors.js';
import { readHead, sniffCompression } from '../compression.js';
import { isValidName } from '../references.js';
import { DockerArchiveSource } from './dockerArchive.js';
import { DirectoryTree, TarTree } from './fileTree.js';
import { OciLayoutSource } from './ociLayout.js';
import { type ImageSource } from './source.js';

export type SourceFormat = 'oci-layout' | 'oci-archive' | 'docker-archive' | 'layer';

export type DetectedSource =
  | { kind: 'image'; source: ImageSource }
  | { kind: 'layer'; path: string; name: string };

export async function detectSource(path: string, options: { name?: string; format?: SourceFormat } = {}): Promise<DetectedSource> {
  const name = options.name ?? defaultName(path);
  if (!isValidName(name)) {
    throw new LayerdError(ErrorCodes.EINVAL, `'${name}' is not a valid image name; give one with --name`, { name });
  }
  if (await DirectoryTree.isDirectory(path)) {
    const tree = new DirectoryTree(path);
    if (options.format && options.format !== 'oci-layout') throw mismatch(path, options.format);
    if (!(await OciLayoutSource.isLayout(tree))) {
      throw new LayerdError(ErrorCodes.EFORMAT, `${path}: a directory, but not an OCI image layout (no oci-layout or index.json)`, { path });
    }
    return { kind: 'image', source: new OciLayoutSource('oci-layout', tree, name) };
  }

  const head = await headOf(path);
  const compression = sniffCompression(head);
  const isTar = head.length >= 262 && head.subarray(257, 262).toString('latin1') === 'ustar';
  if (options.format === 'layer' || compression !== 'none' || !isTar) {
    if (options.format && options.format !== 'layer') {
      throw new LayerdError(ErrorCodes.EUNSUPPORTED, `${path}: ${options.format} archives must be uncompressed tars (decompress it first)`, { path });
    }
    return { kind: 'layer', path, name };
  }
  const tree = await TarTree.open(path);
  if ((!options.format || options.format === 'oci-archive') && (await OciLayoutSource.isLayout(tree))) {
    return { kind: 'image', source: new OciLayoutSource('oci-archive', tree, name) };
  }
  if ((!options.format || options.format === 'docker-archive') && (await DockerArchiveSource.isDockerArchive(tree))) {
    return { kind: 'image', source: new DockerArchiveSource(tree, options.name) };
  }
  if (options.format) throw mismatch(path, options.format);
  return { kind: 'layer', path, name };
}

/** The file's first bytes, with a clear error when there is no such file. */
async function headOf(path: string): Promise<Buffer> {
  try {
    return await readHead(path);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new LayerdError(ErrorCodes.ENOTFOUND, `no such file or directory: ${path}`, { path });
    throw new LayerdError(ErrorCodes.EIO, `cannot open ${path}: ${(err as Error).message}`, { path }, { cause: err });
  }
}

function mismatch(path: string, format: SourceFormat): LayerdError {
  return new LayerdError(ErrorCodes.EFORMAT, `${path} is not a ${format}`, { path, format });
}

/** `debian-multi.oci.tar` → `debian-multi`: a default NAME for what is imported. */
export function defaultName(path: string): string {
  let base = basename(path.replace(/\/+$/, ''));
  base = base.replace(/(\.(tar|tgz|gz|zst|zstd|oci|docker|layer))+$/i, '');
  return base.toLowerCase().replace(/[^a-z0-9._/-]+/g, '-').replace(/^[^a-z0-9]+|[^a-z0-9]+$/g, '') || 'imported';
}
