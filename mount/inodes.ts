/**
 * Inode numbers of the union, stable across calls and across remounts of the
 * same layers and upper dir.
 *
 * The scheme fits 32 bits without hashing (hashes of 68k paths into 31 bits
 * collide). It was made for fuse-native, which passed st_ino as 32 bits; it
 * stays so numbers do not change for mounts of the same layers and 32-bit
 * programs without large-file support can still stat the tree:
 * - 1: the root directory;
 * - lower content: numbers handed out from 2 upwards while merging the
 *   layers bottom→top, one per index entry in index order (and one per
 *   directory the merge has to invent); hard links share their target's
 *   number. A deterministic function of the layer indexes alone, so it does
 *   not depend on the upper dir;
 * - upper content: the upper file's own st_ino with the top bit set (the
 *   upper is on a real filesystem that already keeps its numbers unique and
 *   stable; ext4 numbers stay below 2^31).
 * A merged directory that exists in a lower layer keeps the lower number even
 * once copied up, so a directory's number does not change when written to.
 */

export const ROOT_INO = 1;
export const FIRST_LOWER_INO = 2;
const UPPER_BIT = 0x80000000;
const LOWER_LIMIT = UPPER_BIT;

export function upperIno(stIno: number | bigint): number {
  const low31 = typeof stIno === 'bigint' ? Number(stIno & 0x7fffffffn) : stIno % UPPER_BIT;
  return (UPPER_BIT + low31) >>> 0;
}

/** Hands out lower inode numbers in a fixed order. */
export class LowerInoAllocator {
  private next = FIRST_LOWER_INO;

  take(): number {
    if (this.next >= LOWER_LIMIT) throw new RangeError('more than 2^31 lower entries');
    return this.next++;
  }
}
