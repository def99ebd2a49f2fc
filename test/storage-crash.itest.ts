/**
 * Killing the importer with SIGKILL at any moment leaves a store that the
 * next start recovers to a consistent state, and a re-import then succeeds.
 */
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { DEBIAN_MULTI, LAYERCTL, layerctl, layerctlJson, scratch } from './support/env.js';

function importThenKill(root: string, afterMs: number): Promise<{ killed: boolean }> {
  return new Promise((resolve, reject) => {
    const child = spawn(LAYERCTL, ['--root', root, 'import', DEBIAN_MULTI], { stdio: 'ignore' });
    const timer = setTimeout(() => { child.kill('SIGKILL'); }, afterMs);
    child.on('error', reject);
    child.on('exit', (_code, signal) => {
      clearTimeout(timer);
      resolve({ killed: signal === 'SIGKILL' });
    });
  });
}

describe('import: crash safety (SIGKILL mid-import)', function () {
  this.timeout(300_000);
  let work: { dir: string; remove(): Promise<void> };
  before(async () => { work = await scratch(); });
  after(async () => { await work?.remove(); });

  // Kill points spread over one import's measured duration: reading the
  // documents, inside layer 1, later layers, and around the commit.
  let duration = 0;
  let killedMidway = 0;
  before(async () => {
    const t0 = Date.now();
    const r = await layerctl(['--root', join(work.dir, 'timing'), 'import', DEBIAN_MULTI]);
    expect(r.code, r.stderr).to.equal(0);
    duration = Date.now() - t0;
  });

  for (const fraction of [0.1, 0.35, 0.6, 0.85, 0.97]) {
    it(`killed at ${Math.round(fraction * 100)}% of an import: recovery leaves a clean store, and a re-import succeeds`, async () => {
      const delay = Math.round(duration * fraction);
      const root = join(work.dir, `store-${delay}`);
      const { killed } = await importThenKill(root, delay);
      if (killed) killedMidway++;
      // Opening the store (here through fsck) recovers it.
      const fsck = await layerctl(['--root', root, 'fsck', '--json']);
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
      expect(await readdir(join(root, 'tmp'))).to.deep.equal([]);
      const images = await layerctlJson<{ refs: string[] }[]>(['--root', root, 'images']);
      if (killed) {
        // All or nothing: either the import committed or no image is visible.
        expect(images.length === 0 || images.length === 4, JSON.stringify(images)).to.equal(true);
      }
      const again = await layerctl(['--root', root, 'import', DEBIAN_MULTI]);
      expect(again.code, again.stderr).to.equal(0);
      const after = await layerctlJson<{ refs: string[] }[]>(['--root', root, 'images']);
      expect(after.flatMap((i) => i.refs)).to.include('debian-multi:latest');
      const fsck2 = await layerctl(['--root', root, 'fsck']);
      expect(fsck2.code, fsck2.stdout).to.equal(0);
    });
  }

  it('interrupted at least three of those imports before they finished', () => {
    expect(killedMidway).to.be.at.least(3);
  });
});
