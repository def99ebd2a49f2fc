/**
 * The warm-up of a new container mount (daemon/snapshotter/mountWarmer.ts):
 * what a recorded start-up becomes (mount/accessRecord.ts), and the thread
 * that repeats it — on a plain directory here (it only reads, through
 * openat2 beneath the root): it follows no symlink the container put in the
 * way, opens no FIFO or device for reading, reads nothing outside the root,
 * and a cancelled warm-up stops. test/containerd-snapshotter-api.itest.ts
 * runs it on real snapshot mounts.
 */
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import { mkdir, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { silentLogger } from '../common/log.js';
import { AccessRecorder, validAccessOps, type AccessOp } from '../mount/accessRecord.js';
import { MountWarmer } from '../daemon/snapshotter/mountWarmer.js';
import { stepsOf } from '../daemon/snapshotter/mountWarmerWorker.js';
import { scratch } from './support/env.js';

describe('warming a new container mount with the last start-up of its image', () => {
  let work: { dir: string; remove(): Promise<void> };
  let warmer: MountWarmer;

  beforeEach(async () => {
    work = await scratch('layerd-warm-');
    warmer = new MountWarmer(silentLogger());
  });
  afterEach(async () => {
    await warmer.close();
    await work.remove();
  });

  it('records each access once, only during the mount\'s first seconds and up to a limit', () => {
    const r = new AccessRecorder(60_000, 3);
    r.record({ op: 'lookup', path: 'usr' });
    r.record({ op: 'lookup', path: 'usr' });
    r.record({ op: 'read', path: 'usr/f', offset: 0, size: 10 });
    r.record({ op: 'read', path: 'usr/f', offset: 0, size: 10 });
    r.record({ op: 'read', path: 'usr/f', offset: 10, size: 10 });
    r.record({ op: 'list', path: 'usr' }); // past the limit
    expect(r.ops).to.have.length(3);
    expect(r.open).to.equal(false);
    const late = new AccessRecorder(0);
    late.record({ op: 'lookup', path: 'usr' });
    expect(late.ops).to.deep.equal([]);
  });

  it('takes only well-formed relative paths from a record that crossed a socket', () => {
    expect(validAccessOps([
      { op: 'lookup', path: 'etc/passwd' }, { op: 'lookup', path: '/etc/passwd' }, { op: 'read', path: 'a/../../x', offset: 0, size: 1 },
      { op: 'read', path: 'f', offset: -1, size: 1 }, { op: 'write', path: 'f' }, 'nonsense', { op: 'read', path: 'f', offset: 0, size: 5e9 },
    ])).to.deep.equal([{ op: 'lookup', path: 'etc/passwd' }, { op: 'read', path: 'f', offset: 0, size: 1024 * 1024 }]);
    expect(validAccessOps({ op: 'lookup' })).to.deep.equal([]);
  });

  it('repeats a file\'s reads in one open, and drops lookups that another access walks through', () => {
    const ops: AccessOp[] = [
      { op: 'lookup', path: 'usr' }, { op: 'lookup', path: 'usr/lib' }, { op: 'read', path: 'usr/lib/a', offset: 0, size: 4 },
      { op: 'lookup', path: 'usr/nope' }, { op: 'read', path: 'usr/lib/a', offset: 4, size: 4 }, { op: 'list', path: 'usr' },
    ];
    expect(stepsOf(ops)).to.deep.equal([
      { op: 'read', path: 'usr/lib/a', ranges: [{ offset: 0, size: 4 }, { offset: 4, size: 4 }] },
      { op: 'lookup', path: 'usr/nope' },
      { op: 'list', path: 'usr' },
    ]);
  });

  it('reads beneath the mount only: no symlink followed, no FIFO or device opened, missing paths skipped', async () => {
    const root = join(work.dir, 'mnt');
    const outside = join(work.dir, 'outside');
    await mkdir(join(root, 'etc'), { recursive: true });
    await mkdir(outside);
    await writeFile(join(root, 'etc', 'f'), 'content\n');
    await writeFile(join(outside, 'secret'), 'host file\n');
    await symlink(outside, join(root, 'lib')); // the container replaced a recorded directory by a link out of its root
    await symlink('/etc/hostname', join(root, 'etc', 'link'));
    execFileSync('mkfifo', [join(root, 'etc', 'fifo')]); // opening it for reading would block
    warmer.remember('chain', [
      { op: 'read', path: 'etc/f', offset: 0, size: 8 },
      { op: 'read', path: 'lib/secret', offset: 0, size: 10 },
      { op: 'read', path: 'etc/fifo', offset: 0, size: 10 },
      { op: 'read', path: 'etc/link', offset: 0, size: 10 },
      { op: 'readlink', path: 'etc/link' },
      { op: 'lookup', path: 'etc/gone' },
      { op: 'list', path: 'etc' },
    ]);
    const result = await warmer.start('k1', 'chain', root);
    // done: etc/f, etc/fifo and etc/link (looked at, not read: not regular files), the readlink, the listing;
    // failed: lib/secret (a symlink on the way: ELOOP) and etc/gone (ENOENT)
    expect(result).to.include({ done: 5, failed: 2 });
    expect(result!.stopped).to.equal(undefined);
    expect(warmer.start('k2', 'another chain', root), 'nothing recorded for that chain').to.equal(undefined);
  });

  it('a warm-up with no mount at its root ends at once; a closed warmer starts none', async () => {
    warmer.remember('chain', [{ op: 'lookup', path: 'f' }]);
    const gone = await warmer.start('k1', 'chain', join(work.dir, 'no-such-mount'));
    expect(gone!.done).to.equal(0);
    expect(gone!.stopped).to.be.a('string');
    await warmer.close();
    expect(warmer.start('k2', 'chain', work.dir)).to.equal(undefined);
  });
});
