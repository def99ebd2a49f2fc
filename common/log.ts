/**
 * Logging: records with their metadata as journal fields when systemd
 * runs the process with its stderr connected to the journal (common/journal.ts),
 * structured JSON lines otherwise (log files, log shippers), short human
 * lines when a person is watching a terminal.
 */
import winston from 'winston';
import { JournalTransport, stderrIsJournal } from './journal.js';

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export type Logger = winston.Logger;

export interface LoggerOptions {
  level?: LogLevel;
  /** Force JSON (daemon) or human lines; default: human on a TTY, JSON otherwise. */
  json?: boolean;
  /** Component name added to every record. */
  component?: string;
  /** Send records to journald natively; default: when stderr is the journal stream (JOURNAL_STREAM). */
  journal?: boolean;
}

export function createLogger(options: LoggerOptions = {}): Logger {
  const level = options.level ?? (process.env['LAYERD_LOG_LEVEL'] as LogLevel | undefined) ?? 'info';
  const defaultMeta = options.component ? { component: options.component } : {};
  if (options.journal ?? stderrIsJournal()) {
    return winston.createLogger({
      level, defaultMeta,
      // The fallback (records journald refused) still writes JSON lines.
      format: winston.format.combine(winston.format.timestamp(), winston.format.json()),
      transports: [new JournalTransport({ identifier: 'layerd' })],
    });
  }
  const json = options.json ?? !process.stderr.isTTY;
  const format = json
    ? winston.format.combine(winston.format.timestamp(), winston.format.json())
    : winston.format.combine(
        winston.format.colorize(),
        winston.format.printf(({ level, message, component, ...rest }) => {
          const extra = Object.keys(rest).length > 0 ? ' ' + JSON.stringify(rest) : '';
          return `${level}${component ? ` [${String(component)}]` : ''}: ${String(message)}${extra}`;
        }),
      );
  return winston.createLogger({
    level, defaultMeta, format,
    // Everything to stderr: stdout belongs to command output (JSON listings).
    transports: [new winston.transports.Console({ stderrLevels: ['error', 'warn', 'info', 'debug', 'verbose', 'silly'] })],
  });
}

/** A logger that drops everything (library use, tests). */
export function silentLogger(): Logger {
  return winston.createLogger({ silent: true, transports: [new winston.transports.Console({ silent: true })] });
}
