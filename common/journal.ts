/**
 * Logging to journald through its native protocol: one datagram per record
 * to /run/systemd/journal/socket, made of `NAME=value` lines (a value with a
 * newline goes in the binary-safe form: NAME, newline, 64-bit little-endian
 * length, the bytes, newline). Unlike JSON lines on stderr, every record
 * keeps its priority (`journalctl -p warning`) and its metadata as fields
 * of their own (`journalctl CONTAINER=c1`, `DIGEST=sha256:…`).
 *
 * The daemon uses it only when systemd connected its stderr to the journal
 * (JOURNAL_STREAM names that very stream): a process whose stderr was
 * redirected elsewhere (a mount host writing its log file) keeps JSON lines.
 */
import { fstatSync, statSync } from 'node:fs';
import Transport from 'winston-transport';
import { UnixDatagramSender, unixAddress } from './sys/unixDatagram.js';

export const JOURNAL_SOCKET = '/run/systemd/journal/socket';

/** syslog priorities of winston's npm levels. */
const PRIORITY: Readonly<Record<string, number>> = { error: 3, warn: 4, info: 6, http: 6, verbose: 7, debug: 7, silly: 7 };

export function journalPriority(level: string): number {
  return PRIORITY[level] ?? 6;
}

/** Fields this module sets itself: metadata of the same name is sent as LAYERD_<NAME>. */
const OWN_FIELDS = new Set(['MESSAGE', 'PRIORITY', 'SYSLOG_IDENTIFIER']);
/** Record properties that are not metadata. */
const NOT_METADATA = new Set(['level', 'message', 'timestamp']);
const MAX_FIELD_NAME = 64;

/**
 * The journal field name of a metadata key: `container` → CONTAINER,
 * `diffId` → DIFF_ID. journald accepts A–Z, 0–9 and '_', not starting with
 * '_' (fields of the journal itself) or a digit; undefined if nothing is left.
 */
export function journalFieldName(key: string): string | undefined {
  const name = key
    .replace(/([a-z0-9])([A-Z])/g, '$1_$2')
    .toUpperCase()
    .replace(/[^A-Z0-9_]/g, '_')
    .replace(/^[_0-9]+/, '')
    .slice(0, MAX_FIELD_NAME);
  if (name === '') return undefined;
  return OWN_FIELDS.has(name) ? `LAYERD_${name}`.slice(0, MAX_FIELD_NAME) : name;
}

export type JournalFields = ReadonlyArray<readonly [name: string, value: string | Buffer]>;

/** One native-protocol datagram holding `fields` (names must already be valid). */
export function encodeJournalEntry(fields: JournalFields): Buffer {
  const parts: Buffer[] = [];
  for (const [name, value] of fields) {
    const bytes = typeof value === 'string' ? Buffer.from(value) : value;
    if (!bytes.includes(0x0a)) {
      parts.push(Buffer.from(`${name}=`), bytes, Buffer.from('\n'));
      continue;
    }
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(bytes.length));
    parts.push(Buffer.from(`${name}\n`), length, bytes, Buffer.from('\n'));
  }
  return Buffer.concat(parts);
}

function fieldValue(value: unknown): string {
  if (typeof value === 'string') return value;
  if (value instanceof Error) return value.message;
  if (typeof value === 'object' && value !== null) return JSON.stringify(value);
  return String(value);
}

/** The fields of one winston record: message, priority, identifier, then each metadata key. */
export function journalFieldsOf(info: Readonly<Record<string, unknown>>, identifier: string): JournalFields {
  const fields: Array<readonly [string, string]> = [
    ['MESSAGE', fieldValue(info['message'])],
    ['PRIORITY', String(journalPriority(String(info['level'])))],
    ['SYSLOG_IDENTIFIER', identifier],
  ];
  for (const [key, value] of Object.entries(info)) {
    if (NOT_METADATA.has(key) || value === undefined) continue;
    const name = journalFieldName(key);
    if (name !== undefined) fields.push([name, fieldValue(value)]);
  }
  return fields;
}

/**
 * Whether this process's stderr is the journal stream systemd gave it
 * (JOURNAL_STREAM is "device:inode" of that stream) and journald's socket
 * is there: then records go to journald natively.
 */
export function stderrIsJournal(env: NodeJS.ProcessEnv = process.env, socket = JOURNAL_SOCKET): boolean {
  const stream = /^(\d+):(\d+)$/.exec(env['JOURNAL_STREAM'] ?? '');
  if (!stream) return false;
  try {
    const stderr = fstatSync(2, { bigint: true });
    if (stderr.dev !== BigInt(stream[1]!) || stderr.ino !== BigInt(stream[2]!)) return false;
    return statSync(socket).isSocket();
  } catch {
    return false;
  }
}

export interface JournalTransportOptions {
  /** SYSLOG_IDENTIFIER of every record (what `journalctl -t` matches). */
  identifier: string;
  /** journald's socket (tests point it elsewhere). */
  socket?: string;
  level?: string;
  /** Where a record goes when journald does not take it (default: a JSON line on stderr). */
  fallback?: (line: string) => void;
}

/**
 * A winston transport that sends each record to journald. A record journald
 * refuses (not listening, queue full, too large for one datagram) is written
 * as a JSON line to stderr instead — which systemd also puts in the journal,
 * only without fields — so no record is lost and logging never blocks the
 * event loop on a stalled journald.
 */
export class JournalTransport extends Transport {
  private readonly sender = new UnixDatagramSender();
  private readonly address: { addr: Buffer; length: number };
  private readonly identifier: string;
  private readonly fallback: (line: string) => void;

  constructor(options: JournalTransportOptions) {
    super(options.level !== undefined ? { level: options.level } : {});
    this.address = unixAddress(options.socket ?? JOURNAL_SOCKET);
    this.identifier = options.identifier;
    this.fallback = options.fallback ?? ((line) => { process.stderr.write(line + '\n'); });
  }

  override log(info: Record<string, unknown>, next: () => void): void {
    try {
      this.sender.send(this.address, encodeJournalEntry(journalFieldsOf(info, this.identifier)), { wait: false });
    } catch {
      const { level, message, ...rest } = info;
      this.fallback(JSON.stringify({ level, message, ...rest }));
    }
    next();
  }

  override close(): void {
    this.sender.close();
  }
}
