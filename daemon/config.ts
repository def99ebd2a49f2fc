/**
 * The daemon's configuration file (`/etc/layerd/config.json` by default).
 * Validated strictly: an unknown key or a wrong type is an error that
 * names the file and the key. Command-line flags win over the file.
 */
import { readFile } from 'node:fs/promises';
import { ErrorCodes, LayerdError, errnoCode } from '../common/errors.js';
import { type LogLevel } from '../common/log.js';
import { type TimeoutSettings, checkTimeoutSettings } from '../storage/registry/timeouts.js';

export const DEFAULT_CONFIG_PATH = '/etc/layerd/config.json';
export const DEFAULT_SOCKET = '/run/layerd/layerd.sock';

export interface DaemonConfig {
  root?: string;
  socket?: string;
  /** Group (name or gid) allowed to use the socket besides root. */
  socketGroup?: string | number;
  logLevel?: LogLevel;
  gc?: {
    /** Run `prune` this often; 0 or absent: never on its own. */
    pruneIntervalSeconds?: number;
  };
  /** A directory watched for image archives to import. */
  spoolDir?: string;
  /** Where container mountpoints are made when a create names none. */
  mountRoot?: string;
  /** Registries configuration (insecure, caFile, credentials, mirrors) for pull and push. */
  registriesConfig?: string;
  /**
   * How long the kernel may cache names and attributes of writable container
   * mounts, in seconds. Default: 3600 (a container's changes all go through
   * its mount, so the cache stays right). Shorter only matters to someone who
   * changes a container's upper directory behind its mount.
   */
  mountCacheSeconds?: number;
  /** Registry pulls and pushes: connectSeconds (30), idleSeconds (60), totalSeconds (0: no limit). */
  registryTimeouts?: TimeoutSettings;
  /** Free space imports must leave on the store's filesystem, in bytes (default 256 MiB; 0: no check). */
  diskReserveBytes?: number;
  /**
   * How new layers are kept: 'tar' (default) or 'skeleton' (tar skeleton +
   * one content-addressed object per file: docs/storage.md). Read when the
   * daemon starts; `$LAYERD_LAYER_FORMAT` when absent.
   */
  layerFormat?: 'tar' | 'skeleton';
  /**
   * How long a read of a lazily pulled layer may wait for content that is
   * not here yet (retrying the registry with backoff) before it fails with
   * EIO, in seconds (default 30; docs/lazy.md). Read when the daemon starts.
   */
  lazyReadTimeoutSeconds?: number;
  /**
   * containerd's socket (default /run/containerd/containerd.sock; "none":
   * never asked): the snapshotter reads the original blob of each layer
   * containerd unpacked from its content service, so the stored layer has
   * the image's diffID (docs/containerd.md). Read when the daemon starts.
   */
  containerdSocket?: string;
}

const LEVELS: LogLevel[] = ['error', 'warn', 'info', 'debug'];

export async function loadConfig(path: string, required: boolean): Promise<DaemonConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' && !required) return {};
    throw new LayerdError(ErrorCodes.EINVAL, `cannot read the configuration ${path}: ${(err as Error).message}`, { path });
  }
  if (text.trim() === '') return {}; // an empty file (or /dev/null): all defaults
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new LayerdError(ErrorCodes.EINVAL, `${path}: not valid JSON: ${(err as Error).message}`, { path });
  }
  return validateConfig(value, path);
}

export function validateConfig(value: unknown, path: string): DaemonConfig {
  const fail = (message: string, key?: string): never => {
    throw new LayerdError(ErrorCodes.EINVAL, `${path}: ${message}`, key ? { path, key } : { path });
  };
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail('the configuration must be a JSON object');
  const obj = value as Record<string, unknown>;
  const allowed = ['root', 'socket', 'socketGroup', 'logLevel', 'gc', 'spoolDir', 'mountRoot', 'registriesConfig', 'mountCacheSeconds', 'registryTimeouts', 'diskReserveBytes', 'lazyReadTimeoutSeconds', 'containerdSocket', 'layerFormat'];
  for (const key of Object.keys(obj)) if (!allowed.includes(key)) fail(`unknown key '${key}' (known: ${allowed.join(', ')})`, key);
  for (const key of ['root', 'socket', 'spoolDir', 'mountRoot', 'registriesConfig']) {
    if (obj[key] !== undefined && (typeof obj[key] !== 'string' || !(obj[key] as string).startsWith('/'))) fail(`'${key}' must be an absolute path`, key);
  }
  if (obj['socketGroup'] !== undefined && typeof obj['socketGroup'] !== 'string' && !Number.isInteger(obj['socketGroup'])) {
    fail(`'socketGroup' must be a group name or gid`, 'socketGroup');
  }
  if (obj['logLevel'] !== undefined && !LEVELS.includes(obj['logLevel'] as LogLevel)) fail(`'logLevel' must be one of ${LEVELS.join(', ')}`, 'logLevel');
  const containerd = obj['containerdSocket'];
  if (containerd !== undefined && (typeof containerd !== 'string' || (containerd !== 'none' && !containerd.startsWith('/')))) {
    fail(`'containerdSocket' must be an absolute path or "none"`, 'containerdSocket');
  }
  const cache = obj['mountCacheSeconds'];
  if (cache !== undefined && (typeof cache !== 'number' || !Number.isFinite(cache) || cache < 0 || cache > 3600)) {
    fail(`'mountCacheSeconds' must be a number of seconds from 0 to 3600`, 'mountCacheSeconds');
  }
  const lazyRead = obj['lazyReadTimeoutSeconds'];
  if (lazyRead !== undefined && (typeof lazyRead !== 'number' || !Number.isFinite(lazyRead) || lazyRead <= 0 || lazyRead > 3600)) {
    fail(`'lazyReadTimeoutSeconds' must be a number of seconds above 0, at most 3600`, 'lazyReadTimeoutSeconds');
  }
  if (obj['registryTimeouts'] !== undefined) checkTimeoutSettings(obj['registryTimeouts'], `${path}: 'registryTimeouts'`);
  const format = obj['layerFormat'];
  if (format !== undefined && format !== 'tar' && format !== 'skeleton') fail(`'layerFormat' must be 'tar' or 'skeleton'`, 'layerFormat');
  const reserve = obj['diskReserveBytes'];
  if (reserve !== undefined && (typeof reserve !== 'number' || !Number.isSafeInteger(reserve) || reserve < 0)) {
    fail(`'diskReserveBytes' must be a whole number of bytes ≥ 0`, 'diskReserveBytes');
  }
  if (obj['gc'] !== undefined) {
    const gc = obj['gc'];
    if (typeof gc !== 'object' || gc === null || Array.isArray(gc)) fail(`'gc' must be an object`, 'gc');
    for (const key of Object.keys(gc as object)) if (key !== 'pruneIntervalSeconds') fail(`unknown key 'gc.${key}'`, `gc.${key}`);
    const interval = (gc as Record<string, unknown>)['pruneIntervalSeconds'];
    if (interval !== undefined && (typeof interval !== 'number' || interval < 0 || !Number.isFinite(interval))) {
      fail(`'gc.pruneIntervalSeconds' must be a number ≥ 0`, 'gc.pruneIntervalSeconds');
    }
  }
  return obj as DaemonConfig;
}
