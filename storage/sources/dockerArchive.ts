/**
 * `docker save` archives: `manifest.json` lists, per image, its config file,
 * its RepoTags and its layer tars (uncompressed). layerd presents each as a
 * Docker schema2 manifest whose layer digests are the uncompressed tars'
 * digests, i.e. the config's diff_ids, which the import then verifies.
 */
import { Readable } from 'node:stream';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, digestOf } from '../digest.js';
import { type ImageManifest, MAX_DOCUMENT_BYTES, MediaTypes, parseImageConfig } from '../oci.js';
import { splitNameTag } from '../references.js';
import { type FileTree } from './fileTree.js';
import { type ImageSource, type SourceImage } from './source.js';

const UNCOMPRESSED_DOCKER_LAYER = 'application/vnd.docker.image.rootfs.diff.tar';

interface SaveEntry { Config: string; RepoTags: string[]; Layers: string[] }

export class DockerArchiveSource implements ImageSource {
  readonly kind = 'docker-archive' as const;
  /** Synthesised manifests and config files, by digest. */
  private readonly documents = new Map<Digest, Buffer>();
  /** Archive member holding each layer blob, by digest. */
  private readonly layerMembers = new Map<Digest, string>();

  constructor(private readonly tree: FileTree, private readonly nameOverride?: string) {}

  get description(): string { return this.tree.description; }

  static async isDockerArchive(tree: FileTree): Promise<boolean> {
    return (await tree.size('manifest.json')) !== undefined;
  }

  async images(): Promise<SourceImage[]> {
    const what = `${this.description}: manifest.json`;
    let entries: unknown;
    try {
      entries = JSON.parse((await this.tree.read('manifest.json', MAX_DOCUMENT_BYTES)).toString());
    } catch (err) {
      if (err instanceof LayerdError) throw err;
      throw new LayerdError(ErrorCodes.EBADJSON, `${what}: not valid JSON (${(err as Error).message})`);
    }
    if (!Array.isArray(entries) || entries.length === 0) throw new LayerdError(ErrorCodes.EBADJSON, `${what}: expected a non-empty array`);
    const images: SourceImage[] = [];
    for (const [i, raw] of entries.entries()) {
      const entry = checkEntry(raw, `${what}[${i}]`);
      const configBytes = await this.tree.read(entry.Config, MAX_DOCUMENT_BYTES);
      const config = parseImageConfig(configBytes, `${this.description}: ${entry.Config}`);
      if (config.rootfs.diff_ids.length !== entry.Layers.length) {
        throw new LayerdError(ErrorCodes.EBADJSON, `${what}[${i}]: ${entry.Layers.length} layers but the config lists ${config.rootfs.diff_ids.length} diff_ids`);
      }
      const configDigest = digestOf(configBytes);
      this.documents.set(configDigest, configBytes);
      const layers = [];
      for (const [n, member] of entry.Layers.entries()) {
        const size = await this.tree.size(member);
        if (size === undefined) throw new LayerdError(ErrorCodes.ENOTFOUND, `${this.description}: layer ${member} is missing`, { path: member });
        const digest = config.rootfs.diff_ids[n]!;
        this.layerMembers.set(digest, member);
        layers.push({ mediaType: UNCOMPRESSED_DOCKER_LAYER, digest, size });
      }
      const manifest: ImageManifest = {
        schemaVersion: 2,
        mediaType: MediaTypes.dockerManifest,
        config: { mediaType: MediaTypes.dockerConfig, digest: configDigest, size: configBytes.length },
        layers,
      };
      const manifestBytes = Buffer.from(JSON.stringify(manifest));
      const manifestDigest = digestOf(manifestBytes);
      this.documents.set(manifestDigest, manifestBytes);
      images.push({
        descriptor: { mediaType: MediaTypes.dockerManifest, digest: manifestDigest, size: manifestBytes.length },
        refs: entry.RepoTags.map((t) => this.refOf(t)),
      });
    }
    return images;
  }

  private refOf(repoTag: string): { name: string; tag: string } {
    const { name, tag } = splitNameTag(repoTag);
    if (this.nameOverride) return { name: this.nameOverride, tag };
    // Docker's familiar form: docker.io/library/x → x, docker.io/a/b → a/b.
    const familiar = name.replace(/^docker\.io\/(library\/)?/, '');
    return { name: familiar, tag };
  }

  async readBlob(digest: Digest, maxBytes: number): Promise<Buffer> {
    const doc = this.documents.get(digest);
    if (doc) {
      if (doc.length > maxBytes) throw new LayerdError(ErrorCodes.ELIMIT, `${this.description}: ${digest} is too large`, { digest });
      return doc;
    }
    const member = this.layerMembers.get(digest);
    if (!member) throw new LayerdError(ErrorCodes.ENOTFOUND, `${this.description}: no blob ${digest}`, { digest });
    return this.tree.read(member, maxBytes);
  }

  async openBlob(digest: Digest): Promise<Readable> {
    const doc = this.documents.get(digest);
    if (doc) return Readable.from([doc]);
    const member = this.layerMembers.get(digest);
    if (!member) throw new LayerdError(ErrorCodes.ENOTFOUND, `${this.description}: no blob ${digest}`, { digest });
    return this.tree.open(member);
  }

  async close(): Promise<void> {}
}

function checkEntry(raw: unknown, what: string): SaveEntry {
  if (typeof raw !== 'object' || raw === null) throw new LayerdError(ErrorCodes.EBADJSON, `${what}: expected an object`);
  const e = raw as Record<string, unknown>;
  const isStrings = (v: unknown): v is string[] => Array.isArray(v) && v.every((s) => typeof s === 'string');
  if (typeof e['Config'] !== 'string') throw new LayerdError(ErrorCodes.EBADJSON, `${what}: 'Config' must be a string`);
  if (!isStrings(e['Layers'])) throw new LayerdError(ErrorCodes.EBADJSON, `${what}: 'Layers' must be an array of strings`);
  const repoTags = e['RepoTags'] ?? [];
  if (!isStrings(repoTags)) throw new LayerdError(ErrorCodes.EBADJSON, `${what}: 'RepoTags' must be an array of strings`);
  return { Config: e['Config'], Layers: e['Layers'], RepoTags: repoTags };
}
