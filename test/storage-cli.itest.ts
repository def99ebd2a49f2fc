/**
 * The offline CLI's image management: platform choice from an index, tags,
 * rmi and prune that never remove a layer still in use, fsck that catches
 * damage, and refusing a store a daemon holds.
 */
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, writeFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { type DiskUsage, type ImageUsage } from '../storage/usage.js';
import { BUSYBOX, DEBIAN_MULTI, REPO, layerctl, layerctlJson, scratch } from './support/env.js';

interface Layer { diffId: string; usedBy: number; blobs: string[] }
const byRefIn = (u: DiskUsage, ref: string): ImageUsage => u.images.find((i) => i.refs.includes(ref))!;

describe('layerctl (offline --root mode)', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  before(async () => { work = await scratch(); });
  after(async () => { await work?.remove(); });

  it('with no daemon and no store named, says so (exit 3) instead of making an empty store', async function () {
    // Only meaningful on a machine where neither default exists (this one, in CI).
    if (existsSync('/run/layerd/layerd.sock') || existsSync('/var/lib/layerd')) this.skip();
    const r = await layerctl(['images'], { LAYERD_SOCKET: undefined, LAYERD_ROOT: undefined });
    expect(r.code, r.stderr).to.equal(3);
    expect(r.stderr).to.contain('no layerd daemon found');
    expect(r.stderr).to.contain('--socket').and.to.contain('--root');
    expect(existsSync('/var/lib/layerd'), 'no store is created').to.equal(false);
  });

  it('picks the host platform from an index, or the one asked for', async () => {
    const a = join(work.dir, 'bb-host');
    await layerctlJson(['--root', a, 'import', BUSYBOX]);
    const latest = await layerctlJson<{ Platform: string; Id: string }>(['--root', a, 'inspect', 'busybox:latest']);
    expect(latest.Platform).to.equal('linux/amd64');
    expect(latest.Id).to.equal('sha256:f294e8831b3c83087aee00afce2b4c7d5b8d71c07349384aa7a7160d3eb638c8');

    const b = join(work.dir, 'bb-arm');
    await layerctlJson(['--root', b, 'import', BUSYBOX, '--platform', 'linux/arm64/v8']);
    const arm = await layerctlJson<{ Platform: string; Id: string; Architecture: string }>(['--root', b, 'inspect', 'busybox:latest']);
    expect(arm.Platform).to.equal('linux/arm64/v8');
    expect(arm.Id).to.equal('sha256:985f29e218faaa4a98ef2c567079ea14d80683566295098960de17cc630b0cb1');
    // `arm64` normalises to arm64/v8 as in containerd
    const c = join(work.dir, 'bb-arm-short');
    await layerctlJson(['--root', c, 'import', BUSYBOX, '--platform', 'linux/arm64']);
    expect((await layerctlJson<{ Platform: string }>(['--root', c, 'inspect', 'busybox:latest'])).Platform).to.equal('linux/arm64/v8');

    const d = join(work.dir, 'bb-none');
    const r = await layerctl(['--root', d, 'import', BUSYBOX, '--platform', 'linux/s390x']);
    expect(r.code).to.equal(6);
    expect(r.stderr).to.contain('EPLATFORM');
  });

  it('looks images up by tag, digest and unique digest prefix', async () => {
    const root = join(work.dir, 'bb-host');
    const id = 'sha256:f294e8831b3c83087aee00afce2b4c7d5b8d71c07349384aa7a7160d3eb638c8';
    for (const ref of ['busybox:amd64', id, 'f294e8831b3c', `busybox@${id}`]) {
      const info = await layerctlJson<{ Id: string }>(['--root', root, 'inspect', ref]);
      expect(info.Id, ref).to.equal(id);
    }
    const bad = await layerctl(['--root', root, 'inspect', 'Not A Ref']);
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.contain('EINVAL');
  });

  it('rmi and prune never remove a layer another image still uses', async () => {
    const root = join(work.dir, 'dm');
    await layerctlJson(['--root', root, 'import', DEBIAN_MULTI]);
    const layersBefore = await layerctlJson<Layer[]>(['--root', root, 'layers']);
    expect(layersBefore).to.have.length(4);
    expect(layersBefore.map((l) => l.usedBy).sort()).to.deep.equal([1, 2, 3, 4]);

    await layerctlJson(['--root', root, 'rmi', 'debian-multi:l1-minbase']);
    await layerctlJson(['--root', root, 'rmi', 'debian-multi:l3-whiteouts']);
    expect((await layerctlJson<Layer[]>(['--root', root, 'layers'])).map((l) => l.usedBy).sort()).to.deep.equal([1, 1, 2, 2]);
    expect((await layerctl(['--root', root, 'fsck'])).code).to.equal(0);

    // by digest: latest and l4-special share it, so a plain rmi refuses
    const info = await layerctlJson<{ Id: string }>(['--root', root, 'inspect', 'debian-multi:latest']);
    const refused = await layerctl(['--root', root, 'rmi', info.Id]);
    expect(refused.code).to.equal(4);
    expect(refused.stderr).to.contain('ECONFLICT');

    await layerctlJson(['--root', root, 'tag', 'debian-multi:l2-packages', 'keep:me']);
    await layerctlJson(['--root', root, 'rmi', '--force', info.Id]);
    const left = await layerctlJson<Layer[]>(['--root', root, 'layers']);
    expect(left).to.have.length(2); // layers 1 and 2, still used by l2-packages (= keep:me)
    await layerctlJson(['--root', root, 'rmi', 'debian-multi:l2-packages']);
    expect(await layerctlJson<Layer[]>(['--root', root, 'layers'])).to.have.length(2);
    await layerctlJson(['--root', root, 'rmi', 'keep:me']);
    expect(await layerctlJson<Layer[]>(['--root', root, 'layers'])).to.have.length(0);
    const pruned = await layerctlJson<{ images: string[] }>(['--root', root, 'prune']);
    expect(pruned.images).to.deep.equal([]);
    expect(await readdir(join(root, 'blobs', 'sha256'))).to.deep.equal([]);
    expect(await readdir(join(root, 'layers', 'sha256'))).to.deep.equal([]);
    expect((await layerctl(['--root', root, 'fsck'])).code).to.equal(0);
  });

  it('df: every layer stored once, what that saves, and what each image holds alone', async () => {
    const root = join(work.dir, 'df');
    await layerctlJson(['--root', root, 'import', DEBIAN_MULTI]);
    // latest's layers bottom → top; the corpus's other tags are its first 1, 2 and 3 layers.
    const latest = await layerctlJson<{ Id: string; Layers: { diffId: string; uncompressedSize: number }[] }>(['--root', root, 'inspect', 'debian-multi:latest']);
    const s = latest.Layers.map((l) => l.uncompressedSize);
    expect(s).to.have.length(4);
    const usage = await layerctlJson<DiskUsage>(['--root', root, 'df']);
    const total = s.reduce((a, b) => a + b, 0);
    expect(usage.layers).to.deep.equal({ count: 4, bytes: total, tarBytes: total, skeletons: 0, unused: 0, unusedBytes: 0 });
    let blobBytes = 0;
    for (const name of await readdir(join(root, 'blobs', 'sha256'))) blobBytes += (await stat(join(root, 'blobs', 'sha256', name))).size;
    expect(usage.blobs.bytes).to.equal(blobBytes);
    expect(usage.storedBytes).to.equal(total + blobBytes);
    // Used by l1 (layer 1), l2 (1–2), l3 (1–3) and latest (1–4): layer 1 four times, layer 4 once.
    const referenced = 4 * s[0]! + 3 * s[1]! + 2 * s[2]! + s[3]!;
    expect(usage.referencedBytes).to.equal(referenced);
    expect(usage.savedBySharing).to.equal(referenced - total);
    const byRef = (ref: string): ImageUsage => usage.images.find((i) => i.refs.includes(ref))!;
    expect(byRef('debian-multi:latest')).to.include({ id: latest.Id, layers: 4, size: total, unique: s[3], shared: total - s[3]! });
    expect(byRef('debian-multi:l1-minbase')).to.include({ layers: 1, size: s[0], unique: 0, shared: s[0] });

    const text = await layerctl(['--root', root, 'df']);
    expect(text.code, text.stderr).to.equal(0);
    expect(text.stdout).to.match(/storing each layer once saves \S+/).and.to.match(/^debian-multi:latest\s+\S+\s+4\s/m);
    // Layers nothing uses are named as what prune frees.
    await layerctlJson(['--root', root, 'rmi', 'debian-multi:l1-minbase']);
    await layerctlJson(['--root', root, 'rmi', 'debian-multi:l2-packages']);
    await layerctlJson(['--root', root, 'rmi', 'debian-multi:l3-whiteouts']);
    const after = await layerctlJson<DiskUsage>(['--root', root, 'df']);
    expect(after.savedBySharing).to.equal(0);
    expect(byRefIn(after, 'debian-multi:latest').unique).to.equal(total);
  });

  it('fsck finds a damaged blob and a damaged layer file', async () => {
    const root = join(work.dir, 'bb-host');
    expect((await layerctl(['--root', root, 'fsck'])).code).to.equal(0);
    const blob = join(root, 'blobs', 'sha256', '0cd702848a3beeea7fc66881c07855b8d186e06494fb70f926316299adf65219');
    const bytes = await readFile(blob);
    bytes[1000] = bytes[1000]! ^ 0xff;
    await writeFile(blob, bytes);
    const tar = join(root, 'layers', 'sha256', '011a1c6c83112f58f96e3eb60b150d2eaa2f278ab73e0baaca462cf1378ea10d', 'layer.tar');
    const tarBytes = await readFile(tar);
    tarBytes[600] = tarBytes[600]! ^ 0xff;
    await writeFile(tar, tarBytes);
    const r = await layerctl(['--root', root, 'fsck', '--json']);
    expect(r.code).to.equal(7);
    const report = JSON.parse(r.stdout) as { ok: boolean; problems: { kind: string; id: string }[] };
    expect(report.ok).to.equal(false);
    expect(report.problems.map((p) => p.kind)).to.include.members(['blob', 'layer']);
  });

  it('refuses cleanly while another process (a daemon) holds the store', async () => {
    const root = join(work.dir, 'held');
    await layerctlJson(['--root', root, 'images']);
    const holder = spawn(process.execPath, ['--input-type=module', '-e', `
      import { Store } from ${JSON.stringify(join(REPO, 'dist', 'storage', 'store.js'))};
      const s = await Store.open(${JSON.stringify(root)}, { exclusive: true });
      console.log('held');
      setInterval(() => {}, 1000);
    `], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((resolve, reject) => {
        holder.stdout!.on('data', (d: Buffer) => { if (d.toString().includes('held')) resolve(); });
        holder.on('exit', () => reject(new Error('holder exited')));
      });
      const r = await layerctl(['--root', root, 'images'], { LAYERD_BUSY_TIMEOUT_MS: '200' });
      expect(r.code, r.stderr).to.equal(5);
      expect(r.stderr).to.contain('EBUSY');
    } finally {
      holder.kill('SIGTERM');
    }
  });
});
