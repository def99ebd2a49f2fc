/**
 * A walk of a plain directory (scanDirectory) kept in a file, so that a
 * mount host serves the directory as a layer without walking it again.
 *
 * The daemon walks each unpack directory containerd commits while the layer
 * is still pending (daemon/snapshotter/service.ts), at Commit, when the
 * directory is final; the first container on those layers then mounts
 * without the walk (~15 µs an entry, 8.4k entries for a Debian image, on its
 * critical path). The file lives in the daemon's store, beside the
 * directory, and is written by the daemon only (the directory's content is
 * untrusted; this description of it is not). A host still opens every file
 * through the system-call layer and checks it is the file the walk saw
 * (openScannedFile: device, inode, type, size), so a directory changed since
 * its walk gives ESTALE, never other bytes.
 */
import { readFile, rename, rm, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { LAYER_INDEX_VERSION, type LayerIndex, type LayerSource } from '../storage/layerIndex.js';
import { directorySource, type ScannedDirectory } from './lowerDir.js';

const SCAN_FILE_VERSION = 1;

/** What a scan file holds: the parts of a ScannedDirectory that serving it needs. */
interface ScanFile {
  version: typeof SCAN_FILE_VERSION;
  root: string;
  dev: number;
  index: LayerIndex;
  /** st_ino of `index.entries[i]`. */
  inodes: number[];
  /** st_dev of entries on another filesystem, by path. */
  devs: [string, number][];
}

/** Write `scanned` to `file` (whole or not at all: a temporary file renamed over it). */
export async function writeDirectoryScan(scanned: ScannedDirectory, file: string): Promise<void> {
  const record: ScanFile = {
    version: SCAN_FILE_VERSION, root: scanned.root, dev: scanned.dev, index: scanned.index,
    inodes: scanned.index.entries.map((e) => scanned.inodes.get(e.path) ?? -1), devs: [...scanned.devs],
  };
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    await writeFile(tmp, JSON.stringify(record), { mode: 0o600 });
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

/** The directory `dir` as a layer, from the scan in `file` (ECORRUPT when the file is not a scan of `dir`). */
export async function directoryScanSource(file: string, dir: string): Promise<LayerSource> {
  const bad = (why: string): LayerdError => new LayerdError(ErrorCodes.ECORRUPT, `directory scan ${file}: ${why}`, { path: file, dir });
  let record: ScanFile;
  try {
    record = JSON.parse(await readFile(file, 'utf8')) as ScanFile;
  } catch (err) {
    if (err instanceof SyntaxError) throw bad('not JSON');
    throw err;
  }
  if (record.version !== SCAN_FILE_VERSION || record.index?.version !== LAYER_INDEX_VERSION) throw bad('unknown version');
  if (record.root !== resolve(dir)) throw bad(`describes ${String(record.root)}`);
  const entries = record.index.entries;
  if (!Array.isArray(entries) || !Array.isArray(record.inodes) || record.inodes.length !== entries.length) throw bad('inodes do not match the entries');
  const inodes = new Map<string, number>();
  entries.forEach((e, i) => inodes.set(e.path, record.inodes[i]!));
  return directorySource({ root: record.root, index: record.index, inodes, dev: record.dev, devs: new Map(record.devs) });
}
