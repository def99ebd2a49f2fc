/** Stores and mounts for tests: a store holding debian-multi, and cleanup of mounts left under a directory. */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StoreOperations } from '../../storage/operations.js';
import { Store } from '../../storage/store.js';
import { DEBIAN_MULTI, execFileAsync } from './env.js';

/** Never leave a mount behind, whatever failed (proc/dev binds inside a union mount go first). */
export { clearMountsUnder } from '../../mount/deadMount.js';

/** A fresh store at `root` with the corpus image debian-multi imported (every tag). */
export async function storeWithDebianMulti(root: string): Promise<void> {
  const store = await Store.open(root, { durability: 'none' });
  try {
    await new StoreOperations(store).importPath({ path: DEBIAN_MULTI });
  } finally {
    store.close();
  }
}

/**
 * A tmpfs of `sizeBytes` mounted on a fresh mkdtemp directory, for tests of
 * a full disk. `remove` unmounts it (lazily if busy) and removes the directory.
 */
export async function smallTmpfs(sizeBytes: number): Promise<{ dir: string; remove(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'layerd-tmpfs-'));
  try {
    await execFileAsync('mount', ['-t', 'tmpfs', '-o', `size=${sizeBytes},mode=0700`, 'layerd-test', dir]);
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    dir,
    remove: async () => {
      await execFileAsync('umount', [dir]).catch(() => execFileAsync('umount', ['-l', dir]));
      await rm(dir, { recursive: true, force: true });
    },
  };
}
