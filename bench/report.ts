/** What the benchmarks share: timing, summary statistics, and writing results (markdown to stdout and bench/results/<name>-<timestamp>.{md,json}). */
import { mkdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(fileURLToPath(import.meta.url), '..', '..', '..');
export const CORPUS = process.env['LAYERD_CORPUS'] ?? resolve(REPO, '..', 'shared', 'corpus');

/** The value after `name` on the command line, or `fallback`. */
export function argOf(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i > 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : fallback;
}

export async function writeResults(name: string, markdown: string[], data: unknown): Promise<void> {
  const outDir = join(REPO, 'bench', 'results');
  await mkdir(outDir, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  await writeFile(join(outDir, `${name}-${stamp}.md`), markdown.join('\n'));
  await writeFile(join(outDir, `${name}-${stamp}.json`), JSON.stringify(data, null, 2));
  process.stdout.write(markdown.join('\n'));
}

export async function time(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

export function stats(samples: number[]): { median: number; min: number; max: number } {
  const s = [...samples].sort((a, b) => a - b);
  return { median: s[Math.floor(s.length / 2)]!, min: s[0]!, max: s[s.length - 1]! };
}
