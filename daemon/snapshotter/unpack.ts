/**
 * Unpack snapshots: the active snapshots containerd prepares only to apply
 * one layer and commit it under that layer's chain ID.
 *
 * containerd 1.6's applier (diff/apply/apply_linux.go) does not mount a
 * single `overlay` mount whose options name an `upperdir=`: it writes the
 * layer's tar straight into that directory, converting whiteouts to
 * overlayfs's form (0/0 character devices, `trusted.overlay.opaque`), and
 * uses the `lowerdir=` entries only to copy the attributes of parent
 * directories it has to create. So an unpack snapshot is a plain directory
 * in overlayfs's format — the format of layerd's writable layers — written
 * at disk speed, not through FUSE; Commit turns it into a store layer in one
 * pass (or keeps the layer the store already has for that chain).
 *
 * Which Prepares are unpacks: those carrying `containerd.io/snapshot.ref`
 * (the pull unpacker sets it to the chain ID), and those whose key is
 * containerd's unpack key `extract-<unique> <chainID>` (`ctr images import`,
 * `ctr images pull` and `ctr run` unpack through image.Unpack, which sets no
 * label). containerd's metadata layer prefixes keys with `<namespace>/<n>/`.
 */
import { type Writable } from 'node:stream';
import { directorySource, scanDirectory, type ScannedDirectory } from '../../mount/lowerDir.js';
import { type Digest, isDigest } from '../../storage/digest.js';
import { writeLayerTar } from '../../storage/layerWriter.js';
import { type MetadataDb } from '../../storage/metadata.js';
import { type IngestedLayerTar, ingestLayerStream } from '../../storage/snapshots.js';
import { type Store } from '../../storage/store.js';

/** The label containerd's unpacker sets to the chain ID a Prepare is meant to produce. */
export const LABEL_SNAPSHOT_REF = 'containerd.io/snapshot.ref';

/** containerd's snapshots.UnpackKeyFormat, `extract-%s %s`, after the metadata layer's `<namespace>/<n>/`. */
const UNPACK_KEY = /^(?:[^/]+\/\d+\/)?extract-\S+ (sha256:[0-9a-f]{64})$/;

/** The chain ID an unpack Prepare will be committed as, or undefined when the Prepare is not an unpack. */
export function unpackTargetOf(key: string, labels: Readonly<Record<string, string>>): Digest | undefined {
  const labelled = labels[LABEL_SNAPSHOT_REF];
  if (isDigest(labelled)) return labelled;
  const m = UNPACK_KEY.exec(key);
  return m !== null && isDigest(m[1]) ? m[1] : undefined;
}

/** The containerd namespace of a key its metadata layer made (`<namespace>/<n>/<key>`), if it is one. */
export function namespaceOf(key: string): string | undefined {
  return /^([^/]+)\/\d+\//.exec(key)?.[1];
}

/**
 * The mount answered for an unpack snapshot: one overlay mount, so that
 * containerd's applier writes into `upper` itself. `lower` is an empty
 * directory (the store's layers are not directories); the options still
 * form a valid overlay mount of the changes alone, should anyone mount them.
 */
export function unpackMounts(dirs: { upper: string; work: string; lower: string }): { type: string; source: string; target: string; options: string[] }[] {
  return [{ type: 'overlay', source: 'overlay', target: '', options: [`workdir=${dirs.work}`, `upperdir=${dirs.upper}`, `lowerdir=${dirs.lower}`] }];
}

/**
 * A directory in overlayfs's format as a store layer, in one pass (`walked`: its walk, if
 * one was made already): the scan is written as a layer tar straight into the ingest that hashes, indexes
 * and stores it. `record` runs in the transaction that makes the layer visible.
 */
export async function directoryToLayer(
  store: Store, dir: string, label: string, record: (db: MetadataDb, layer: IngestedLayerTar) => void, walked?: ScannedDirectory,
): Promise<IngestedLayerTar> {
  const scanned = walked ?? await scanDirectory(dir, label, 'overlay');
  return ingestLayerStream(store, (out: Writable) => writeLayerTar(directorySource(scanned), out), record);
}
