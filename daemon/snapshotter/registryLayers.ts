/**
 * The snapshotter fetches layers itself: a ChainLayerSource that reads what
 * containerd says a snapshot's layer is — the image reference and the
 * layer's distribution digest — from the labels of the Prepare, and pulls
 * that blob from the registry with layerd's own client (registries config:
 * auth, mirrors, TLS; redirects; resumed downloads; timeouts) into the store.
 *
 * Two label sets name a layer (containerd passes labels under
 * `containerd.io/snapshot/` from the layer descriptor's annotations):
 *
 * - the CRI plugin's, with `disable_snapshot_annotations = false`:
 *   `cri.image-ref`, `cri.layer-digest`, and `cri.image-layers` (this and
 *   the following layers' digests);
 * - `ctr-remote images rpull`'s (stargz-snapshotter 0.12):
 *   `remote/stargz.reference`, `remote/stargz.digest`, `remote/stargz.layers`.
 *
 * containerd prepares one layer at a time and waits for each answer, so on
 * the first Prepare of an image the following layers are fetched too, in the
 * background (at most `concurrency` at once): their Prepares then find them
 * fetched or being fetched. A fetch of one digest is shared by every Prepare
 * that asks for it meanwhile (two namespaces pulling one image).
 *
 * An eStargz layer (its Prepare labels carry the layer's
 * `containerd.io/snapshot/stargz/toc.digest` annotation, as containerd passes
 * a layer's `containerd.io/snapshot/` annotations) is pulled lazily when the
 * daemon allows it (`lazy`): only its TOC is fetched, the snapshot is there at
 * once, its content is fetched as it is read, and the daemon's background fill
 * completes it (storage/lazy/). The image's later layers are then pulled
 * lazily too; one that turns out not to be eStargz is pulled in full.
 */
import { type Logger } from '../../common/log.js';
import { type Digest, isDigest } from '../../storage/digest.js';
import { type RetryPolicy } from '../../storage/registry/client.js';
import { type RegistriesConfig } from '../../storage/registry/config.js';
import { TOC_DIGEST_ANNOTATION } from '../../storage/lazy/estargz.js';
import { pullLazyLayer } from '../../storage/lazy/lazyLayerPull.js';
import { pullLayer } from '../../storage/registry/layer.js';
import { DEFAULT_PULL_CONCURRENCY } from '../../storage/registry/pull.js';
import { type AbortCause, type RegistryTimeouts } from '../../storage/registry/timeouts.js';
import { type Store } from '../../storage/store.js';
import { type ChainLayerSource, type LayerRequest } from './service.js';

const PREFIX = 'containerd.io/snapshot/';

/** Where a layer is, as one label set names it. */
interface LabelSet { reference: string; digest: string; following: string }

export const LABEL_SETS: Readonly<Record<'cri' | 'stargz', LabelSet>> = {
  cri: { reference: `${PREFIX}cri.image-ref`, digest: `${PREFIX}cri.layer-digest`, following: `${PREFIX}cri.image-layers` },
  stargz: { reference: `${PREFIX}remote/stargz.reference`, digest: `${PREFIX}remote/stargz.digest`, following: `${PREFIX}remote/stargz.layers` },
};

/** The layer a Prepare's labels name: image reference, its digest, and the image's later layers. */
export interface NamedLayer {
  reference: string;
  digest: Digest;
  /** Digests of the layers after this one (from the labels that list them), in order. */
  following: Digest[];
}

export function namedLayerOf(labels: Readonly<Record<string, string>>): NamedLayer | undefined {
  for (const set of Object.values(LABEL_SETS)) {
    const reference = labels[set.reference];
    const digest = labels[set.digest];
    if (!reference || !isDigest(digest)) continue;
    const listed = (labels[set.following] ?? '').split(',').map((d) => d.trim()).filter(isDigest);
    const at = listed.indexOf(digest);
    return { reference, digest, following: at === -1 ? [] : listed.slice(at + 1) };
  }
  return undefined;
}

export interface RegistryLayerSourceOptions {
  /** The registries configuration (read again for each fetch, as pulls through the API do). */
  config: () => Promise<RegistriesConfig>;
  timeouts?: RegistryTimeouts;
  /** Layers fetched at once (default: as many as a pull downloads at once). */
  concurrency?: number;
  /** Pull eStargz layers lazily; `started` is told each layer recorded lazily (its fill is the caller's to start). */
  lazy?: { registriesConfig?: string; started(diffId: Digest): void };
}

/**
 * containerd waits in Prepare while layerd fetches: a registry that does not
 * answer is given up on quickly (containerd then downloads the layer itself,
 * with its own retries), not after a pull's patient retries.
 */
const FETCH_RETRY: RetryPolicy = { retries: 2, backoffMs: 200, maxBackoffMs: 1_000 };

/** How long a finished fetch is remembered for a Prepare still to come (its layer may be collected meanwhile). */
const REMEMBER_MS = 10 * 60_000;

export class RegistryLayerSource implements ChainLayerSource {
  /** digest → its fetch (shared by everyone who asks meanwhile), and the layer's diffID once fetched. */
  private readonly fetches = new Map<Digest, { fetching: Promise<Digest>; diffId?: Digest }>();
  private running = 0;
  private readonly waiting: (() => void)[] = [];
  /** Aborted at daemon stop: fetches in progress end at once, later ones fail at once (their Prepares fall back). */
  private readonly stopper = new AbortController();

  constructor(private readonly store: Store, private readonly logger: Logger, private readonly options: RegistryLayerSourceOptions) {}

  async layerFor(request: LayerRequest): Promise<Digest | undefined> {
    const named = namedLayerOf(request.labels);
    if (named === undefined) return undefined;
    const lazy = this.options.lazy !== undefined && isDigest(request.labels[TOC_DIGEST_ANNOTATION]);
    const own = this.fetch(named.reference, named.digest, 'requested', lazy);
    for (const d of named.following) void this.fetch(named.reference, d, 'prefetch', lazy).catch(() => undefined); // its own Prepare reports a failure
    let diffId = await own;
    if (!this.store.db.getLayer(diffId)) {
      // Collected (a store GC, containerd removing the snapshot) between its fetch and now: once more.
      this.fetches.delete(named.digest);
      diffId = await this.fetch(named.reference, named.digest, 'requested', lazy);
    }
    return diffId;
  }

  /** The fetch of `digest` in progress or done, else a new one (queued behind `concurrency` others). */
  private fetch(reference: string, digest: Digest, why: 'requested' | 'prefetch', lazy: boolean): Promise<Digest> {
    const known = this.fetches.get(digest);
    if (known !== undefined && (known.diffId === undefined || this.store.db.getLayer(known.diffId))) return known.fetching;
    const started = Date.now();
    const fetching = this.slot(async () => {
      const options = {
        config: await this.options.config(), retry: FETCH_RETRY, signal: this.stopper.signal,
        ...(this.options.timeouts ? { timeouts: this.options.timeouts } : {}),
      };
      if (lazy && this.options.lazy) {
        const { registriesConfig, started: fillStarted } = this.options.lazy;
        const pulled = await pullLazyLayer(this.store, reference, digest, { ...options, ...(registriesConfig !== undefined ? { registriesConfig } : {}) });
        if (pulled.kind === 'lazy') {
          if (!pulled.existed) fillStarted(pulled.diffId);
          this.logger.info('snapshotter pulled a layer lazily', { reference, digest, diffId: pulled.diffId, ms: Date.now() - started, why, alreadyStored: pulled.existed });
          return pulled.diffId;
        }
        this.logger.info('snapshotter cannot pull a layer lazily: fetching it in full', { reference, digest, why: pulled.why });
      }
      const pulled = await pullLayer(this.store, reference, digest, options);
      this.logger.info('snapshotter fetched a layer', {
        reference, digest, diffId: pulled.diffId, bytes: pulled.blobBytes, ms: Date.now() - started, why, alreadyStored: pulled.existed,
      });
      return pulled.diffId;
    });
    const entry: { fetching: Promise<Digest>; diffId?: Digest } = { fetching };
    this.fetches.set(digest, entry);
    fetching.then(
      (diffId) => {
        entry.diffId = diffId;
        setTimeout(() => { if (this.fetches.get(digest) === entry) this.fetches.delete(digest); }, REMEMBER_MS).unref();
      },
      (err: unknown) => {
        if (this.fetches.get(digest) === entry) this.fetches.delete(digest);
        this.logger.warn('snapshotter could not fetch a layer', { reference, digest, why, error: (err as Error).message });
      },
    );
    return fetching;
  }

  /** Daemon stop: cancel the fetches in progress and wait until they have ended. */
  async stop(): Promise<void> {
    const cause: AbortCause = { kind: 'cancelled', why: 'the daemon is stopping' };
    this.stopper.abort(cause);
    await Promise.allSettled([...this.fetches.values()].map((f) => f.fetching));
  }

  /** Run `job` when fewer than `concurrency` fetches run. */
  private async slot<T>(job: () => Promise<T>): Promise<T> {
    const limit = this.options.concurrency ?? DEFAULT_PULL_CONCURRENCY;
    // A finished job hands its slot straight to the next in line (no newcomer slips in between).
    if (this.running >= limit) await new Promise<void>((resolve) => this.waiting.push(resolve));
    else this.running++;
    try {
      return await job();
    } finally {
      const next = this.waiting.shift();
      if (next) next();
      else this.running--;
    }
  }
}
