/**
 * Raw inflate through the system zlib (libz.so.1, Debian's zlib1g), bound
 * with koffi like libc.ts. Node's zlib cannot start inflating in the middle
 * of a deflate stream: that needs `inflatePrime` (the bits of a byte a
 * block boundary splits) and `inflateSetDictionary` on a raw stream (the
 * 32 KiB window before it), and `Z_BLOCK` to find block boundaries while
 * building an index of such points (the method of zlib's examples/zran.c).
 *
 * The z_stream and its input/output buffers live in one block of native
 * memory that never moves (zlib keeps a pointer to the z_stream in its
 * state), freed by `end()`; bytes and fields are copied in and out of it
 * (one copy each way: small next to inflating).
 */
import koffi from 'koffi';
import { ErrorCodes, LayerdError } from '../errors.js';

/** Bound on first use: a process that never inflates from a checkpoint never loads libz. */
let bound: ReturnType<typeof bind> | undefined;

function bind() {
  // RTLD_DEEPBIND: node exports its own (Chromium) zlib's symbols, and libz's
  // calls between its own functions (inflateInit2_ → inflateReset2) would
  // otherwise bind to those, whose state layout differs: heap corruption.
  const lib = koffi.load('libz.so.1', { deep: true });
  const libc = koffi.load('libc.so.6');
  const fns = {
    version: lib.func('const char *zlibVersion()'),
    inflateInit2: lib.func('int inflateInit2_(void *strm, int windowBits, const char *version, int streamSize)'),
    inflate: lib.func('int inflate(void *strm, int flush)'),
    inflatePrime: lib.func('int inflatePrime(void *strm, int bits, int value)'),
    inflateSetDictionary: lib.func('int inflateSetDictionary(void *strm, const uint8_t *dictionary, uint32_t length)'),
    inflateReset: lib.func('int inflateReset(void *strm)'),
    inflateEnd: lib.func('int inflateEnd(void *strm)'),
    // Copies between JS buffers and the native block.
    copyIn: libc.func('void *memcpy(uint64 dst, const void *src, size_t n)'),
    copyOut: libc.func('void *memcpy(_Out_ void *dst, uint64 src, size_t n)'),
  };
  return { ...fns, versionString: fns.version() as string };
}

function zlib(): ReturnType<typeof bind> {
  bound ??= bind();
  return bound;
}

/** z_stream on LP64 (x86_64, arm64): field offsets and size. */
const Z = { nextIn: 0, availIn: 8, nextOut: 24, availOut: 32, dataType: 88, size: 112 } as const;
const Z_OK = 0;
const Z_STREAM_END = 1;
const Z_BUF_ERROR = -5;
const Z_NO_FLUSH = 0;
const Z_BLOCK = 5;

/** The most history a deflate stream refers back to. */
export const INFLATE_WINDOW = 32 * 1024;

const IN_BYTES = 64 * 1024;
const OUT_BYTES = 256 * 1024;

export interface InflateStep {
  /** Input bytes consumed. */
  consumed: number;
  /** What came out (a copy). */
  output: Buffer;
  /** The deflate stream ended (its final block is done). */
  streamEnd: boolean;
  /**
   * Stopped just after a block's end (or the stream's start), not in the
   * last block: a point inflating can resume from. Only with `toBlock`.
   */
  atBlockBoundary: boolean;
  /** Bits of the last consumed byte that belong to the next block (0–7). */
  unusedBits: number;
}

/** One raw (headerless) inflate stream in the system zlib. */
export class RawInflater {
  /** Address of the native block: z_stream, then the input buffer, then the output buffer. */
  private mem: bigint | undefined;
  private readonly field = Buffer.alloc(8);

  constructor() {
    const mem = koffi.alloc('uint8', Z.size + IN_BYTES + OUT_BYTES) as bigint;
    zlib().copyIn(mem, Buffer.alloc(Z.size), Z.size);
    const status = zlib().inflateInit2(mem, -15, zlib().versionString, Z.size) as number;
    if (status !== Z_OK) {
      koffi.free(mem);
      this.check(status, 'inflateInit2');
    }
    this.mem = mem;
  }

  /** Start again at a block boundary whose byte was split: `bits` bits of `value` come first. */
  prime(bits: number, value: number): void {
    if (bits > 0) this.check(zlib().inflatePrime(this.live(), bits, value) as number, 'inflatePrime');
  }

  /** The window of output before the resume point. */
  setDictionary(window: Buffer): void {
    if (window.length > 0) this.check(zlib().inflateSetDictionary(this.live(), window, window.length) as number, 'inflateSetDictionary');
  }

  /** Forget the stream (for the next gzip member). */
  reset(): void {
    this.check(zlib().inflateReset(this.live()) as number, 'inflateReset');
  }

  /** Inflate from `input` (up to 64 KiB of it is offered) into at most 256 KiB of output. */
  step(input: Buffer, toBlock: boolean): InflateStep {
    const mem = this.live();
    const inAt = mem + BigInt(Z.size);
    const outAt = inAt + BigInt(IN_BYTES);
    const offered = Math.min(input.length, IN_BYTES);
    if (offered > 0) zlib().copyIn(inAt, input, offered);
    this.put64(Z.nextIn, inAt);
    this.put32(Z.availIn, offered);
    this.put64(Z.nextOut, outAt);
    this.put32(Z.availOut, OUT_BYTES);
    const status = zlib().inflate(mem, toBlock ? Z_BLOCK : Z_NO_FLUSH) as number;
    if (status !== Z_OK && status !== Z_STREAM_END && status !== Z_BUF_ERROR) this.check(status, 'inflate');
    const consumed = offered - this.get32(Z.availIn);
    const produced = OUT_BYTES - this.get32(Z.availOut);
    const dataType = this.get32(Z.dataType);
    const output = Buffer.allocUnsafe(produced);
    if (produced > 0) zlib().copyOut(output, outAt, produced);
    return {
      consumed,
      output,
      streamEnd: status === Z_STREAM_END,
      atBlockBoundary: toBlock && (dataType & 128) !== 0 && (dataType & 64) === 0,
      unusedBits: dataType & 7,
    };
  }

  end(): void {
    if (this.mem === undefined) return;
    zlib().inflateEnd(this.mem);
    koffi.free(this.mem);
    this.mem = undefined;
  }

  private put64(offset: number, value: bigint): void {
    this.field.writeBigUInt64LE(value);
    zlib().copyIn(this.live() + BigInt(offset), this.field, 8);
  }

  private put32(offset: number, value: number): void {
    this.field.writeUInt32LE(value);
    zlib().copyIn(this.live() + BigInt(offset), this.field, 4);
  }

  private get32(offset: number): number {
    zlib().copyOut(this.field, this.live() + BigInt(offset), 4);
    return this.field.readInt32LE(0);
  }

  private live(): bigint {
    if (this.mem === undefined) throw new LayerdError(ErrorCodes.EINTERNAL, 'inflate stream used after end()');
    return this.mem;
  }

  private check(status: number, call: string): void {
    if (status === Z_OK) return;
    const message = status === -3 ? 'invalid deflate data' : status === -4 ? 'out of memory' : status === -2 ? 'bad stream state' : `status ${status}`;
    throw new LayerdError(status === -3 ? ErrorCodes.EFORMAT : ErrorCodes.EINTERNAL, `zlib ${call}: ${message}`, { call, status });
  }
}
