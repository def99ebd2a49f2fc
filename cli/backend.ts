/**
 * What the CLI asks of layerd, whoever answers: the store opened directly
 * (offline `--root` mode) or the daemon over its socket.
 */
import { type Efficiency, type HistoryRow, type LayerChange, type TreeEntry, type WhichResult } from '../storage/analysis.js';
import { type Digest } from '../storage/digest.js';
import { type FsckReport } from '../storage/fsck.js';
import { type RemoveResult } from '../storage/gc.js';
import { type ImportProgress, type ImportedImage } from '../storage/importer.js';
import { type ImportRequest, type PruneResult } from '../storage/operations.js';
import { type DiskUsage } from '../storage/usage.js';
import { type ImageInspect, type ImageSummary, type LayerSummary } from '../storage/views.js';

export type { ImportRequest };

export interface ContainerSummary {
  id: string; image: string; imageRefs: string[]; mountpoint: string; readOnly: boolean;
  labels: Record<string, string>; created: string; state: string; serverPid: number | null; layerDir: string | null;
}

/** Container operations: only the daemon has containers. */
export interface ContainerBackend {
  create(request: { id?: string; image: string; mountpoint?: string; readOnly?: boolean; labels?: Record<string, string>; layerDir?: string }): Promise<{ id: string; mountpoint: string }>;
  list(): Promise<ContainerSummary[]>;
  inspect(id: string): Promise<ContainerSummary>;
  remove(id: string, keep: boolean): Promise<{ id: string; kept: boolean }>;
  commit(id: string, ref?: string): Promise<{ image: string; ref: string | null; diffId: string; digest: string; size: number }>;
  diff(id: string): Promise<{ kind: string; path: string }[]>;
  export(id: string, out: NodeJS.WritableStream): Promise<void>;
  health(): Promise<{ status: string; version: string; root: string; uptimeSeconds: number }>;
}

export interface Backend {
  importPath(request: ImportRequest, onProgress?: (event: ImportProgress) => void): Promise<ImportedImage[]>;
  images(): Promise<ImageSummary[]>;
  layers(): Promise<LayerSummary[]>;
  /** Bytes stored, and how much images and snapshots share (`df`). */
  diskUsage(): Promise<DiskUsage>;
  inspect(ref: string): Promise<ImageInspect>;
  tag(source: string, target: string): Promise<{ id: Digest; ref: string }>;
  removeImage(ref: string, force: boolean): Promise<RemoveResult>;
  prune(): Promise<PruneResult>;
  fsck(): Promise<FsckReport>;
  which(ref: string, path: string): Promise<WhichResult>;
  history(ref: string): Promise<HistoryRow[]>;
  layerDiff(ref: string, layer: number): Promise<LayerChange[]>;
  tree(ref: string, path: string, depth: number): Promise<TreeEntry[]>;
  efficiency(ref: string): Promise<Efficiency>;
  /** A directory (absolute path) as a new layer on top of an image, in a new image. */
  commitLayerDir(image: string, dir: string, ref?: string): Promise<{ image: string; ref: string | null; diffId: string; digest: string; size: number }>;
  /** A self-contained HTML page about the image's layers. */
  report(ref: string): Promise<string>;
  close(): Promise<void>;
  /** Present when talking to the daemon. */
  containers?: ContainerBackend;
}
