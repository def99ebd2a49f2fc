/**
 * Per-layer progress like `docker pull`, redrawn in place on a terminal and
 * silent otherwise (scripts read the final output, not the animation).
 */
import { type ImportProgress } from '../storage/importer.js';
import { humanSize, short } from './format.js';

export class LayerProgress {
  private readonly lines: string[] = [];
  private readonly rowOf = new Map<string, number>();
  private drawn = 0;
  private lastDraw = 0;

  constructor(private readonly out: NodeJS.WriteStream = process.stderr) {}

  get enabled(): boolean {
    return this.out.isTTY === true;
  }

  update = (event: ImportProgress): void => {
    if (!this.enabled) return;
    const id = short(event.digest);
    let row = this.rowOf.get(id);
    if (row === undefined) {
      row = this.lines.length;
      this.rowOf.set(id, row);
      this.lines.push('');
    }
    switch (event.type) {
      case 'layer-start': this.lines[row] = `${id}: Importing  0 B / ${humanSize(event.size)}`; break;
      case 'layer-progress': {
        const pct = event.size > 0 ? Math.min(100, Math.floor((event.bytes / event.size) * 100)) : 100;
        const bar = '='.repeat(Math.floor(pct / 5)).padEnd(20, ' ');
        this.lines[row] = `${id}: Importing  [${bar}] ${humanSize(event.bytes)} / ${humanSize(event.size)}`;
        if (Date.now() - this.lastDraw < 100) return;
        break;
      }
      case 'layer-done': this.lines[row] = `${id}: Imported (diffID ${short(event.diffId)})`; break;
      case 'layer-exists': this.lines[row] = `${id}: Already exists`; break;
    }
    this.draw();
  };

  private draw(): void {
    this.lastDraw = Date.now();
    if (this.drawn > 0) this.out.write(`\x1b[${this.drawn}A`);
    for (const l of this.lines) this.out.write(`\x1b[2K${l}\n`);
    this.drawn = this.lines.length;
  }
}
