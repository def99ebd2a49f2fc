/**
 * One layer of an image, lazily, as a layer of no image: the containerd
 * snapshotter's self-fetching path (daemon/snapshotter/registryLayers.ts) for
 * eStargz layers. containerd names the layer by its distribution digest and
 * the image reference; the layer's diffID, size and TOC digest come from the
 * image's manifest and config (fetched and verified by digest, documents not
 * kept), its index from its TOC, exactly as `pull --lazy` records a layer.
 * The caller starts the fill (fill.ts).
 */
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, isDigest } from '../digest.js';
import { noSpaceError } from '../diskSpace.js';
import { Transaction } from '../importer.js';
import { openPullSource } from '../registry/pull.js';
import { type Store } from '../store.js';
import { type LazyPullOptions, notLazyLayer, resolveManifest, stageLazyLayer } from './lazyPull.js';

export type LazyLayerPull =
  /** Recorded lazily (`existed`: the store had the layer, lazy or complete, already). */
  | { kind: 'lazy'; diffId: Digest; existed: boolean }
  /** Cannot be served lazily (not eStargz, not in the image): the caller pulls it in full. */
  | { kind: 'not-lazy'; why: string };

export async function pullLazyLayer(store: Store, reference: string, digest: Digest, options: LazyPullOptions = {}): Promise<LazyLayerPull> {
  if (!isDigest(digest)) throw new LayerdError(ErrorCodes.EINVAL, `not a layer digest: ${JSON.stringify(digest)}`, { digest });
  const { source, deadline } = await openPullSource(store, reference, options);
  const workDir = await store.newWorkDir();
  try {
    const [image] = await source.images();
    if (!image) throw new LayerdError(ErrorCodes.EFORMAT, `${source.description}: the registry offers no image`);
    const found = await resolveManifest(undefined, source, image.descriptor, options);
    const at = found.manifest.layers.findIndex((l) => l.digest === digest);
    if (at === -1) return { kind: 'not-lazy', why: `layer ${digest} is not in the manifest ${found.digest} of ${reference}` };
    const layer = found.manifest.layers[at]!;
    const diffId = found.config.rootfs.diff_ids[at] as Digest;
    if (store.db.getLayer(diffId)) return { kind: 'lazy', diffId, existed: true };
    const why = notLazyLayer(layer);
    if (why !== undefined) return { kind: 'not-lazy', why };
    const tx = new Transaction(store, workDir);
    await tx.disk.check();
    await stageLazyLayer(tx, source, layer, diffId, options.registriesConfig);
    await tx.commit();
    return { kind: 'lazy', diffId, existed: false };
  } catch (err) {
    throw noSpaceError(err, `pulling layer ${digest} of ${reference} lazily`) ?? err;
  } finally {
    await store.releaseWorkDir(workDir);
    deadline.dispose();
    await source.close();
  }
}
