/** Stores and mounts for tests: a store holding debian-multi, and cleanup of mounts left under a directory. */
import { StoreOperations } from '../../storage/operations.js';
import { Store } from '../../storage/store.js';
import { DEBIAN_MULTI } from './env.js';

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
