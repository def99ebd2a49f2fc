/**
 * What the CLI asks of layerd, whoever answers: the store opened directly
 * (offline `--root` mode) or the daemon over its socket.
 */
import { type Digest } from '../storage/digest.js';
import { type FsckReport } from '../storage/fsck.js';
import { type RemoveResult } from '../storage/gc.js';
import { type ImportProgress, type ImportedImage } from '../storage/importer.js';
import { type ImportRequest, type PruneResult } from '../storage/operations.js';
import { type ImageInspect, type ImageSummary, type LayerSummary } from '../storage/views.js';

export type { ImportRequest };

export interface Backend {
  importPath(request: ImportRequest, onProgress?: (event: ImportProgress) => void): Promise<ImportedImage[]>;
  images(): Promise<ImageSummary[]>;
  layers(): Promise<LayerSummary[]>;
  inspect(ref: string): Promise<ImageInspect>;
  tag(source: string, target: string): Promise<{ id: Digest; ref: string }>;
  removeImage(ref: string, force: boolean): Promise<RemoveResult>;
  prune(): Promise<PruneResult>;
  fsck(): Promise<FsckReport>;
  close(): Promise<void>;
}
