/**
 * What the CLI asks of layerd, whoever answers: the store opened directly
 * (offline `--root` mode) or, later, the daemon over its socket.
 */
import { type Digest } from '../storage/digest.js';
import { type FsckReport } from '../storage/fsck.js';
import { type GcResult, type RemoveResult } from '../storage/gc.js';
import { type ImportProgress, type ImportedImage } from '../storage/importer.js';
import { type SourceFormat } from '../storage/sources/detect.js';
import { type ImageInspect, type ImageSummary, type LayerSummary } from '../storage/views.js';

export interface ImportRequest {
  path: string;
  name?: string;
  platform?: string;
  format?: SourceFormat;
}

export interface Backend {
  importPath(request: ImportRequest, onProgress?: (event: ImportProgress) => void): Promise<ImportedImage[]>;
  images(): Promise<ImageSummary[]>;
  layers(): Promise<LayerSummary[]>;
  inspect(ref: string): Promise<ImageInspect>;
  tag(source: string, target: string): Promise<{ id: Digest; ref: string }>;
  removeImage(ref: string, force: boolean): Promise<RemoveResult>;
  prune(): Promise<{ images: Digest[]; gc: GcResult; tmpDirs: number }>;
  fsck(): Promise<FsckReport>;
  close(): Promise<void>;
}
