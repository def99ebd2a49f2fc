/**
 * Hand-made tar archives for tests, including hostile ones: tar-stream's
 * packer writes whatever names and links it is given.
 */
import { createWriteStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import tarStream, { type Headers } from 'tar-stream';

export interface TarItem {
  header: Partial<Headers> & { name: string };
  content?: Buffer | string;
}

export async function writeTar(path: string, items: TarItem[], options: { gzip?: boolean } = {}): Promise<void> {
  const pack = tarStream.pack();
  const out = createWriteStream(path);
  const done = options.gzip ? pipeline(pack, createGzip(), out) : pipeline(pack, out);
  for (const item of items) {
    const header: Headers = { mode: 0o644, uid: 0, gid: 0, mtime: new Date(1_700_000_000_000), type: 'file', ...item.header };
    await new Promise<void>((resolve, reject) => {
      const callback = (err?: Error | null): void => (err ? reject(err) : resolve());
      const content = item.content ?? (header.type === 'file' ? '' : undefined);
      if (content === undefined) pack.entry(header, callback);
      else pack.entry(header, content, callback);
    });
  }
  pack.finalize();
  await done;
}
