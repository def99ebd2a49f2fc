/**
 * common/sys/fdPassing.ts against a real sender: python3 on the other end of
 * the socketpair (descriptor 3, as fusermount3 gets it) sends descriptors
 * with SCM_RIGHTS, or misbehaves.
 */
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { closeSync, openSync, readFileSync, readSync, readdirSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ErrorCodes, isLayerdError } from '../common/errors.js';
import { receiveFd, socketPair } from '../common/sys/fdPassing.js';

/** Run a python3 snippet with `sock` (the peer's end) as descriptor 3 and the file path as argv[1]; resolves on exit. */
function peer(script: string, theirs: number, path: string): Promise<number | null> {
  const prelude = 'import os, socket, sys\ns = socket.socket(fileno=3)\n';
  return new Promise((done, fail) => {
    const child = spawn('python3', ['-c', prelude + script, path], { stdio: ['ignore', 'ignore', 'inherit', theirs] });
    const timer = setTimeout(() => { child.kill(); fail(new Error('peer did not exit')); }, 10_000);
    child.on('error', (err) => { clearTimeout(timer); fail(err); });
    child.on('exit', (code) => { clearTimeout(timer); done(code); });
  });
}

function readAll(fd: number): string {
  const buf = Buffer.alloc(64);
  return buf.subarray(0, readSync(fd, buf, 0, buf.length, 0)).toString();
}

/** How many descriptors this process has open (to see that none leaked). */
function openDescriptors(): number {
  return readdirSync('/proc/self/fd').length;
}

describe('descriptor passing (socketpair + recvmsg SCM_RIGHTS)', function () {
  this.timeout(20_000);
  let dir: string;
  let file: string;
  let pair: [number, number] | undefined;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'layerd-fdpass-'));
    file = join(dir, 'f');
    await writeFile(file, 'passed along');
    pair = socketPair();
  });

  afterEach(async () => {
    if (pair) for (const fd of pair) closeSync(fd);
    pair = undefined;
    await rm(dir, { recursive: true, force: true });
  });

  it('receives the descriptor the peer opened, close-on-exec', async () => {
    const [ours, theirs] = pair!;
    expect(await peer('socket.send_fds(s, [b"\\0"], [os.open(sys.argv[1], os.O_RDONLY)])', theirs, file)).to.equal(0);
    const fd = receiveFd(ours);
    expect(fd).to.be.a('number');
    try {
      expect(readAll(fd!)).to.equal('passed along');
      const flags = /^flags:\s+([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))?.[1];
      expect(parseInt(flags ?? '0', 8) & 0o2000000, 'O_CLOEXEC').to.not.equal(0);
    } finally {
      closeSync(fd!);
    }
  });

  it('returns undefined when the peer exits without sending, and does not wait', async () => {
    const [ours, theirs] = pair!;
    expect(await peer('pass', theirs, file)).to.equal(0);
    expect(receiveFd(ours)).to.equal(undefined);
  });

  it('refuses data without a descriptor with a typed error', async () => {
    const [ours, theirs] = pair!;
    expect(await peer('s.send(b"x")', theirs, file)).to.equal(0);
    expect(() => receiveFd(ours)).to.throw().that.satisfies((err: unknown) => isLayerdError(err, ErrorCodes.EIO));
  });

  it('refuses two descriptors and closes both', async () => {
    const [ours, theirs] = pair!;
    const before = openDescriptors();
    expect(await peer('socket.send_fds(s, [b"\\0"], [os.open(sys.argv[1], os.O_RDONLY), os.open(sys.argv[1], os.O_RDONLY)])', theirs, file)).to.equal(0);
    expect(() => receiveFd(ours)).to.throw(/expected one descriptor/);
    expect(openDescriptors()).to.equal(before);
  });

  it('gives a typed error for a descriptor that is not a socket', () => {
    const fd = openSync(file, 'r');
    try {
      expect(() => receiveFd(fd)).to.throw(/ENOTSOCK/).that.satisfies((err: unknown) => isLayerdError(err, ErrorCodes.EIO));
    } finally {
      closeSync(fd);
    }
  });
});
