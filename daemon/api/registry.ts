/**
 * /v1/images/pull and /v1/images/{ref}/push: registry transfers through the
 * daemon, with the registries configuration and timeouts the daemon was
 * given. With `Accept: application/x-ndjson` a pull streams per-layer
 * progress. A client that goes away before the answer cancels the transfer:
 * downloads stop and the ingest directory is removed.
 */
import { type ImportProgress } from '../../storage/importer.js';
import { parsePlatform } from '../../storage/platform.js';
import { EMPTY_CONFIG, type RegistriesConfig, loadRegistriesConfig } from '../../storage/registry/config.js';
import { pullImage } from '../../storage/registry/pull.js';
import { type LazyFills } from '../../storage/lazy/fill.js';
import { pullLazy } from '../../storage/lazy/lazyPull.js';
import { type PushCompression, pushImage } from '../../storage/registry/push.js';
import { type AbortCause, type TimeoutSettings, timeoutsFrom } from '../../storage/registry/timeouts.js';
import { type Store } from '../../storage/store.js';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { HANDLED, type RequestContext, type Router, checkFields, ndjson, readJsonBody, wantsNdjson } from '../http.js';

export function registryRoutes(router: Router, store: Store, configPath: string | undefined, timeoutSettings?: TimeoutSettings, lazyFills?: LazyFills): void {
  const config = async (): Promise<RegistriesConfig> => (configPath ? loadRegistriesConfig(configPath) : EMPTY_CONFIG);
  const timeouts = timeoutsFrom(timeoutSettings);

  router.add('POST', '/v1/images/pull', async (ctx) => {
    const body = checkFields<{ ref: string; platform?: string; lazy?: boolean }>(await readJsonBody(ctx.req), {
      ref: { type: 'string', required: true }, platform: { type: 'string' }, lazy: { type: 'boolean' },
    });
    const signal = cancelledWhenClientLeaves(ctx);
    const run = async (onProgress?: (e: ImportProgress) => void): Promise<unknown> => {
      const options = {
        config: await config(), ...(body.platform ? { platform: parsePlatform(body.platform) } : {}), ...(onProgress ? { onProgress } : {}),
        timeouts, signal,
      };
      if (body.lazy !== true) return { images: await pullImage(store, body.ref, options) };
      // Lazily: the layers' fills run on in the background, past this answer.
      const pulled = await pullLazy(store, body.ref, { ...options, ...(configPath ? { registriesConfig: configPath } : {}) });
      for (const diffId of pulled.lazyLayers) void lazyFills?.start(diffId);
      return { images: pulled.images, lazyLayers: pulled.lazyLayers, ...(pulled.fallback ? { fallback: pulled.fallback } : {}) };
    };
    if (!wantsNdjson(ctx.req)) return run();
    const stream = ndjson(ctx.res);
    try {
      stream.end(await run((e) => stream.event(e)));
    } catch (err) {
      stream.fail(err);
    }
    return HANDLED;
  });

  router.add('POST', '/v1/images/{ref}/push', async (ctx) => {
    const body = checkFields<{ target: string; compress?: string; gzipIndex?: boolean }>(await readJsonBody(ctx.req), {
      target: { type: 'string', required: true }, compress: { type: 'string' }, gzipIndex: { type: 'boolean' },
    });
    if (body.compress !== undefined && body.compress !== 'gzip' && body.compress !== 'zstd') {
      throw new LayerdError(ErrorCodes.EINVAL, `compress must be gzip or zstd`);
    }
    return pushImage(store, ctx.params['ref']!, body.target, {
      config: await config(), compression: (body.compress ?? 'gzip') as PushCompression, timeouts, signal: cancelledWhenClientLeaves(ctx),
      ...(body.gzipIndex === false ? { gzipIndex: false } : {}),
    });
  });
}

/** A signal aborted when the API connection closes before the answer was sent in full. */
function cancelledWhenClientLeaves(ctx: RequestContext): AbortSignal {
  const controller = new AbortController();
  ctx.res.once('close', () => {
    const cause: AbortCause = { kind: 'cancelled', why: 'the API client disconnected' };
    if (!ctx.res.writableFinished) controller.abort(cause);
  });
  return controller.signal;
}
