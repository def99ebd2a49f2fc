/**
 * A spare mount host's dry run: merge a made-up stack of layers over an
 * empty upper dir, the way a real mount does, while the host waits to be
 * bound. The first real mount then finds the merge code compiled by V8 and
 * the child-process machinery (getfattr) loaded, instead of paying for both
 * (docs/performance.md). Costs ~0.1 s of CPU once, when nothing waits.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { EntryKind, LayerEntry, LayerSource } from '../storage/layerIndex.js';
import { UnionFs } from './unionFs.js';

const ROUNDS = 4;

export async function warmUpMounting(): Promise<void> {
  const upper = await mkdtemp(join(tmpdir(), 'layerd-warm-up-'));
  try {
    const stack = madeUpStack();
    for (let i = 0; i < ROUNDS; i++) {
      const union = await UnionFs.create({ layers: stack, upper });
      await union.closeAll(); // its upper's root descriptor too: a spare lives for long
    }
  } finally {
    await rm(upper, { recursive: true, force: true });
  }
}

/** Three layers over a few thousand entries: overrides, invented parents, symlinks, hard links, whiteouts, an opaque dir. */
function madeUpStack(): LayerSource[] {
  const entry = (path: string, kind: EntryKind, extra: Partial<LayerEntry> = {}): LayerEntry =>
    ({ path, kind, mode: kind === 'dir' ? 0o755 : 0o644, uid: 0, gid: 0, mtime: 0, size: 0, ...extra });
  return [0, 1, 2].map((layer) => {
    const entries: LayerEntry[] = [];
    const whiteouts: string[] = [];
    for (let d = 0; d < 60; d++) {
      const dir = `usr/share/d${d}`;
      entries.push(entry(dir, 'dir'));
      for (let f = 0; f < 25; f++) if (f % (layer + 1) === 0) entries.push(entry(`${dir}/f${f}`, 'file'));
      entries.push(entry(`${dir}/s${layer}`, 'symlink', { target: 'f0' }));
      if (layer === 0) entries.push(entry(`${dir}/h`, 'file', { link: `${dir}/f0` }));
      if (layer > 0 && d % 7 === 0) whiteouts.push(`${dir}/f1`);
    }
    return { index: { version: 1, id: `warm-up:${layer}`, entries, whiteouts, opaques: layer === 2 ? ['usr/share/d3'] : [] }, content: () => undefined };
  });
}
