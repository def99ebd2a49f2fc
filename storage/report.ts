/**
 * One self-contained HTML page about an image's layer stack (no network, no
 * scripts from elsewhere): the layers with their sizes as bars and what each
 * adds, changes and deletes; a treemap of the merged tree's bytes per
 * directory, coloured by the layer that provides them; and the wasted-space
 * table. Everything is computed from the layer indexes.
 */
import { type HistoryRow, type StackLayers, efficiency, history, loadStack, tree } from './analysis.js';
import { shortDigest } from './digest.js';
import { type Store } from './store.js';

const COLOURS = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac'];

function esc(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

function size(bytes: number): string {
  const units = ['B', 'kB', 'MB', 'GB'];
  let n = bytes;
  let u = 0;
  while (n >= 1000 && u < units.length - 1) { n /= 1000; u++; }
  return u === 0 ? `${n} B` : `${n.toFixed(1)} ${units[u]}`;
}

interface Box { name: string; bytes: number; layer: number }

/** Bytes per directory two levels down, attributed to the layer providing most of them. */
function directoryBoxes(stack: StackLayers): Box[] {
  const byDir = new Map<string, Map<number, number>>();
  for (const e of tree(stack)) {
    if (e.kind !== 'file') continue;
    const parts = e.path.split('/').filter(Boolean);
    const dir = '/' + parts.slice(0, Math.min(2, parts.length - 1)).join('/');
    let layers = byDir.get(dir);
    if (!layers) byDir.set(dir, (layers = new Map()));
    layers.set(e.layer.position, (layers.get(e.layer.position) ?? 0) + e.size);
  }
  const boxes: Box[] = [];
  for (const [dir, layers] of byDir) {
    for (const [layer, bytes] of layers) if (bytes > 0) boxes.push({ name: dir, bytes, layer });
  }
  return boxes.sort((a, b) => b.bytes - a.bytes);
}

/** A squarified-enough treemap: slice-and-dice in rows, biggest first. */
function treemap(boxes: Box[], width: number, height: number): string {
  const total = boxes.reduce((n, b) => n + b.bytes, 0) || 1;
  const rects: string[] = [];
  let y = 0;
  let i = 0;
  while (i < boxes.length && y < height - 1) {
    // take items until the row's share makes a row roughly as tall as its items are wide
    let rowBytes = 0;
    const row: Box[] = [];
    while (i < boxes.length) {
      row.push(boxes[i]!);
      rowBytes += boxes[i]!.bytes;
      i++;
      const rowHeight = (rowBytes / total) * height;
      if (rowHeight * row.length * 3 > width * 0.5) break;
    }
    const rowHeight = Math.max(1, (rowBytes / total) * height);
    let x = 0;
    for (const b of row) {
      const w = (b.bytes / rowBytes) * width;
      const label = w > 70 && rowHeight > 14 ? `<text x="${(x + 3).toFixed(1)}" y="${(y + 12).toFixed(1)}">${esc(b.name)}</text>` : '';
      rects.push(`<g class="cell" data-layer="${b.layer}"><rect x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${w.toFixed(1)}" height="${rowHeight.toFixed(1)}" fill="${COLOURS[(b.layer - 1) % COLOURS.length]}"><title>${esc(b.name)} — ${size(b.bytes)} from layer ${b.layer}</title></rect>${label}</g>`);
      x += w;
    }
    y += rowHeight;
  }
  return `<svg class="treemap" viewBox="0 0 ${width} ${height}" width="${width}" height="${height}" role="img" aria-label="bytes per directory by layer">${rects.join('')}</svg>`;
}

export async function imageReport(store: Store, ref: string): Promise<string> {
  const stack = await loadStack(store, ref);
  const rows: HistoryRow[] = await history(store, ref);
  const eff = efficiency(stack, 25);
  const tags = store.db.tagsOf(stack.image).map((t) => `${t.name}:${t.tag}`);
  const maxSize = Math.max(1, ...rows.map((r) => r.size));
  const layerRows = rows.map((r) => `
    <tr class="layer" data-position="${r.layer.position}">
      <td><span class="swatch" style="background:${COLOURS[(r.layer.position - 1) % COLOURS.length]}"></span>${r.layer.position}</td>
      <td><code title="${esc(r.layer.diffId)}">${shortDigest(r.layer.diffId)}</code></td>
      <td class="bar"><div style="width:${((r.size / maxSize) * 100).toFixed(1)}%;background:${COLOURS[(r.layer.position - 1) % COLOURS.length]}"></div><span>${size(r.size)}</span></td>
      <td>${size(r.compressedSize)}</td>
      <td class="a">+${r.added}</td><td class="c">~${r.modified}</td><td class="d">−${r.deleted}</td>
      <td class="by">${esc(r.createdBy ?? '')}</td>
    </tr>`).join('');
  const offenders = eff.offenders.map((o) => `<tr><td>${size(o.wastedBytes)}</td><td>${o.count}</td><td>${o.layers.join(', ')}</td><td><code>${esc(o.path)}</code></td></tr>`).join('');
  const title = tags[0] ?? stack.image;
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>layerd report: ${esc(title)}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse}td,th{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:middle}
td.bar{width:280px;position:relative}td.bar div{height:14px}td.bar span{font-size:12px;color:#555}
.swatch{display:inline-block;width:10px;height:10px;margin-right:6px}td:first-child{white-space:nowrap}
.a{color:#2a7}.c{color:#a70}.d{color:#c33}.by{font-size:12px;color:#555;max-width:420px}
.treemap text{font-size:11px;fill:#fff}.score{font-size:28px;font-weight:600}
</style></head><body>
<h1>layerd report: ${esc(title)}</h1>
<p>Image <code>${esc(stack.image)}</code>${tags.length ? ` — ${tags.map(esc).join(', ')}` : ''}; ${rows.length} layers.</p>
<h2>Layers (1 = base)</h2>
<table id="layers"><thead><tr><th>#</th><th>diffID</th><th>size</th><th>compressed</th><th>added</th><th>changed</th><th>deleted</th><th>created by</th></tr></thead><tbody>${layerRows}</tbody></table>
<h2>Bytes per directory, by layer</h2>
${treemap(directoryBoxes(stack), 960, 420)}
<h2>Wasted space</h2>
<p><span class="score" id="score">${(eff.score * 100).toFixed(1)}%</span> efficiency — ${size(eff.wastedBytes)} of ${size(eff.totalBytes)} stored but not visible
(${size(eff.shadowedBytes)} shadowed by upper layers, ${size(eff.deletedBytes)} deleted; ${eff.duplicated} files in several layers).</p>
<table id="waste"><thead><tr><th>wasted</th><th>copies</th><th>layers</th><th>path</th></tr></thead><tbody>${offenders}</tbody></table>
</body></html>
`;
}
