/**
 * Registries configuration: how to reach each registry. A JSON file or
 * object:
 *
 *   {
 *     "registries": {
 *       "registry.example:5000": {
 *         "insecure": false,            // true: plain HTTP (loopback hosts default to true)
 *         "caFile": "/etc/layerd/ca.pem", // extra CA for HTTPS
 *         "username": "u", "password": "p",
 *         "mirrors": ["mirror.example:5001", "http://127.0.0.1:5002"]
 *       }
 *     }
 *   }
 *
 * Mirrors are tried first for pulls, in order, then the registry itself;
 * pushes always go to the registry itself.
 */
import { readFile } from 'node:fs/promises';
import { ErrorCodes, LayerdError, errnoCode } from '../../common/errors.js';
import { DOCKER_HUB, DOCKER_HUB_ENDPOINT, isLoopbackHost } from './reference.js';

export interface RegistrySettings {
  insecure?: boolean;
  caFile?: string;
  username?: string;
  password?: string;
  mirrors?: string[];
}

export interface RegistriesConfig {
  registries: Record<string, RegistrySettings>;
}

export interface Credentials {
  username: string;
  password: string;
}

/** One place to send requests to: the registry itself or a mirror. */
export interface Endpoint {
  /** The registry name as written in references (for messages and errors). */
  registry: string;
  /** `http://host:port` or `https://host:port`, no trailing slash. */
  baseUrl: string;
  /** PEM text of an extra CA, for HTTPS. */
  ca?: string;
  credentials?: Credentials;
  mirror: boolean;
}

export const EMPTY_CONFIG: RegistriesConfig = { registries: {} };

export async function loadRegistriesConfig(path: string): Promise<RegistriesConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new LayerdError(ErrorCodes.ENOTFOUND, `no such registries config: ${path}`, { path });
    throw new LayerdError(ErrorCodes.EIO, `cannot read registries config ${path}: ${(err as Error).message}`, { path }, { cause: err });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new LayerdError(ErrorCodes.EBADJSON, `registries config ${path}: not valid JSON (${(err as Error).message})`, { path });
  }
  return checkRegistriesConfig(value, path);
}

export function checkRegistriesConfig(value: unknown, what = 'registries config'): RegistriesConfig {
  const bad = (message: string): LayerdError => new LayerdError(ErrorCodes.EBADJSON, `${what}: ${message}`);
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw bad('expected a JSON object');
  const registries = (value as Record<string, unknown>)['registries'] ?? {};
  if (typeof registries !== 'object' || registries === null || Array.isArray(registries)) throw bad(`'registries' must be an object`);
  const out: Record<string, RegistrySettings> = {};
  for (const [host, raw] of Object.entries(registries as Record<string, unknown>)) {
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw bad(`registries.${host} must be an object`);
    const r = raw as Record<string, unknown>;
    const s: RegistrySettings = {};
    if (r['insecure'] !== undefined) {
      if (typeof r['insecure'] !== 'boolean') throw bad(`registries.${host}.insecure must be true or false`);
      s.insecure = r['insecure'];
    }
    for (const key of ['caFile', 'username', 'password'] as const) {
      if (r[key] === undefined) continue;
      if (typeof r[key] !== 'string') throw bad(`registries.${host}.${key} must be a string`);
      s[key] = r[key] as string;
    }
    if ((s.username === undefined) !== (s.password === undefined)) throw bad(`registries.${host}: give both username and password`);
    if (r['mirrors'] !== undefined) {
      if (!Array.isArray(r['mirrors']) || !r['mirrors'].every((m) => typeof m === 'string')) throw bad(`registries.${host}.mirrors must be an array of strings`);
      s.mirrors = r['mirrors'] as string[];
    }
    out[host] = s;
  }
  return { registries: out };
}

/** The endpoints to try for `registry`, mirrors first when `forPull`. */
export async function endpointsFor(config: RegistriesConfig, registry: string, forPull: boolean): Promise<Endpoint[]> {
  const endpoints: Endpoint[] = [];
  if (forPull) {
    for (const mirror of config.registries[registry]?.mirrors ?? []) {
      endpoints.push(await endpointOf(config, mirror, registry, true));
    }
  }
  endpoints.push(await endpointOf(config, registry, registry, false));
  return endpoints;
}

async function endpointOf(config: RegistriesConfig, address: string, registry: string, mirror: boolean): Promise<Endpoint> {
  const explicit = /^(https?):\/\/(.+?)\/*$/.exec(address);
  const host = explicit ? explicit[2]! : address;
  const settings = config.registries[host] ?? {};
  const insecure = settings.insecure ?? isLoopbackHost(host);
  const scheme = explicit ? explicit[1]! : (insecure && !settings.caFile ? 'http' : 'https');
  const endpointHost = host === DOCKER_HUB ? DOCKER_HUB_ENDPOINT : host;
  const endpoint: Endpoint = { registry, baseUrl: `${scheme}://${endpointHost}`, mirror };
  if (settings.caFile) {
    try {
      endpoint.ca = await readFile(settings.caFile, 'utf8');
    } catch (err) {
      throw new LayerdError(ErrorCodes.EIO, `registry ${host}: cannot read caFile ${settings.caFile}: ${(err as Error).message}`, { registry: host, path: settings.caFile }, { cause: err });
    }
  }
  if (settings.username !== undefined && settings.password !== undefined) {
    endpoint.credentials = { username: settings.username, password: settings.password };
  }
  return endpoint;
}
