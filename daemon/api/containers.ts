/**
 * /v1/containers: create (mount), list, inspect, remove, commit, diff and
 * export of containers' writable layers.
 */
import { Writable } from 'node:stream';
import { HANDLED, type Router, checkFields, readJsonBody } from '../http.js';
import { type ContainerManager, type CreateRequest } from '../containers.js';

export function containerRoutes(router: Router, containers: ContainerManager, hooks: { creating?: () => void } = {}): void {
  router.add('POST', '/v1/containers', async (ctx) => {
    const body = checkFields<CreateRequest>(await readJsonBody(ctx.req), {
      id: { type: 'string' }, image: { type: 'string', required: true }, mountpoint: { type: 'string' },
      readOnly: { type: 'boolean' }, labels: { type: 'object' }, layerDir: { type: 'string' },
    });
    hooks.creating?.();
    const created = await containers.create(body);
    ctx.res.statusCode = 201;
    return created;
  });
  router.add('GET', '/v1/containers', async () => containers.list());
  router.add('GET', '/v1/containers/{id}', async (ctx) => containers.inspect(ctx.params['id']!));
  router.add('DELETE', '/v1/containers/{id}', (ctx) => {
    const keep = ctx.query.get('keep');
    return containers.remove(ctx.params['id']!, keep === '1' || keep === 'true');
  });
  router.add('POST', '/v1/containers/{id}/commit', async (ctx) => {
    const body = checkFields<{ ref?: string; comment?: string }>(await readJsonBody(ctx.req), { ref: { type: 'string' }, comment: { type: 'string' } });
    return containers.commit(ctx.params['id']!, body);
  });
  router.add('GET', '/v1/containers/{id}/diff', (ctx) => containers.diff(ctx.params['id']!));
  router.add('GET', '/v1/containers/{id}/export', async (ctx) => {
    containers.inspect(ctx.params['id']!); // 404 before any byte is sent
    // The status goes out with the first byte: a layer that cannot be written
    // (a name an OCI layer cannot express) is refused before it, as an error.
    const res = ctx.res;
    const sendHead = (): void => { if (!res.headersSent) res.writeHead(200, { 'content-type': 'application/x-tar' }); };
    const out = new Writable({
      write(chunk: Buffer, _encoding, done) { sendHead(); res.write(chunk, done); },
      final(done) { sendHead(); res.end(done); },
    });
    res.on('close', () => out.destroy());
    await containers.export(ctx.params['id']!, out);
    return HANDLED;
  });
}
