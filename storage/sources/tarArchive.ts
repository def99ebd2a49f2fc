/**
 * A table of contents of an uncompressed tar archive: for each regular
 * member, where its bytes start in the file and how many there are. Links
 * inside the archive (docker-save writes `<id>/layer.tar` as a symlink) are
 * resolved to the member they name, never to anything outside the archive.
 */
import { createReadStream } from 'node:fs';
import { finished, pipeline } from 'node:stream/promises';
import { type Readable } from 'node:stream';
import tarStream from 'tar-stream';
import { ErrorCodes, LayerdError } from '../../common/errors.js';
import { normalizeTarPath, parentOf } from '../tarPaths.js';

export interface ArchiveMember {
  offset: number;
  size: number;
}

const MAX_MEMBERS = 1_000_000;
const MAX_LINK_HOPS = 16;

export async function indexTarArchive(archive: string): Promise<Map<string, ArchiveMember>> {
  const files = new Map<string, ArchiveMember>();
  const links = new Map<string, { target: string; symbolic: boolean }>();
  const extract = tarStream.extract();
  let count = 0;
  extract.on('entry', (header, stream: Readable, next) => {
    stream.resume();
    finished(stream).then(() => {
      if (++count > MAX_MEMBERS) throw new LayerdError(ErrorCodes.ELIMIT, `${archive}: more than ${MAX_MEMBERS} members`);
      const name = normalizeTarPath(header.name, 'archive member');
      if (files.has(name) || links.has(name)) {
        throw new LayerdError(ErrorCodes.EBADTAR, `${archive}: duplicate member ${name}`, { path: name });
      }
      if (header.type === 'file' || header.type === 'contiguous-file') {
        files.set(name, { offset: header.byteOffset ?? 0, size: header.size ?? 0 });
      } else if (header.type === 'symlink' && header.linkname) {
        links.set(name, { target: header.linkname, symbolic: true });
      } else if (header.type === 'link' && header.linkname) {
        links.set(name, { target: header.linkname, symbolic: false });
      }
    }).then(() => next(), (err: unknown) => next(err));
  });
  try {
    await pipeline(createReadStream(archive, { highWaterMark: 1024 * 1024 }), extract);
  } catch (err) {
    if (err instanceof LayerdError) throw err;
    throw new LayerdError(ErrorCodes.EBADTAR, `${archive}: not a readable tar archive (${(err as Error).message})`, { path: archive }, { cause: err });
  }
  for (const [name] of links) {
    const resolved = resolveLink(name, links, files);
    if (resolved) files.set(name, resolved);
  }
  return files;
}

function resolveLink(
  name: string,
  links: Map<string, { target: string; symbolic: boolean }>,
  files: Map<string, ArchiveMember>,
): ArchiveMember | undefined {
  let current = name;
  for (let hop = 0; hop < MAX_LINK_HOPS; hop++) {
    const link = links.get(current);
    if (!link) return files.get(current);
    // A symlink is relative to its directory; a hard link names an archive path.
    const raw = link.symbolic && !link.target.startsWith('/') ? `${parentOf(current)}/${link.target}` : link.target;
    try {
      current = normalizeTarPath(collapseDotDot(raw), 'archive link');
    } catch {
      return undefined; // a link leaving the archive resolves to nothing
    }
  }
  return undefined;
}

/** Resolve `a/../b` lexically; refuses to climb above the archive root. */
function collapseDotDot(path: string): string {
  const out: string[] = [];
  for (const part of path.split('/')) {
    if (part === '..') {
      if (out.length === 0) throw new Error('escapes');
      out.pop();
    } else if (part !== '' && part !== '.') {
      out.push(part);
    }
  }
  return out.join('/');
}
