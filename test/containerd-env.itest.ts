/**
 * The containerd test environment (test/support/containerd.ts) itself: it
 * runs in a private mount namespace that starts as a copy of the host's
 * mount table, so it holds copies of every FUSE mount that existed then
 * (other tests', other CI runs'). Stopping it must abort only the FUSE
 * connections of mounts made inside: a copy shares its original's
 * connection. (It once aborted them all, and a mount host test running at
 * the same time in another CI run lost its mounts: ENOTCONN.)
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { findMount } from '../mount/deadMount.js';
import { fuseOverlayfs, makeWorkspace, removeWorkspace, startLayerdServer, stopLayerdServer, type Workspace } from './fixtures/mount/harness.js';
import { ContainerdEnv, missingTools } from './support/containerd.js';
import { scratch } from './support/env.js';

describe('containerd test environment: its namespace', function () {
  this.timeout(120_000);
  const reason = missingTools();
  let ws: Workspace | undefined;
  let work: { dir: string; remove(): Promise<void> } | undefined;
  let env: ContainerdEnv | undefined;
  let outside: ChildProcess | undefined;

  before(function () {
    if (reason) this.skip();
  });
  afterEach(async () => {
    try {
      await env?.stop();
      if (outside && ws) await stopLayerdServer(outside, ws.mnt);
    } finally {
      if (ws) await removeWorkspace(ws);
      await work?.remove();
      env = outside = ws = work = undefined;
    }
  });

  it('leaves FUSE mounts made outside it served when it stops', async () => {
    ws = await makeWorkspace();
    work = await scratch('layerd-ctrenv-');
    // A FUSE mount of the host's namespace, made before the environment's namespace is.
    outside = await startLayerdServer(['--lower', ws.lowers.join(':'), '--upper', ws.upper], ws.mnt);
    const before = await findMount(ws.mnt);
    assert.equal(before?.fstype, 'fuse.layerd');
    env = new ContainerdEnv(work.dir);
    await env.start();
    assert.ok(!(await env.mountinfo()).includes(` ${before.major}:${before.minor} `), 'the namespace detached its copy of the outside mount');
    await env.stop();
    assert.equal(outside.exitCode, null, 'the outside mount\'s server still runs');
    assert.equal(await readFile(join(ws.mnt, 'etc/passwd'), 'utf8'), 'root:x:0:0\n');
  });

  it('does not keep a FUSE mount made outside alive after its owner unmounts it (fuse-overlayfs exits)', async function () {
    ws = await makeWorkspace();
    work = await scratch('layerd-ctrenv-');
    const mounted = await fuseOverlayfs.mount(ws.lowers, ws.upper, ws.work, ws.mnt);
    env = new ContainerdEnv(work.dir);
    await env.start();
    // Once the namespace held a copy: fuse-overlayfs waited for that namespace to go, and the
    // harness's unmount (which waits for it to exit) failed whenever a containerd test ran beside it.
    await mounted.unmount();
    assert.equal(await findMount(ws.mnt), undefined);
  });
});
