/**
 * The image operations of a store, as both faces of layerd offer them: the
 * daemon's API and `layerctl --root` (offline) call the same code.
 */
import { type DiskUsage, diskUsage } from './usage.js';
import {
  type Efficiency, type HistoryRow, type LayerChange, type TreeEntry, type WhichResult,
  diffLayer, efficiency, history, loadStack, tree, which,
} from './analysis.js';
import { type Digest } from './digest.js';
import { imageReport } from './report.js';
import { type FsckReport, fsck } from './fsck.js';
import { type GcResult, type RemoveResult, prune, removeImage, tagImage } from './gc.js';
import { type ImportProgress, type ImportedImage, importFromSource, importRawLayer } from './importer.js';
import { parsePlatform } from './platform.js';
import { type SourceFormat, detectSource } from './sources/detect.js';
import { type Store } from './store.js';
import { type ImageInspect, type ImageSummary, type LayerSummary, inspectImage, listImages, listLayers } from './views.js';

export interface ImportRequest {
  path: string;
  name?: string;
  platform?: string;
  format?: SourceFormat;
}

export interface PruneResult {
  images: Digest[];
  gc: GcResult;
  tmpDirs: number;
}

export class StoreOperations {
  constructor(readonly store: Store) {}

  async importPath(request: ImportRequest, onProgress?: (event: ImportProgress) => void): Promise<ImportedImage[]> {
    const options = {
      ...(request.platform ? { platform: parsePlatform(request.platform) } : {}),
      ...(onProgress ? { onProgress } : {}),
    };
    const detected = await detectSource(request.path, {
      ...(request.name ? { name: request.name } : {}),
      ...(request.format ? { format: request.format } : {}),
    });
    if (detected.kind === 'layer') return importRawLayer(this.store, detected.path, detected.name, options);
    try {
      return await importFromSource(this.store, detected.source, options);
    } finally {
      await detected.source.close();
    }
  }

  async images(): Promise<ImageSummary[]> { return listImages(this.store); }
  async layers(): Promise<LayerSummary[]> { return listLayers(this.store); }
  async diskUsage(): Promise<DiskUsage> { return diskUsage(this.store); }
  inspect(ref: string): Promise<ImageInspect> { return inspectImage(this.store, ref); }
  async tag(source: string, target: string): Promise<{ id: Digest; ref: string }> { return tagImage(this.store, source, target); }
  removeImage(ref: string, force: boolean): Promise<RemoveResult> { return removeImage(this.store, ref, { force }); }
  prune(): Promise<PruneResult> { return prune(this.store); }
  fsck(): Promise<FsckReport> { return fsck(this.store); }

  // --- debugging layer stacks (from the indexes; nothing is extracted) ---
  async which(ref: string, path: string): Promise<WhichResult> { return which(await loadStack(this.store, ref), path); }
  history(ref: string): Promise<HistoryRow[]> { return history(this.store, ref); }
  async layerDiff(ref: string, layer: number): Promise<LayerChange[]> { return diffLayer(await loadStack(this.store, ref), layer); }
  async tree(ref: string, path: string, depth: number): Promise<TreeEntry[]> { return tree(await loadStack(this.store, ref), path, depth); }
  async efficiency(ref: string): Promise<Efficiency> { return efficiency(await loadStack(this.store, ref)); }
  report(ref: string): Promise<string> { return imageReport(this.store, ref); }
}
