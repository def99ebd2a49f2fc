/**
 * The thread that repeats a recorded start-up's accesses on a new mount
 * (mountWarmer.ts explains why). Its system calls block on the mount's FUSE
 * server (a mount host, another process), so they run here, off the
 * daemon's event loop and thread pool: a host that hangs holds this thread
 * only.
 *
 * Nothing the container wrote is trusted: every path is opened beneath the
 * mountpoint with no symlink followed (openat2, common/sys), a file is read
 * only once it is known to be a regular file (reopened through its O_PATH
 * descriptor, never by name again), and what is read is thrown away.
 */
import { parentPort } from 'node:worker_threads';
import { readSync } from 'node:fs';
import { O_DIRECTORY, O_NONBLOCK, O_PATH, O_RDONLY, close, fstat, openBeneath, openRoot, readDirFd, readlinkAt, reopenFd } from '../../common/sys/fs.js';
import { errnoNameOf } from '../../common/sys/errors.js';
import type { AccessOp } from '../../mount/accessRecord.js';

export interface WarmJob { id: number; mountpoint: string; ops: AccessOp[]; /** Int32[0] != 0: stop. */ cancel: SharedArrayBuffer }
/** `done`, `failed`: steps (a file's reads are one step; lookups of paths other steps walk through are none). */
export interface WarmResult { id: number; done: number; failed: number; ms: number; stopped?: string }

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
/** Errors that mean the mount itself is gone: no point going on. */
const MOUNT_GONE = new Set<string>(['ENOTCONN', 'ENODEV']);
const buffer = Buffer.allocUnsafe(1024 * 1024);

/** One step of a warm-up: an access of a path; a file's reads are gathered into one step (one open). */
type Step = { op: 'lookup' | 'list' | 'readlink'; path: string } | { op: 'read'; path: string; ranges: { offset: number; size: number }[] };

/**
 * The record as steps, in its order: a lookup of a path that another access
 * walks through anyway is dropped (opening a path looks up each of its
 * components), and every read of a file joins the step of its first read.
 */
export function stepsOf(ops: readonly AccessOp[]): Step[] {
  const walked = new Set<string>();
  for (const { path } of ops) {
    for (let i = path.indexOf('/'); i >= 0; i = path.indexOf('/', i + 1)) walked.add(path.slice(0, i));
  }
  const steps: Step[] = [];
  const reads = new Map<string, { offset: number; size: number }[]>();
  for (const op of ops) {
    if (op.op === 'read') {
      const ranges = reads.get(op.path);
      if (ranges !== undefined) ranges.push({ offset: op.offset, size: op.size });
      else {
        const first = [{ offset: op.offset, size: op.size }];
        reads.set(op.path, first);
        steps.push({ op: 'read', path: op.path, ranges: first });
      }
    } else if (op.op !== 'lookup' || !walked.has(op.path)) {
      steps.push({ op: op.op, path: op.path });
    }
  }
  return steps;
}

function access(root: number, step: Step): void {
  const fd = openBeneath(root, step.path, step.op === 'list' ? O_RDONLY | O_DIRECTORY | O_NONBLOCK : O_PATH);
  try {
    if (step.op === 'list') readDirFd(fd, step.path);
    else if (step.op === 'readlink') readlinkAt(fd, '', step.path);
    else if (step.op === 'read' && (fstat(fd, step.path).mode & S_IFMT) === S_IFREG) {
      // Reopened through the descriptor: the very file just checked, not whatever the path names by now.
      const file = reopenFd(fd, O_RDONLY | O_NONBLOCK, step.path);
      try {
        for (const { offset, size } of step.ranges) readSync(file, buffer, 0, Math.min(size, buffer.length), offset);
      } finally {
        close(file);
      }
    }
  } finally {
    close(fd);
  }
}

function run(job: WarmJob): WarmResult {
  const started = performance.now();
  const cancel = new Int32Array(job.cancel);
  let done = 0;
  let failed = 0;
  let stopped: string | undefined;
  let root = -1;
  try {
    root = openRoot(job.mountpoint);
    for (const step of stepsOf(job.ops)) {
      if (Atomics.load(cancel, 0) !== 0) { stopped = 'cancelled'; break; }
      try {
        access(root, step);
        done++;
      } catch (err) {
        failed++; // ENOENT and the like: the container changed it, or a negative lookup recorded
        const name = errnoNameOf(err);
        if (name !== undefined && MOUNT_GONE.has(name)) { stopped = name; break; }
      }
    }
  } catch (err) {
    stopped = String(err);
  } finally {
    if (root >= 0) close(root);
  }
  return { id: job.id, done, failed, ms: Math.round(performance.now() - started), ...(stopped !== undefined ? { stopped } : {}) };
}

parentPort?.on('message', (job: WarmJob) => parentPort!.postMessage(run(job)));
