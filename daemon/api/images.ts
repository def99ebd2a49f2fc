/**
 * /v1/images, /v1/layers, /v1/prune, /v1/fsck: image management over the
 * socket. Imports take a path on the host, or the archive streamed as the
 * request body; with `Accept: application/x-ndjson` they stream progress.
 */
import { createWriteStream } from 'node:fs';
import { join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Logger } from '../../common/log.js';
import { commitLayerDirectory } from '../../mount/directoryLayer.js';
import { DiskGuard, noSpaceError } from '../../storage/diskSpace.js';
import { type ImportProgress, type ImportedImage } from '../../storage/importer.js';
import { type ImportRequest, type StoreOperations } from '../../storage/operations.js';
import { type Store } from '../../storage/store.js';
import { HANDLED, type RequestContext, type Router, checkFields, ndjson, readJsonBody, wantsNdjson } from '../http.js';
import { type DaemonMetrics } from '../metrics.js';

const FORMATS = ['oci-layout', 'oci-archive', 'docker-archive', 'layer'];
/** Largest archive accepted as a request body. */
export const MAX_UPLOAD_BYTES = 64 * 1024 ** 3;

export function imageRoutes(router: Router, ops: StoreOperations, store: Store, metrics: DaemonMetrics, logger: Logger): void {
  // One record per image, its digest a field of its own (journalctl DIGEST=sha256:…).
  const imported = (images: ImportedImage[]): ImportedImage[] => {
    for (const image of images) logger.info('image imported', { digest: image.id, refs: image.refs.join(' '), platform: image.platform, layers: image.layers });
    return images;
  };
  const runImport = async (ctx: RequestContext, request: ImportRequest): Promise<unknown> => {
    if (request.format !== undefined && !FORMATS.includes(request.format)) {
      throw new LayerdError(ErrorCodes.EINVAL, `format must be one of ${FORMATS.join(', ')}`);
    }
    // Per layer: progress events of layers imported side by side interleave.
    const last = new Map<string, number>();
    const count = (e: ImportProgress): void => {
      if (e.type === 'layer-progress') {
        metrics.importBytes.inc(Math.max(0, e.bytes - (last.get(e.digest) ?? 0)));
        last.set(e.digest, e.bytes);
      }
      if (e.type === 'layer-start') last.set(e.digest, 0);
    };
    if (!wantsNdjson(ctx.req)) return { images: imported(await ops.importPath(request, count)) };
    const stream = ndjson(ctx.res);
    try {
      stream.end({ images: imported(await ops.importPath(request, (e) => { count(e); stream.event(e); })) });
    } catch (err) {
      stream.fail(err);
    }
    return HANDLED;
  };

  router.add('POST', '/v1/images/import', async (ctx) => {
    const type = ctx.req.headers['content-type'] ?? '';
    if (type.startsWith('application/json') || type === '') {
      const body = checkFields<ImportRequest>(await readJsonBody(ctx.req), {
        path: { type: 'string', required: true }, name: { type: 'string' }, platform: { type: 'string' }, format: { type: 'string' },
      });
      return runImport(ctx, body);
    }
    if (type !== 'application/x-tar' && type !== 'application/octet-stream') {
      throw new LayerdError(ErrorCodes.EINVAL, `unsupported content type ${type}: send JSON {path} or the archive as application/x-tar`);
    }
    // The archive streamed in: stage it in the ingest area, import from there.
    const workDir = await store.newWorkDir();
    try {
      const path = join(workDir, 'upload');
      const declared = Number(ctx.req.headers['content-length'] ?? '0');
      if (declared > MAX_UPLOAD_BYTES) throw new LayerdError(ErrorCodes.ELIMIT, `upload of ${declared} bytes is over the limit`);
      // The upload is written to the store's disk too: keep its reserve, and a full disk is ENOSPC.
      // (Checked before anything reads the request: a 'data' listener would start it flowing.)
      const disk = new DiskGuard(workDir, store.diskReserveBytes);
      await disk.check(declared);
      let received = 0;
      ctx.req.on('data', (chunk: Buffer) => {
        received += chunk.length;
        if (received > MAX_UPLOAD_BYTES) ctx.req.destroy(new LayerdError(ErrorCodes.ELIMIT, 'upload is over the limit'));
      });
      const guard = new Transform({ transform(chunk: Buffer, _enc, callback) { disk.wrote(chunk.length).then(() => callback(null, chunk), callback); } });
      await pipeline(ctx.req, guard, createWriteStream(path, { mode: 0o600 })).catch((err: unknown) => {
        throw noSpaceError(err, 'the uploaded archive') ?? err;
      });
      const name = ctx.query.get('name') ?? undefined;
      const platform = ctx.query.get('platform') ?? undefined;
      const format = ctx.query.get('format') ?? undefined;
      return await runImport(ctx, {
        path, name: name ?? 'imported', ...(platform ? { platform } : {}), ...(format ? { format: format as ImportRequest['format'] & string } : {}),
      });
    } finally {
      await store.releaseWorkDir(workDir);
    }
  });

  router.add('GET', '/v1/images', () => ops.images());
  router.add('GET', '/v1/layers', () => ops.layers());
  router.add('GET', '/v1/df', () => ops.diskUsage());
  router.add('GET', '/v1/images/{ref}', (ctx) => ops.inspect(ctx.params['ref']!));
  router.add('DELETE', '/v1/images/{ref}', (ctx) => ops.removeImage(ctx.params['ref']!, ctx.query.get('force') === '1' || ctx.query.get('force') === 'true'));
  router.add('POST', '/v1/images/{ref}/tag', async (ctx) => {
    const body = checkFields<{ target: string }>(await readJsonBody(ctx.req), { target: { type: 'string', required: true } });
    return ops.tag(ctx.params['ref']!, body.target);
  });
  router.add('POST', '/v1/images/{ref}/commit', async (ctx) => {
    const body = checkFields<{ layerDir: string; ref?: string; comment?: string }>(await readJsonBody(ctx.req), {
      layerDir: { type: 'string', required: true }, ref: { type: 'string' }, comment: { type: 'string' },
    });
    ctx.res.statusCode = 201;
    return commitLayerDirectory(store, ctx.params['ref']!, body.layerDir, body);
  });
  router.add('POST', '/v1/prune', () => ops.prune());
  router.add('GET', '/v1/images/{ref}/which', (ctx) => ops.which(ctx.params['ref']!, ctx.query.get('path') ?? '/'));
  router.add('GET', '/v1/images/{ref}/history', (ctx) => ops.history(ctx.params['ref']!));
  router.add('GET', '/v1/images/{ref}/layers/{n}/diff', (ctx) => ops.layerDiff(ctx.params['ref']!, Number(ctx.params['n'])));
  router.add('GET', '/v1/images/{ref}/tree', (ctx) => {
    const depth = ctx.query.get('depth');
    return ops.tree(ctx.params['ref']!, ctx.query.get('path') ?? '/', depth === null ? Infinity : Number(depth));
  });
  router.add('GET', '/v1/images/{ref}/efficiency', (ctx) => ops.efficiency(ctx.params['ref']!));
  router.add('GET', '/v1/images/{ref}/report', async (ctx) => {
    const html = Buffer.from(await ops.report(ctx.params['ref']!));
    ctx.res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'content-length': html.length, 'content-security-policy': "default-src 'none'; style-src 'unsafe-inline'" });
    ctx.res.end(html);
    return HANDLED;
  });
  router.add('POST', '/v1/fsck', () => ops.fsck());
}
