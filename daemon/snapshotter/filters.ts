/**
 * containerd's filter syntax (github.com/containerd/containerd/filters), as
 * the snapshots List call receives it:
 *
 *   filter    := selector { "," selector }          (all must match)
 *   selector  := fieldpath [ operator value ]        (no operator: the field is present)
 *   fieldpath := field { "." field }
 *   field     := quoted | [A-Za-z0-9_]+
 *   operator  := "==" | "!=" | "~="                  (~= : regular expression)
 *   value     := quoted | /regexp/ | [^\s,]+
 *   quoted    := "..." (with \ escapes) | '...'
 *
 * A List request carries several filters; a snapshot is listed if it matches
 * any of them (or if there are none).
 */
import { ErrorCodes, LayerdError } from '../../common/errors.js';

export type Operator = 'present' | '==' | '!=' | '~=';

export interface Selector {
  fieldpath: string[];
  operator: Operator;
  value: string;
  regexp?: RegExp;
}

/** Gives the value of a field path, and whether the field is there. */
export type FieldLookup = (fieldpath: string[]) => { value: string; present: boolean };

export type Filter = Selector[];

class Scanner {
  pos = 0;
  constructor(readonly text: string) {}

  get done(): boolean { return this.pos >= this.text.length; }
  peek(): string { return this.text[this.pos] ?? ''; }

  skipSpace(): void {
    while (!this.done && /\s/.test(this.peek())) this.pos++;
  }

  fail(message: string): never {
    throw new LayerdError(ErrorCodes.EINVAL, `invalid filter ${JSON.stringify(this.text)} at ${this.pos}: ${message}`, { filter: this.text, position: this.pos });
  }

  /** A quoted string starting at the current position ("…" with escapes, '…', or /…/). */
  quoted(): string {
    const quote = this.peek();
    const start = this.pos;
    this.pos++;
    let out = '';
    while (!this.done) {
      const ch = this.text[this.pos++]!;
      if (ch === quote) return out;
      if (ch === '\\' && quote !== "'") {
        if (this.done) break;
        const esc = this.text[this.pos++]!;
        if (quote === '/') { out += esc === '/' ? '/' : `\\${esc}`; continue; }
        const simple: Record<string, string> = { n: '\n', t: '\t', r: '\r', '\\': '\\', '"': '"', "'": "'", a: '\x07', b: '\b', f: '\f', v: '\v' };
        if (esc in simple) { out += simple[esc]; continue; }
        if (esc === 'x' || esc === 'u' || esc === 'U') {
          const len = esc === 'x' ? 2 : esc === 'u' ? 4 : 8;
          const hex = this.text.slice(this.pos, this.pos + len);
          if (!/^[0-9a-fA-F]+$/.test(hex) || hex.length !== len) this.fail('bad escape');
          this.pos += len;
          out += String.fromCodePoint(parseInt(hex, 16));
          continue;
        }
        this.fail(`unknown escape \\${esc}`);
      }
      out += ch;
    }
    this.pos = start;
    return this.fail('unterminated quoted string');
  }

  field(): string {
    const ch = this.peek();
    if (ch === '"' || ch === "'") return this.quoted();
    const m = /^[A-Za-z0-9_]+/.exec(this.text.slice(this.pos));
    if (!m) this.fail('expected a field name');
    this.pos += m[0].length;
    return m[0];
  }

  operator(): Operator | undefined {
    const two = this.text.slice(this.pos, this.pos + 2);
    if (two === '==' || two === '!=' || two === '~=') { this.pos += 2; return two; }
    return undefined;
  }

  value(allowRegexp: boolean): string {
    const ch = this.peek();
    if (ch === '"' || ch === "'" || (allowRegexp && ch === '/')) return this.quoted();
    const m = /^[^\s,]+/.exec(this.text.slice(this.pos));
    if (!m) this.fail('expected a value');
    this.pos += m[0].length;
    return m[0];
  }
}

/** Parse one filter string (selectors joined by ","). An empty string matches everything. */
export function parseFilter(text: string): Filter {
  const s = new Scanner(text);
  const selectors: Selector[] = [];
  s.skipSpace();
  if (s.done) return selectors;
  for (;;) {
    s.skipSpace();
    const fieldpath = [s.field()];
    while (s.peek() === '.') { s.pos++; fieldpath.push(s.field()); }
    s.skipSpace();
    const op = s.operator();
    if (op === undefined) {
      selectors.push({ fieldpath, operator: 'present', value: '' });
    } else {
      s.skipSpace();
      const value = s.value(op === '~=');
      const selector: Selector = { fieldpath, operator: op, value };
      if (op === '~=') {
        try {
          selector.regexp = new RegExp(value);
        } catch (err) {
          s.fail(`bad regular expression: ${(err as Error).message}`);
        }
      }
      selectors.push(selector);
    }
    s.skipSpace();
    if (s.done) return selectors;
    if (s.peek() !== ',') s.fail('expected "," or the end');
    s.pos++;
  }
}

/** Parse the filters of one request; a bad one is an EINVAL naming it. */
export function parseFilters(texts: readonly string[]): Filter[] {
  return texts.map(parseFilter);
}

export function matchFilter(filter: Filter, lookup: FieldLookup): boolean {
  return filter.every((sel) => {
    const { value, present } = lookup(sel.fieldpath);
    switch (sel.operator) {
      case 'present': return present;
      case '==': return present && value === sel.value;
      case '!=': return value !== sel.value;
      case '~=': return sel.regexp!.test(value);
    }
  });
}

/** Any of the filters matches (no filters: everything matches). */
export function matchAny(filters: readonly Filter[], lookup: FieldLookup): boolean {
  return filters.length === 0 || filters.some((f) => matchFilter(f, lookup));
}
