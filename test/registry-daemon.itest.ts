/**
 * Pull and push through the daemon's API (`layerctl --socket`), using the
 * registries configuration the daemon was started with; then run a
 * container of a committed image pushed and pulled back.
 */
import { expect } from 'chai';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { layerctl, scratch, daemonCli } from './support/env.js';
import { type RunningDaemon, startDaemon } from './support/daemon.js';
import { TestRegistry, pushCorpus } from './support/registry.js';

describe('registry pull and push through the daemon', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  let registry: TestRegistry;
  let daemon: RunningDaemon | undefined;
  const { cli } = daemonCli(() => daemon!.socket);

  before(async () => {
    work = await scratch('layerd-registry-daemon-');
    registry = await TestRegistry.start(join(work.dir, 'registry'));
    await pushCorpus(registry.host, ['debian-multi:latest'], work.dir);
    const config = join(work.dir, 'layerd.json');
    await writeFile(config, JSON.stringify({ registriesConfig: join(work.dir, 'registries.json') }));
    await writeFile(join(work.dir, 'registries.json'), JSON.stringify({ registries: {} }));
    daemon = await startDaemon(work.dir, ['--config', config, '--mount-root', join(work.dir, 'mounts')]);
  });
  after(async () => {
    await daemon?.stop();
    await registry?.stop();
    await work?.remove();
  });

  it('pulls, commits, pushes the committed image and pulls it back under a new name', async () => {
    const pulled = JSON.parse(await cli('pull', `${registry.host}/corpus/debian-multi:latest`, '--json')) as { refs: string[] }[];
    expect(pulled[0]!.refs).to.deep.equal([`${registry.host}/corpus/debian-multi:latest`]);
    const made = JSON.parse(await cli('create', `${registry.host}/corpus/debian-multi:latest`, '--name', 'w', '--json')) as { mountpoint: string };
    await writeFile(join(made.mountpoint, 'root', 'pushed.txt'), 'through a registry\n');
    await cli('commit', 'w', 'local/committed:v1');
    await cli('rm', 'w');
    const pushed = JSON.parse(await cli('push', 'local/committed:v1', `${registry.host}/corpus/committed:v1`, '--json')) as { blobs: { outcome: string }[] };
    expect(pushed.blobs.map((b) => b.outcome)).to.include('uploaded');
    await cli('rmi', 'local/committed:v1');
    await cli('pull', `${registry.host}/corpus/committed:v1`);
    const again = JSON.parse(await cli('create', `${registry.host}/corpus/committed:v1`, '--name', 'back', '--json')) as { mountpoint: string };
    const { readFile } = await import('node:fs/promises');
    expect(await readFile(join(again.mountpoint, 'root', 'pushed.txt'), 'utf8')).to.equal('through a registry\n');
    await cli('rm', 'back');
  });

  it('refuses a client-side registries config in daemon mode', async () => {
    const r = await layerctl(['--socket', daemon!.socket, 'pull', '--registries-config', '/nonexistent', `${registry.host}/corpus/debian-multi:latest`]);
    expect(r.code).to.equal(2);
    expect(r.stderr).to.contain('EINVAL');
  });
});
