/**
 * What an importer needs from any image source: the images it offers (each
 * a manifest or index descriptor plus the names to give it) and the bytes
 * of its blobs. OCI layouts, OCI archives, docker-save archives and raw
 * layers all present themselves this way.
 */
import { type Readable } from 'node:stream';
import { type Digest } from '../digest.js';
import { type Descriptor } from '../oci.js';

export interface SourceImage {
  /** NAME:TAG references this image is to be stored under (may be empty). */
  refs: { name: string; tag: string }[];
  /** The manifest or index to import. */
  descriptor: Descriptor;
}

export interface ImageSource {
  readonly kind: 'oci-layout' | 'oci-archive' | 'docker-archive' | 'layer' | 'registry';
  readonly description: string;
  images(): Promise<SourceImage[]>;
  /** A small blob (manifest, index, config), read whole; size is capped by the caller. */
  readBlob(digest: Digest, maxBytes: number): Promise<Buffer>;
  /** A blob's bytes as a stream (layers). */
  openBlob(digest: Digest): Promise<Readable>;
  close(): Promise<void>;
}
