/**
 * PAX time records (`mtime=1700000000.123456789`): a signed decimal number
 * of seconds since the epoch with an optional fraction. A negative value
 * is the whole number negated, so -0.25 is a quarter second before 1970:
 * whole seconds -1 (floor) and 750,000,000 ns.
 */

const NSEC_PER_SEC = 1_000_000_000;
const PAX_TIME = /^(-?)(\d+)(?:\.(\d*))?$/;

export interface PaxTime {
  /** Whole seconds, rounded down (towards minus infinity). */
  sec: number;
  /** 0–999,999,999. */
  nsec: number;
}

/**
 * Parse a PAX time value. Digits past nanoseconds are dropped, rounding
 * down. Undefined when the value is not a time or not a safe integer of
 * seconds.
 */
export function parsePaxTime(value: string): PaxTime | undefined {
  const m = PAX_TIME.exec(value.trim());
  if (!m) return undefined;
  const negative = m[1] === '-';
  const whole = Number(m[2]);
  if (!Number.isSafeInteger(whole)) return undefined;
  const digits = m[3] ?? '';
  let frac = Number(digits.slice(0, 9).padEnd(9, '0'));
  if (!negative) return { sec: whole, nsec: frac };
  // Rounding down a negative time rounds its magnitude up.
  if (/[1-9]/.test(digits.slice(9))) frac += 1;
  if (frac === 0) return { sec: whole === 0 ? 0 : -whole, nsec: 0 };
  return { sec: -whole - 1, nsec: NSEC_PER_SEC - frac };
}

/**
 * Format whole seconds and nanoseconds as a PAX time: integer seconds when
 * nsec is 0, else the exact fraction without trailing zeros (as GNU tar and
 * Go's archive/tar write it).
 */
export function formatPaxTime(sec: number, nsec = 0): string {
  if (nsec === 0) return String(sec);
  let sign = '';
  let whole = sec;
  let frac = nsec;
  if (sec < 0) {
    sign = '-';
    whole = -(sec + 1);
    frac = NSEC_PER_SEC - nsec;
  }
  return `${sign}${whole}.${String(frac).padStart(9, '0').replace(/0+$/, '')}`;
}

/** True for a valid nanoseconds field. */
export function isNsec(nsec: number): boolean {
  return Number.isInteger(nsec) && nsec >= 0 && nsec < NSEC_PER_SEC;
}
