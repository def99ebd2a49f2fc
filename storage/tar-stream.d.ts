/**
 * Types for tar-stream 3 as layerd uses it. Its streams are streamx streams,
 * which Node's stream.pipeline and finished() accept; these declarations
 * describe them as Node streams so they compose with the rest of the code.
 * `paxRaw` is added by layerd's patch (patches/tar-stream+3.2.2.patch).
 */
declare module 'tar-stream' {
  import { type Readable, type Writable } from 'node:stream';

  export type EntryType =
    | 'file' | 'link' | 'symlink' | 'directory' | 'block-device' | 'character-device' | 'fifo'
    | 'contiguous-file' | 'pax-header' | 'pax-global-header' | 'gnu-long-link-path' | 'gnu-long-path';

  export interface Headers {
    name: string;
    mode?: number;
    uid?: number;
    gid?: number;
    size?: number;
    mtime?: Date;
    type?: EntryType | null;
    linkname?: string | null;
    uname?: string;
    gname?: string;
    devmajor?: number;
    devminor?: number;
    pax?: Record<string, string | Buffer> | null;
    /** Offset of the entry's data in the archive (extract only). */
    byteOffset?: number;
    /** Raw PAX records, values as bytes (layerd patch). */
    paxRaw?: Map<string, Buffer>;
  }

  export interface Extract extends Writable {
    on(event: 'entry', listener: (header: Headers, stream: Readable, next: (err?: unknown) => void) => void): this;
    on(event: string | symbol, listener: (...args: any[]) => void): this;
  }

  export interface Pack extends Readable {
    entry(header: Headers, callback?: (err?: Error | null) => void): Writable;
    entry(header: Headers, buffer: Buffer | string, callback?: (err?: Error | null) => void): Writable;
    finalize(): void;
  }

  export function extract(opts?: { filenameEncoding?: string; allowUnknownFormat?: boolean }): Extract;
  export function pack(opts?: object): Pack;

  const tarStream: { extract: typeof extract; pack: typeof pack };
  export default tarStream;
}
