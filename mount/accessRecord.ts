/**
 * What a container's start-up read through its mount, to warm the kernel's
 * caches of the next mount of the same image (issue 15: later runs).
 *
 * Each container gets a new FUSE mount, so the kernel knows none of its
 * names and caches none of its pages: the start of a container (runc, the
 * shell, python3 …) costs ~230 round trips to the mount host, each a wake-up
 * of another process — on a busy 2-core machine most of the gap to kernel
 * overlayfs. The host records the paths a mount's first seconds looked up,
 * listed, read and followed; the daemon hands the record of the last mount
 * of an image to the next one's warm-up (daemon/snapshotter/warmUp.ts),
 * which repeats those accesses while containerd and runc set the container
 * up, so the container finds them in the kernel's caches.
 *
 * A record holds union paths of the image (not content), at most
 * RECORD_MAX_OPS distinct accesses, made during RECORD_WINDOW_MS after the
 * mount was made.
 */

/** One access: a lookup (negative ones too), a directory listing, a read of a file range, a readlink. */
export type AccessOp =
  | { op: 'lookup'; path: string }
  | { op: 'list'; path: string }
  | { op: 'read'; path: string; offset: number; size: number }
  | { op: 'readlink'; path: string };

export const RECORD_MAX_OPS = 4096;
export const RECORD_WINDOW_MS = 10_000;

export class AccessRecorder {
  private readonly list: AccessOp[] = [];
  private readonly seen = new Set<string>();
  private readonly until: number;

  constructor(windowMs = RECORD_WINDOW_MS, private readonly maxOps = RECORD_MAX_OPS) {
    this.until = Date.now() + windowMs;
  }

  /** Whether accesses are still recorded (checked before building a path: the window is the mount's start). */
  get open(): boolean {
    return this.list.length < this.maxOps && Date.now() < this.until;
  }

  record(access: AccessOp): void {
    if (!this.open) return;
    const key = access.op === 'read' ? `read ${access.offset} ${access.size} ${access.path}` : `${access.op} ${access.path}`;
    if (this.seen.has(key)) return;
    this.seen.add(key);
    this.list.push(access);
  }

  get ops(): readonly AccessOp[] {
    return this.list;
  }
}

/** The accesses of `value` that are well formed (a record crosses a socket between processes). */
export function validAccessOps(value: unknown): AccessOp[] {
  if (!Array.isArray(value)) return [];
  const ops: AccessOp[] = [];
  for (const item of value.slice(0, RECORD_MAX_OPS) as unknown[]) {
    if (typeof item !== 'object' || item === null) continue;
    const { op, path, offset, size } = item as Record<string, unknown>;
    if (typeof path !== 'string' || path.startsWith('/') || path.split('/').includes('..')) continue;
    if (op === 'lookup' || op === 'list' || op === 'readlink') ops.push({ op, path });
    else if (op === 'read' && Number.isSafeInteger(offset) && Number.isSafeInteger(size) && (offset as number) >= 0 && (size as number) > 0) {
      ops.push({ op, path, offset: offset as number, size: Math.min(size as number, 1024 * 1024) });
    }
  }
  return ops;
}
