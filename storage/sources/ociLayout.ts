/**
 * OCI image layouts (a directory, or the same inside an OCI archive):
 * `oci-layout`, `index.json`, `blobs/sha256/<hex>`. Each entry of the top
 * index is offered as an image, named by its
 * `org.opencontainers.image.ref.name` annotation.
 */
import { type Readable } from 'node:stream';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, digestHex } from '../digest.js';
import { MAX_DOCUMENT_BYTES, parseJsonObject, parseManifestOrIndex } from '../oci.js';
import { isValidTag, splitNameTag } from '../references.js';
import { type FileTree } from './fileTree.js';
import { type ImageSource, type SourceImage } from './source.js';

const REF_NAME = 'org.opencontainers.image.ref.name';

export class OciLayoutSource implements ImageSource {
  constructor(
    readonly kind: 'oci-layout' | 'oci-archive',
    private readonly tree: FileTree,
    /** NAME for entries whose ref.name is a bare tag. */
    private readonly name: string,
  ) {}

  get description(): string { return this.tree.description; }

  static async isLayout(tree: FileTree): Promise<boolean> {
    return (await tree.size('oci-layout')) !== undefined && (await tree.size('index.json')) !== undefined;
  }

  async images(): Promise<SourceImage[]> {
    const layout = parseJsonObject(await this.tree.read('oci-layout', 64 * 1024), `${this.description}: oci-layout`);
    if (typeof layout['imageLayoutVersion'] !== 'string') {
      throw new LayerdError(ErrorCodes.EBADJSON, `${this.description}: oci-layout has no imageLayoutVersion`);
    }
    const parsed = parseManifestOrIndex(await this.tree.read('index.json', MAX_DOCUMENT_BYTES), `${this.description}: index.json`);
    if (parsed.kind !== 'index') throw new LayerdError(ErrorCodes.EBADJSON, `${this.description}: index.json is not an image index`);
    return parsed.index.manifests.map((descriptor) => ({ descriptor, refs: this.refsOf(descriptor.annotations?.[REF_NAME]) }));
  }

  private refsOf(refName: string | undefined): { name: string; tag: string }[] {
    if (!refName) return [];
    // ref.name is usually a tag; some tools write a full reference instead.
    if (isValidTag(refName)) return [{ name: this.name, tag: refName }];
    try {
      return [splitNameTag(refName)];
    } catch {
      throw new LayerdError(ErrorCodes.EBADJSON, `${this.description}: invalid ${REF_NAME} annotation '${refName}'`, { ref: refName });
    }
  }

  private blobName(digest: Digest): string {
    return `blobs/sha256/${digestHex(digest)}`;
  }

  async readBlob(digest: Digest, maxBytes: number): Promise<Buffer> {
    if ((await this.tree.size(this.blobName(digest))) === undefined) {
      throw new LayerdError(ErrorCodes.ENOTFOUND, `${this.description}: blob ${digest} is missing`, { digest });
    }
    return this.tree.read(this.blobName(digest), maxBytes);
  }

  async openBlob(digest: Digest): Promise<Readable> {
    if ((await this.tree.size(this.blobName(digest))) === undefined) {
      throw new LayerdError(ErrorCodes.ENOTFOUND, `${this.description}: blob ${digest} is missing`, { digest });
    }
    return this.tree.open(this.blobName(digest));
  }

  async close(): Promise<void> {}
}
