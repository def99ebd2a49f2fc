/**
 * Image references as people type them: `NAME[:TAG]`, `NAME@sha256:…`,
 * `sha256:<hex>` or a unique prefix of an image digest (at least 4 hex).
 */
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type Digest, isDigest } from './digest.js';

export type ImageRef =
  | { kind: 'tag'; name: string; tag: string }
  | { kind: 'digest'; digest: Digest; name?: string }
  | { kind: 'prefix'; hex: string };

// Docker's grammar: optional registry host[:port], then lowercase path components.
const HOST = '(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?';
const COMPONENT = '[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*';
const NAME_RE = new RegExp(`^${HOST}${COMPONENT}(?:/${COMPONENT})*$`);
const TAG_RE = /^[\w][\w.-]{0,127}$/;
const PREFIX_RE = /^(?:sha256:)?([0-9a-f]{4,64})$/;

export function isValidName(name: string): boolean {
  return name.length <= 255 && NAME_RE.test(name);
}

export function isValidTag(tag: string): boolean {
  return TAG_RE.test(tag);
}

export function parseImageRef(text: string): ImageRef {
  if (isDigest(text)) return { kind: 'digest', digest: text };
  const at = text.indexOf('@');
  if (at !== -1) {
    const name = text.slice(0, at);
    const digest = text.slice(at + 1);
    if (!isValidName(name) || !isDigest(digest)) throw invalid(text);
    return { kind: 'digest', digest, name };
  }
  const prefix = PREFIX_RE.exec(text);
  // A bare hex string could also be a name; a name wins if one is tagged so (resolved by the store).
  if (prefix && (text.startsWith('sha256:') || text.length >= 12)) return { kind: 'prefix', hex: prefix[1]! };
  const { name, tag } = splitNameTag(text);
  return { kind: 'tag', name, tag };
}

/** Split `NAME[:TAG]` (TAG defaults to `latest`), validating both. */
export function splitNameTag(text: string): { name: string; tag: string } {
  const slash = text.lastIndexOf('/');
  const colon = text.lastIndexOf(':');
  const hasTag = colon > slash;
  const name = hasTag ? text.slice(0, colon) : text;
  const tag = hasTag ? text.slice(colon + 1) : 'latest';
  if (!isValidName(name) || !isValidTag(tag)) throw invalid(text);
  return { name, tag };
}

export function formatRef(name: string, tag: string): string {
  return `${name}:${tag}`;
}

function invalid(text: string): LayerdError {
  return new LayerdError(
    ErrorCodes.EINVAL,
    `invalid image reference '${text}': expected NAME[:TAG], NAME@sha256:<hex>, or an image digest (prefix)`,
    { ref: text },
  );
}
