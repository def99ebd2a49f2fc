/** Writing a benchmark's results: markdown to stdout and bench/results/<name>-<timestamp>.{md,json}. */
import { mkdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(fileURLToPath(import.meta.url), '..', '..', '..');

export async function writeResults(name: string, markdown: string[], data: unknown): Promise<void> {
  const outDir = join(REPO, 'bench', 'results');
  await mkdir(outDir, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  await writeFile(join(outDir, `${name}-${stamp}.md`), markdown.join('\n'));
  await writeFile(join(outDir, `${name}-${stamp}.json`), JSON.stringify(data, null, 2));
  process.stdout.write(markdown.join('\n'));
}
