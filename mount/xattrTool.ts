/**
 * Extended attributes of real files, through Debian's `attr` tools.
 *
 * Node has no xattr API. Rather than a native npm addon (none is installed
 * and none builds offline here), layerd shells out to getfattr/setfattr: one
 * `getfattr -R` per directory tree at mount time, and one process per xattr
 * change on the upper dir at run time (rare; reads are served from memory),
 * or per copied-up object that has xattrs (all of them in one process).
 * Values travel hex-encoded, so binary values keep their exact bytes.
 */
import { execFile } from 'node:child_process';
import { FsError, type ErrnoName } from './fsError.js';

export type XattrMap = Map<string, Buffer>;

interface ToolResult { stdout: Buffer; stderr: string; code: number }

function run(tool: string, args: string[], input?: string): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(tool, args, { encoding: 'buffer', maxBuffer: 1 << 30 }, (err, stdout, stderr) => {
      if (err && typeof err.code !== 'number') return reject(err);
      resolve({ stdout, stderr: stderr.toString('utf8'), code: err ? Number(err.code) : 0 });
    });
    if (input !== undefined) child.stdin?.on('error', () => undefined).end(input, 'latin1');
  });
}

/** getfattr escapes control characters, `\` and non-ASCII bytes as `\ooo`. */
function unescapeName(escaped: Buffer): string {
  const out: number[] = [];
  for (let i = 0; i < escaped.length; i++) {
    const c = escaped[i]!;
    if (c === 0x5c && i + 3 < escaped.length && /^[0-7]{3}$/.test(escaped.toString('latin1', i + 1, i + 4))) {
      out.push(parseInt(escaped.toString('latin1', i + 1, i + 4), 8));
      i += 3;
    } else if (c === 0x5c && escaped[i + 1] === 0x5c) {
      out.push(0x5c);
      i += 1;
    } else {
      out.push(c);
    }
  }
  return Buffer.from(out).toString('utf8');
}

/** Parse `getfattr -d -e hex` output into file → (name → value). */
export function parseGetfattrDump(dump: Buffer): Map<string, XattrMap> {
  const result = new Map<string, XattrMap>();
  let current: XattrMap | undefined;
  let start = 0;
  while (start < dump.length) {
    let end = dump.indexOf(0x0a, start);
    if (end < 0) end = dump.length;
    const line = dump.subarray(start, end);
    start = end + 1;
    if (line.length === 0) continue;
    if (line.toString('latin1', 0, 8) === '# file: ') {
      current = new Map();
      result.set(unescapeName(line.subarray(8)), current);
      continue;
    }
    if (current === undefined) continue;
    const eq = line.indexOf(0x3d);
    if (eq < 0) { current.set(unescapeName(line), Buffer.alloc(0)); continue; }
    const name = unescapeName(line.subarray(0, eq));
    const value = line.toString('latin1', eq + 1);
    current.set(name, value.startsWith('0x') ? Buffer.from(value.slice(2), 'hex') : Buffer.from(value.replace(/^"|"$/g, ''), 'utf8'));
  }
  return result;
}

/** All xattrs of every file under `root` (symlinks not followed), keyed by absolute path. */
export async function readXattrTree(root: string): Promise<Map<string, XattrMap>> {
  const res = await run('getfattr', ['-R', '-h', '-d', '-m', '-', '-e', 'hex', '--absolute-names', '--', root]);
  return parseGetfattrDump(res.stdout);
}

function toolErrno(stderr: string): ErrnoName {
  if (/No such attribute/.test(stderr)) return 'ENODATA';
  if (/not supported/i.test(stderr)) return 'EOPNOTSUPP';
  if (/No such file/.test(stderr)) return 'ENOENT';
  if (/Permission denied/.test(stderr)) return 'EACCES';
  if (/Operation not permitted/.test(stderr)) return 'EPERM';
  if (/Numerical result out of range/.test(stderr)) return 'ERANGE';
  if (/No space left/.test(stderr)) return 'ENOSPC';
  if (/Argument list too long/.test(stderr)) return 'E2BIG';
  if (/Invalid argument/.test(stderr)) return 'EINVAL';
  return 'EIO';
}

/** All xattrs of one file (not following a symlink). */
export async function readXattrs(file: string): Promise<XattrMap> {
  const res = await run('getfattr', ['-h', '-d', '-m', '-', '-e', 'hex', '--absolute-names', '--', file]);
  if (res.code !== 0 && res.stdout.length === 0 && res.stderr !== '') throw new FsError(toolErrno(res.stderr), file, 'getxattr');
  return parseGetfattrDump(res.stdout).values().next().value ?? new Map();
}

export async function writeXattr(file: string, name: string, value: Buffer): Promise<void> {
  const res = await run('setfattr', ['-h', '-n', name, '-v', '0x' + value.toString('hex'), '--', file]);
  if (res.code !== 0) throw new FsError(toolErrno(res.stderr), file, `setxattr ${name}`);
}

/** Quote a name for a `getfattr --dump` file: every byte outside a safe set as `\ooo` (setfattr unquotes it). */
function quoteName(bytes: Buffer): string {
  let out = '';
  for (const c of bytes) {
    const safe = (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c === 0x2f || c === 0x2e || c === 0x5f || c === 0x2d;
    out += safe ? String.fromCharCode(c) : `\\${c.toString(8).padStart(3, '0')}`;
  }
  return out;
}

/**
 * Set several xattrs of one file (not following a symlink) with one
 * `setfattr --restore` process instead of one process per attribute.
 */
export async function writeXattrs(file: string, xattrs: Iterable<readonly [string, Buffer]>): Promise<void> {
  let dump = '';
  for (const [name, value] of xattrs) dump += `${quoteName(Buffer.from(name, 'utf8'))}=0x${value.toString('hex')}\n`;
  if (dump === '') return;
  const res = await run('setfattr', ['-h', '--restore=-'], `# file: ${quoteName(Buffer.from(file, 'utf8'))}\n${dump}`);
  if (res.code !== 0) throw new FsError(toolErrno(res.stderr), file, 'setxattr');
}

export async function deleteXattr(file: string, name: string): Promise<void> {
  const res = await run('setfattr', ['-h', '-x', name, '--', file]);
  if (res.code !== 0) throw new FsError(toolErrno(res.stderr), file, `removexattr ${name}`);
}
