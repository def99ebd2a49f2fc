/**
 * Free space for the store: a full disk is refused up front, before it can
 * fail in the middle of an import, and an `ENOSPC` from the kernel or from
 * SQLite reaches the caller as layerd's own ENOSPC, never as corruption.
 *
 * The reserve is what an ingest must leave free on the store's filesystem
 * (the database, the daemon's logs and other imports need room too). It is
 * checked before an import starts and again every few MiB it writes, so a
 * decompression bomb stops at the reserve instead of at a full disk.
 */
import { statfs } from 'node:fs/promises';
import { ErrorCodes, LayerdError, type ErrorContext, errnoCode } from '../common/errors.js';

export const DEFAULT_DISK_RESERVE_BYTES = 256 * 1024 ** 2;

/** Bytes a non-root writer may still use on the filesystem holding `path`. */
export async function freeBytes(path: string): Promise<number> {
  const st = await statfs(path);
  return st.bavail * st.bsize;
}

/**
 * Counts the bytes an ingest writes under `path` and refuses (ELIMIT) once
 * the free space would fall below `reserveBytes`. A reserve of 0 turns the
 * checks off (the kernel's ENOSPC is then the only limit).
 */
export class DiskGuard {
  private unchecked = 0;
  private readonly checkEvery: number;

  constructor(private readonly path: string, readonly reserveBytes: number) {
    // Often enough that a small reserve is not overrun between two checks.
    this.checkEvery = Math.min(8 * 1024 ** 2, Math.max(64 * 1024, Math.floor(reserveBytes / 4)));
  }

  /** Refuse unless `needBytes` more would still leave the reserve free. */
  async check(needBytes = 0): Promise<void> {
    this.unchecked = 0;
    if (this.reserveBytes <= 0) return;
    const free = await freeBytes(this.path);
    if (free - needBytes < this.reserveBytes) {
      throw new LayerdError(
        ErrorCodes.ELIMIT,
        `not enough free space for the store (${free} bytes free${needBytes > 0 ? `, ${needBytes} needed` : ''}): `
          + `the disk reserve (diskReserveBytes) of ${this.reserveBytes} bytes must stay free`,
        { limit: 'diskReserveBytes', reserveBytes: this.reserveBytes, freeBytes: free, path: this.path },
      );
    }
  }

  /** Account for `bytes` about to be written; checks the disk every few MiB. */
  async wrote(bytes: number): Promise<void> {
    this.unchecked += bytes;
    if (this.reserveBytes > 0 && this.unchecked >= this.checkEvery) await this.check(this.unchecked);
  }
}

/** An operating-system or SQLite "disk full" error as layerd's ENOSPC; undefined for any other error. */
export function noSpaceError(err: unknown, what: string, context: ErrorContext = {}): LayerdError | undefined {
  if (err instanceof LayerdError) return err.code === ErrorCodes.ENOSPC ? err : undefined;
  const code = errnoCode(err);
  if (code !== 'ENOSPC' && code !== 'EDQUOT' && code !== 'SQLITE_FULL') return undefined;
  const message = err instanceof Error ? err.message : String(err);
  return new LayerdError(ErrorCodes.ENOSPC, `no space left for ${what}: ${message}`, context, { cause: err });
}
