/**
 * mount/openFiles.ts readAt: bytes in the page cache are read at once
 * (preadv2 RWF_NOWAIT), the rest on the thread pool. A read whose first
 * part is cached and the rest not must still return all of it: a short
 * READ reply tells the kernel the file ends there.
 */
import { expect } from 'chai';
import { closeSync, fsyncSync, openSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { preadCached } from '../common/sys/fs.js';
import { readAt } from '../mount/openFiles.js';
import { execFileAsync, scratch } from './support/env.js';

const PAGE = 4096;
const SIZE = 64 * PAGE;

/**
 * Leave only the first `keep` bytes of `path` in the page cache: drop all
 * of it (a partial drop would not split the large folios the file may sit
 * in), then read those bytes back without read-ahead.
 */
async function evict(path: string, keep: number): Promise<void> {
  await execFileAsync('python3', ['-c', `
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
if int(sys.argv[2]) > 0: os.pread(fd, int(sys.argv[2]), 0)`, path, String(keep)]);
}

describe('mount reads from the page cache', () => {
  let work: { dir: string; remove(): Promise<void> };
  let path: string;
  let fd = -1;
  const content = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4) content.writeUInt32LE(i, i);

  beforeEach(async () => {
    work = await scratch();
    path = join(work.dir, 'file');
    writeFileSync(path, content);
    fd = openSync(path, 'r');
    fsyncSync(fd);
  });
  afterEach(async () => {
    if (fd >= 0) closeSync(fd);
    fd = -1;
    await work.remove();
  });

  it('a read whose first pages are cached and the rest not returns every byte, at any offset into the buffer', async function () {
    const buf = Buffer.alloc(SIZE);
    expect(await readAt(fd, buf, SIZE, 0)).to.equal(SIZE); // all cached
    await evict(path, 2 * PAGE);
    const cachedPart = preadCached(fd, Buffer.alloc(SIZE), SIZE, 0); // (starts the kernel's read-ahead of the rest)
    // A filesystem that cannot drop its pages (tmpfs) or read without waiting has nothing to show here.
    if (cachedPart === undefined || cachedPart === SIZE) this.skip();
    expect(cachedPart, 'bytes the page cache had').to.equal(2 * PAGE);
    expect(await readAt(fd, buf, SIZE, 0)).to.equal(SIZE); // all of it in the cache again, nothing in flight
    await evict(path, 2 * PAGE);

    // As the FUSE server calls it: into a buffer after room for the reply header.
    const reply = Buffer.alloc(16 + SIZE);
    const n = await readAt(fd, reply.subarray(16), SIZE - PAGE, PAGE);
    expect(n).to.equal(SIZE - PAGE);
    expect(reply.subarray(16, 16 + n).equals(content.subarray(PAGE)), 'the bytes read').to.equal(true);
  });

  it('a read of nothing cached goes to the pool; at the end of the file it returns 0', async () => {
    await evict(path, 0);
    expect(preadCached(fd, Buffer.alloc(PAGE), PAGE, 5 * PAGE), 'an uncached page').to.equal(undefined);
    const buf = Buffer.alloc(SIZE);
    const read = readAt(fd, buf, 3 * PAGE, 5 * PAGE);
    expect(await read).to.equal(3 * PAGE);
    expect(buf.subarray(0, 3 * PAGE).equals(content.subarray(5 * PAGE, 8 * PAGE))).to.equal(true);
    expect(await readAt(fd, buf, PAGE, SIZE)).to.equal(0);
  });
});
