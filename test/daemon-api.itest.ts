/**
 * The daemon over its socket: images through the CLI and raw HTTP, bad
 * requests answered with their codes (and the daemon still standing),
 * socket permissions, persistence across restarts, config reload, SIGTERM.
 */
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { access, mkdir, readFile, readdir, readlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BUSYBOX, DEBIAN_MULTI, execFileAsync, layerctl, scratch } from './support/env.js';
import { type RunningDaemon, http, startDaemon, waitFor } from './support/daemon.js';

describe('daemon: the socket API', function () {
  this.timeout(180_000);
  let work: { dir: string; remove(): Promise<void> };
  let daemon: RunningDaemon | undefined;
  let configPath: string;
  let spool: string;

  before(async () => {
    work = await scratch();
    configPath = join(work.dir, 'config.json');
    spool = join(work.dir, 'spool');
    await writeFile(configPath, JSON.stringify({ logLevel: 'info', spoolDir: spool }));
    daemon = await startDaemon(work.dir, ['--config', configPath]);
  });
  after(async () => {
    await daemon?.stop();
    await work?.remove();
  });

  const cli = (...args: string[]) => layerctl(['--socket', daemon!.socket, ...args]);

  it('imports and lists through the CLI, with the same answers as offline mode', async () => {
    const r = await cli('import', DEBIAN_MULTI, '--json');
    expect(r.code, r.stderr).to.equal(0);
    const images = JSON.parse((await cli('images', '--json')).stdout) as { refs: string[] }[];
    expect(images.flatMap((i) => i.refs)).to.include.members(['debian-multi:latest', 'debian-multi:l1-minbase']);
    const info = JSON.parse((await cli('inspect', 'debian-multi:latest')).stdout) as { Layers: unknown[] };
    expect(info.Layers).to.have.length(4);
    expect((await cli('fsck')).code).to.equal(0);
    const df = JSON.parse((await cli('df', '--json')).stdout) as { layers: { count: number }; savedBySharing: number; images: unknown[] };
    expect(df.layers.count).to.equal(4);
    expect(df.images).to.have.length(images.length);
    expect(df.savedBySharing).to.be.greaterThan(0); // the corpus tags share their lower layers
  });

  it('imports an archive streamed in the request body', async () => {
    const tar = join(work.dir, 'bb.oci.tar');
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', `oci:${BUSYBOX}:latest`, `oci-archive:${tar}:v1`]);
    const curl = await execFileAsync('curl', ['-sS', '--unix-socket', daemon!.socket, '-H', 'content-type: application/x-tar',
      '--data-binary', `@${tar}`, 'http://layerd/v1/images/import?name=streamed']);
    const body = JSON.parse(curl.stdout) as { images: { refs: string[] }[] };
    expect(body.images[0]!.refs).to.deep.equal(['streamed:v1']);
  });

  it('answers bad requests with clear 4xx codes and keeps serving', async () => {
    const s = daemon!.socket;
    const cases: [string, string, string | undefined, number, string][] = [
      ['POST', '/v1/images/import', '{"path": ', 400, 'EINVAL'],
      ['POST', '/v1/images/import', '{"path": 42}', 400, 'EINVAL'],
      ['POST', '/v1/images/import', '{"path": "/x", "bogus": 1}', 400, 'EINVAL'],
      ['POST', '/v1/images/import', '{"path": "/x", "__proto__": {"polluted": 1}}', 400, 'EINVAL'],
      ['POST', '/v1/images/import', '{"path": "/x", "constructor": 1}', 400, 'EINVAL'],
      ['POST', '/v1/images/import', '[1,2]', 400, 'EINVAL'],
      ['POST', '/v1/images/import', '{"path": "/does/not/exist"}', 404, 'ENOTFOUND'],
      ['GET', '/v1/images/no-such-image', undefined, 404, 'ENOTFOUND'],
      ['GET', '/v1/images/..%2F..%2Fetc', undefined, 400, 'EINVAL'],
      ['GET', '/v1/images/a%00b', undefined, 400, 'EINVAL'],
      ['GET', '/v1/images/%E0%A4%A', undefined, 400, 'EINVAL'],
      ['GET', '/v1/nothing-here', undefined, 404, 'ENOTFOUND'],
      ['PUT', '/v1/images', '{}', 405, 'EINVAL'],
      ['POST', '/v1/images/debian-multi:latest/tag', '{"target": "UPPER CASE"}', 400, 'EINVAL'],
    ];
    for (const [method, path, body, status, code] of cases) {
      const r = await http(s, method, path, body, body ? { 'content-type': 'application/json' } : {});
      expect(r.status, `${method} ${path}: ${r.body}`).to.equal(status);
      expect(r.json<{ code: string }>().code, `${method} ${path}`).to.equal(code);
    }
    const huge = await http(s, 'POST', '/v1/images/import', `{"path": "${'a'.repeat(2 * 1024 * 1024)}"}`, { 'content-type': 'application/json' });
    expect(huge.status).to.equal(413);
    expect((await http(s, 'GET', '/v1/health')).status).to.equal(200);
  });

  it('serves its OpenAPI description and Prometheus metrics', async () => {
    const api = await http(daemon!.socket, 'GET', '/v1/openapi.json');
    expect(api.status).to.equal(200);
    expect(api.json<{ openapi: string; paths: Record<string, unknown> }>().openapi).to.match(/^3\./);
    const metrics = await http(daemon!.socket, 'GET', '/metrics');
    expect(metrics.body).to.match(/^layerd_images \d+/m);
    expect(metrics.body).to.match(/^layerd_api_requests_total\{method="GET",status="404"\} \d+/m);
  });

  it('lets only root and the socket group connect', async () => {
    // uid 65534 (nobody) is neither root nor in the socket's group
    const r = await new Promise<{ code: number | null; out: string }>((resolve) => {
      const p = spawn('setpriv', ['--reuid', '65534', '--regid', '65534', '--clear-groups', 'curl', '-sS', '--unix-socket', daemon!.socket, 'http://layerd/v1/health'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      p.stdout.on('data', (d: Buffer) => { out += d.toString(); });
      p.stderr.on('data', (d: Buffer) => { out += d.toString(); });
      p.on('exit', (code) => resolve({ code, out }));
    });
    expect(r.code).to.not.equal(0);
    expect(r.out).to.match(/Permission denied|Couldn't connect/i);
  });

  it('refuses an offline layerctl on the store it holds, at once', async () => {
    const t0 = Date.now();
    const r = await layerctl(['--root', daemon!.root, 'images']);
    expect(r.code).to.equal(5);
    expect(r.stderr).to.contain('EBUSY');
    expect(r.stderr).to.contain(daemon!.socket);
    expect(Date.now() - t0).to.be.below(5000);
  });

  it('imports archives dropped into the spool directory, and sets aside bad ones', async () => {
    const good = join(work.dir, 'spooled.oci.tar');
    await execFileAsync('skopeo', ['--insecure-policy', 'copy', '-q', `oci:${BUSYBOX}:latest`, `oci-archive:${good}:spooled`]);
    await execFileAsync('cp', [good, join(spool, 'bb.oci.tar')]);
    await writeFile(join(spool, 'junk.tar'), 'this is not a tar archive at all');
    const deadline = Date.now() + 30_000;
    const exists = (p: string) => access(p).then(() => true, () => false);
    while (!(await exists(join(spool, 'done', 'bb.oci.tar')) && await exists(join(spool, 'failed', 'junk.tar.error'))) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 200));
    }
    expect(await exists(join(spool, 'done', 'bb.oci.tar'))).to.equal(true);
    expect(await readFile(join(spool, 'failed', 'junk.tar.error'), 'utf8')).to.match(/^EBADTAR: /);
    const images = JSON.parse((await cli('images', '--json')).stdout) as { refs: string[] }[];
    expect(images.flatMap((i) => i.refs)).to.include('bb:spooled');
  });

  it('applies a changed log level without a restart', async () => {
    await writeFile(configPath, JSON.stringify({ logLevel: 'debug', spoolDir: spool }));
    await waitFor('the reload', () => daemon!.log().includes('configuration reloaded'), 10_000);
    await http(daemon!.socket, 'GET', '/v1/health');
    // The request is logged when it is answered; poll for the line, not a fixed time.
    await waitFor('a debug request line', () => /"level":"debug","message":"request"/.test(daemon!.log()), 10_000);
  });

  it('does not watch a configuration that is not a regular file (--config /dev/null)', async () => {
    const dir = join(work.dir, 'devnull');
    await mkdir(dir);
    const other = await startDaemon(dir, ['--config', '/dev/null', '--snapshotter-socket', 'none']);
    try {
      for (let i = 0; i < 20; i++) await writeFile('/dev/null', 'x');
      await http(other.socket, 'GET', '/v1/health');
    } finally {
      expect(await other.stop()).to.equal(0);
    }
    expect(other.log()).to.contain('not a regular file: not watched');
    expect(other.log()).to.not.contain('configuration reloaded');
  });

  it('a commit whose layer directory changes underneath fails with ECONFLICT saying so, and keeps no descriptor open', async () => {
    const dir = join(work.dir, 'changing');
    await mkdir(dir);
    await writeFile(join(dir, 'ok'), 'ok\n');
    // A file whose content is not the size its stat says: what a file written during the commit looks like.
    await writeFile(join(dir, 'growing'), '');
    await execFileAsync('mount', ['--bind', '/sys/kernel/mm/transparent_hugepage/enabled', join(dir, 'growing')]);
    try {
      for (let i = 0; i < 3; i++) {
        const r = await cli('commit', '--layer-dir', dir, 'debian-multi:latest', `changing:${i}`);
        expect(r.code, r.stderr).to.equal(4);
        expect(r.stderr).to.contain('ECONFLICT').and.to.contain(`${dir} changed while it was being committed`);
      }
    } finally {
      await execFileAsync('umount', [join(dir, 'growing')]);
    }
    const fds = await readdir(`/proc/${daemon!.pid}/fd`);
    const links = await Promise.all(fds.map((fd) => readlink(`/proc/${daemon!.pid}/fd/${fd}`).catch(() => '')));
    expect(links.filter((l) => l.startsWith(join(daemon!.root, 'tmp'))), 'descriptors into the ingest area').to.deep.equal([]);
    expect((await cli('fsck')).code).to.equal(0);
  });

  it('keeps images across a restart and exits 0 on SIGTERM', async () => {
    const code = await daemon!.stop();
    expect(code).to.equal(0);
    daemon = await startDaemon(work.dir, ['--config', configPath]);
    const images = JSON.parse((await cli('images', '--json')).stdout) as { refs: string[] }[];
    expect(images.flatMap((i) => i.refs)).to.include('debian-multi:latest');
  });
});
