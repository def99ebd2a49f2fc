/**
 * `make install` puts the daemon, the CLI and a unit that systemd accepts
 * in place (into a scratch prefix here), and `make uninstall` removes them.
 */
import { expect } from 'chai';
import { access, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { REPO, execFileAsync, scratch } from './support/env.js';

describe('systemd unit and make install', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  before(async () => { work = await scratch(); });
  after(async () => { await work?.remove(); });

  it('installs a unit that systemd-analyze verify accepts, and uninstalls', async () => {
    const vars = [`PREFIX=${join(work.dir, 'usr')}`, `UNITDIR=${join(work.dir, 'units')}`, `CONFDIR=${join(work.dir, 'etc')}`, 'SYSTEMCTL=true'];
    // SKIP_BUILD: mocha runs from dist/; recompiling it under the running suite is not for a test to do.
    await execFileAsync('make', ['-C', REPO, 'install', 'SKIP_BUILD=1', ...vars], { maxBuffer: 64 * 1024 * 1024 });
    const unit = join(work.dir, 'units', 'layerd.service');
    const text = await readFile(unit, 'utf8');
    expect(text).to.contain(`ExecStart=${join(work.dir, 'usr', 'bin', 'layerd')} --config ${join(work.dir, 'etc', 'config.json')}`);
    expect(text).to.match(/^Type=notify$/m);
    expect(text).to.match(/^KillMode=process$/m);
    const verify = await execFileAsync('systemd-analyze', ['verify', unit]).then(
      (r) => ({ code: 0, stderr: r.stderr }),
      (err: { stderr?: string; code?: number }) => ({ code: err.code ?? -1, stderr: err.stderr ?? '' }),
    );
    expect(verify, 'systemd-analyze verify: exit status and complaints').to.deep.equal({ code: 0, stderr: '' });
    const help = await execFileAsync(join(work.dir, 'usr', 'bin', 'layerctl'), ['--help']);
    expect(help.stdout).to.contain('layerctl');
    await access(join(work.dir, 'etc', 'config.json'));
    await execFileAsync('make', ['-C', REPO, 'uninstall', ...vars]);
    await access(unit).then(() => expect.fail('unit still there'), () => undefined);
    await access(join(work.dir, 'usr', 'bin', 'layerd')).then(() => expect.fail('layerd still there'), () => undefined);
  });
});
