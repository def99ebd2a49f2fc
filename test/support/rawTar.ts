/**
 * Tar archives built block by block, for the cases a packer will not write:
 * PAX `size` overrides, base-256 sizes, GNU long names, bad checksums,
 * trailing blocks, truncation (tests of the tar skeleton, storage/tarSplit.ts).
 */

export interface RawHeader {
  name: string;
  /** '0' file, '1' hard link, '2' symlink, '5' dir, '7' contiguous, 'x' PAX, 'g' global PAX, 'L' GNU long name. */
  type: string;
  size?: number;
  /** Write the size field in base-256 (GNU) instead of octal. */
  base256Size?: boolean;
  /** The size field says this instead of `size` (a PAX record may override it). */
  sizeField?: number;
  linkname?: string;
  mode?: number;
  mtime?: number;
  /** Corrupt the checksum. */
  badChecksum?: boolean;
}

export function header(h: RawHeader): Buffer {
  const b = Buffer.alloc(512);
  b.write(h.name, 0, 100, 'utf8');
  writeOctal(b, 100, 8, h.mode ?? 0o644);
  writeOctal(b, 108, 8, 0);
  writeOctal(b, 116, 8, 0);
  const size = h.sizeField ?? h.size ?? 0;
  if (h.base256Size === true) {
    b[124] = 0x80;
    let n = size;
    for (let i = 135; i > 124; i--) { b[i] = n % 256; n = Math.floor(n / 256); }
  } else {
    writeOctal(b, 124, 12, size);
  }
  writeOctal(b, 136, 12, h.mtime ?? 1_700_000_000);
  b.write(h.type, 156, 1, 'latin1');
  if (h.linkname !== undefined) b.write(h.linkname, 157, 100, 'utf8');
  b.write('ustar\0', 257, 6, 'latin1');
  b.write('00', 263, 2, 'latin1');
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (const byte of b) sum += byte;
  if (h.badChecksum === true) sum += 1;
  b.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 8, 'latin1');
  return b;
}

function writeOctal(b: Buffer, offset: number, length: number, value: number): void {
  b.write(`${value.toString(8).padStart(length - 1, '0')}\0`, offset, length, 'latin1');
}

/** `data` followed by zeros up to a multiple of 512. */
export function padded(data: Buffer): Buffer {
  const rest = data.length % 512;
  return rest === 0 ? data : Buffer.concat([data, Buffer.alloc(512 - rest)]);
}

/** A PAX record: "<len> key=value\n". */
export function paxRecord(key: string, value: string): Buffer {
  const body = ` ${key}=${value}\n`;
  let len = Buffer.byteLength(body) + 1;
  while (String(len).length + Buffer.byteLength(body) !== len) len = String(len).length + Buffer.byteLength(body);
  return Buffer.from(`${len}${body}`);
}

/** A member: its header and its padded data. */
export function member(h: RawHeader, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([header({ ...h, size: h.size ?? data.length }), padded(data)]);
}

/** The two zero blocks that end an archive (and `extra` more). */
export function end(extra = 0): Buffer {
  return Buffer.alloc(512 * (2 + extra));
}
