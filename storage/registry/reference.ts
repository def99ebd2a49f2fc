/**
 * Registry references: `HOST[:PORT]/REPOSITORY[:TAG]` or `...@sha256:<hex>`.
 * A first component without a dot, a colon or `localhost` is a Docker Hub
 * repository (`debian` → `docker.io/library/debian`), as with `docker pull`.
 */
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { type Digest, isDigest } from '../digest.js';
import { isValidName, isValidTag } from '../references.js';

export const DOCKER_HUB = 'docker.io';
/** Where Docker Hub's registry API actually answers. */
export const DOCKER_HUB_ENDPOINT = 'registry-1.docker.io';

export interface RegistryRef {
  /** Registry host, with port if any (`127.0.0.1:5000`). */
  registry: string;
  /** Repository path inside the registry (`corpus/debian-multi`). */
  repository: string;
  tag?: string;
  digest?: Digest;
}

export function parseRegistryRef(text: string): RegistryRef {
  const invalid = (why: string): LayerdError => new LayerdError(
    ErrorCodes.EINVAL, `invalid registry reference '${text}': ${why} (expected HOST[:PORT]/REPO[:TAG] or HOST[:PORT]/REPO@sha256:<hex>)`, { ref: text },
  );
  let rest = text;
  let digest: Digest | undefined;
  const at = rest.indexOf('@');
  if (at !== -1) {
    const d = rest.slice(at + 1);
    if (!isDigest(d)) throw invalid(`'${d}' is not a sha256 digest`);
    digest = d;
    rest = rest.slice(0, at);
  }
  let tag: string | undefined;
  const slash = rest.lastIndexOf('/');
  const colon = rest.lastIndexOf(':');
  if (colon > slash) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!isValidTag(tag)) throw invalid(`'${tag}' is not a valid tag`);
  }
  const first = rest.split('/')[0]!;
  let registry: string;
  let repository: string;
  if (rest.includes('/') && (first.includes('.') || first.includes(':') || first === 'localhost' || first.startsWith('['))) {
    registry = first;
    repository = rest.slice(first.length + 1);
  } else {
    registry = DOCKER_HUB;
    repository = rest.includes('/') ? rest : `library/${rest}`;
  }
  if (!isValidName(repository) || repository.includes(':')) throw invalid(`'${repository}' is not a valid repository name`);
  if (!digest && !tag) tag = 'latest';
  return { registry, repository, ...(tag ? { tag } : {}), ...(digest ? { digest } : {}) };
}

/** The store NAME an image pulled from `ref` is kept under: `registry/repository`. */
export function storeName(ref: RegistryRef): string {
  return `${ref.registry}/${ref.repository}`;
}

export function formatRegistryRef(ref: RegistryRef): string {
  return `${storeName(ref)}${ref.tag ? `:${ref.tag}` : ''}${ref.digest ? `@${ref.digest}` : ''}`;
}

/** Loopback hosts speak plain HTTP by default, as Docker treats them. */
export function isLoopbackHost(registry: string): boolean {
  const host = registry.startsWith('[') ? registry.slice(1, registry.indexOf(']')) : registry.replace(/:\d+$/, '');
  return host === 'localhost' || host === '::1' || /^127(\.\d{1,3}){3}$/.test(host);
}
