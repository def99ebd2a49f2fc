/**
 * Logging: structured JSON lines for the daemon (journald and log shippers
 * read them), short human lines when a person is watching a terminal.
 */
import winston from 'winston';

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export type Logger = winston.Logger;

export interface LoggerOptions {
  level?: LogLevel;
  /** Force JSON (daemon) or human lines; default: human on a TTY, JSON otherwise. */
  json?: boolean;
  /** Component name added to every record. */
  component?: string;
}

export function createLogger(options: LoggerOptions = {}): Logger {
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
    level: options.level ?? (process.env['LAYERD_LOG_LEVEL'] as LogLevel | undefined) ?? 'info',
    defaultMeta: options.component ? { component: options.component } : {},
    format,
    // Everything to stderr: stdout belongs to command output (JSON listings).
    transports: [new winston.transports.Console({ stderrLevels: ['error', 'warn', 'info', 'debug', 'verbose', 'silly'] })],
  });
}

/** A logger that drops everything (library use, tests). */
export function silentLogger(): Logger {
  return winston.createLogger({ silent: true, transports: [new winston.transports.Console({ silent: true })] });
}
