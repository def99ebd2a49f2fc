/**
 * `layerctl report` writes one self-contained HTML page; headless Chromium
 * (Debian's) renders it with the network off, shows debian-multi's four
 * layers, and the test writes a screenshot. The daemon serves the same page.
 */
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { DEBIAN_MULTI, layerctl, layerctlJson, scratch } from './support/env.js';
import { http, startDaemon } from './support/daemon.js';

function chromium(args: string[], userDataDir: string): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile('chromium', [
      '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', `--user-data-dir=${userDataDir}`, ...args,
    ], { timeout: 90_000, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => (err ? reject(err) : resolve({ stdout, stderr })));
  });
}

describe('HTML report of a layer stack, rendered in headless Chromium', function () {
  this.timeout(240_000);
  let work: { dir: string; remove(): Promise<void> };
  before(async () => { work = await scratch(); });
  after(async () => { await work?.remove(); });

  it('renders the four layers of debian-multi, a treemap and the waste table; screenshot written', async () => {
    const root = join(work.dir, 'store');
    await layerctlJson(['--root', root, 'import', DEBIAN_MULTI]);
    const page = join(work.dir, 'report.html');
    const r = await layerctl(['--root', root, 'report', 'debian-multi:latest', '-o', page]);
    expect(r.code, r.stderr).to.equal(0);
    const html = await readFile(page, 'utf8');
    expect(html).to.not.match(/<script|https?:\/\//i); // self-contained: nothing fetched, nothing run
    const dom = (await chromium(['--dump-dom', `file://${page}`], join(work.dir, 'chrome-1'))).stdout;
    expect(dom.match(/<tr class="layer"/g)).to.have.length(4);
    expect(dom).to.contain('class="treemap"');
    expect(dom).to.match(/<g class="cell" data-layer="4">/);
    expect(dom).to.contain('/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages');
    const shot = join(work.dir, 'report.png');
    await chromium(['--window-size=1100,1100', `--screenshot=${shot}`, `file://${page}`], join(work.dir, 'chrome-2'));
    const png = await readFile(shot);
    expect(png.subarray(0, 8).toString('hex')).to.equal('89504e470d0a1a0a');
    expect(png.length).to.be.greaterThan(20_000);
  });

  it('is served read-only by the daemon', async () => {
    const daemon = await startDaemon(join(work.dir, 'daemon'));
    try {
      await layerctlJson(['--socket', daemon.socket, 'import', DEBIAN_MULTI]);
      const res = await http(daemon.socket, 'GET', `/v1/images/${encodeURIComponent('debian-multi:latest')}/report`);
      expect(res.status).to.equal(200);
      expect(res.headers['content-type']).to.match(/^text\/html/);
      expect(res.body.match(/<tr class="layer"/g)).to.have.length(4);
      expect((await http(daemon.socket, 'POST', `/v1/images/${encodeURIComponent('debian-multi:latest')}/report`, '{}')).status).to.equal(405);
    } finally {
      await daemon.stop();
    }
  });
});
