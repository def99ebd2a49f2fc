/**
 * Comparing two mounted trees by sampling: the lazy-pull tests check that a
 * lazily mounted image shows the listing and the bytes of a full pull,
 * over a deterministic random sample of files and ranges.
 */
import { open, readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';

/** A small deterministic PRNG (mulberry32): the sample is the same on every run. */
export function prng(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Every path beneath `root` with its type (f, d, l, o), sorted; and the regular files with content. */
export async function walk(root: string): Promise<{ listing: string[]; files: { path: string; size: number }[] }> {
  const listing: string[] = [];
  const files: { path: string; size: number }[] = [];
  const visit = async (rel: string): Promise<void> => {
    for (const d of await readdir(join(root, rel), { withFileTypes: true })) {
      const path = rel ? `${rel}/${d.name}` : d.name;
      const kind = d.isDirectory() ? 'd' : d.isFile() ? 'f' : d.isSymbolicLink() ? 'l' : 'o';
      listing.push(`${kind} ${path}`);
      if (d.isDirectory()) await visit(path);
      else if (d.isFile()) {
        const size = (await stat(join(root, path))).size;
        if (size > 0) files.push({ path, size });
      }
    }
  };
  await visit('');
  return { listing: listing.sort(), files };
}

/** Up to `length` bytes of `path` from `position` (fewer at its end). */
export async function readRange(path: string, position: number, length: number): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const buffer = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buffer, 0, length, position);
    return buffer.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** Allocated bytes of every lazy content file under a store (sparse: what was fetched). */
export async function lazyAllocated(root: string): Promise<number> {
  const dir = join(root, 'lazy', 'sha256');
  let total = 0;
  for (const hex of await readdir(dir).catch(() => [] as string[])) total += (await stat(join(dir, hex, 'content'))).blocks * 512;
  return total;
}

export interface LazyCounters { rangeRequests: number; stalls: number; prefetchRequests: number; prefetchedChunks: number }

/** The lazy counters every serving process of a store wrote (lazy/stats/*.json), summed. */
export async function lazyStats(root: string): Promise<LazyCounters> {
  const dir = join(root, 'lazy', 'stats');
  const total: LazyCounters = { rangeRequests: 0, stalls: 0, prefetchRequests: 0, prefetchedChunks: 0 };
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (!name.endsWith('.json')) continue;
    const s = await readFile(join(dir, name), 'utf8').then((t) => JSON.parse(t) as Partial<LazyCounters>, () => ({} as Partial<LazyCounters>));
    for (const k of Object.keys(total) as (keyof LazyCounters)[]) total[k] += s[k] ?? 0;
  }
  return total;
}
