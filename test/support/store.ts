/** Stores and mounts for tests: a store holding debian-multi, and cleanup of mounts left under a directory. */
import { readFile } from 'node:fs/promises';
import { clearDeadMount } from '../../mount/deadMount.js';
import { StoreOperations } from '../../storage/operations.js';
import { Store } from '../../storage/store.js';
import { DEBIAN_MULTI } from './env.js';

/** A fresh store at `root` with the corpus image debian-multi imported (every tag). */
export async function storeWithDebianMulti(root: string): Promise<void> {
  const store = await Store.open(root, { durability: 'none' });
  try {
    await new StoreOperations(store).importPath({ path: DEBIAN_MULTI });
  } finally {
    store.close();
  }
}

/** Never leave a mount behind, whatever failed: clear (abort + lazy unmount) everything under `dir`. */
export async function clearMountsUnder(dir: string): Promise<void> {
  const lines = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => l.includes(dir));
  // innermost first (proc/dev binds inside a union mount)
  for (const line of lines.reverse()) await clearDeadMount(line.split(' ')[4]!).catch(() => undefined);
}
