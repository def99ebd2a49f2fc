/**
 * The writable upper directory: a real directory tree that, together with the
 * `.wh.` whiteouts and `.wh..wh..opq` markers written into it, is an OCI
 * changeset of the lower layers. This module only touches the disk; which
 * paths to touch is decided by the union core.
 */
import { execFile } from 'node:child_process';
import { copyFile, chmod, lchown, lutimes, mkdir, rm, symlink, unlink, writeFile } from 'node:fs/promises';
import { createReadStream, createWriteStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import type { ContentRef, EntryKind, LayerEntry } from '../storage/layerIndex.js';
import { xattrBytes } from '../storage/layerIndex.js';
import { FsError } from './fsError.js';
import { OPAQUE_MARKER, WHITEOUT_PREFIX, baseName, parentOf } from './paths.js';
import { writeXattr } from './xattrTool.js';

export type NodeKind = 'fifo' | 'char' | 'block';

export class UpperDir {
  constructor(readonly root: string) {}

  pathOf(path: string): string {
    return path === '' ? this.root : `${this.root}/${path}`;
  }

  whiteoutPathOf(path: string): string {
    const parent = parentOf(path);
    return `${this.pathOf(parent)}/${WHITEOUT_PREFIX}${baseName(path)}`;
  }

  async writeWhiteout(path: string): Promise<void> {
    await writeFile(this.whiteoutPathOf(path), '', { mode: 0o600 });
  }

  async writeOpaqueMarker(dirPath: string): Promise<void> {
    await writeFile(`${this.pathOf(dirPath)}/${OPAQUE_MARKER}`, '', { mode: 0o600 });
  }

  /** Remove a whiteout in either on-disk style. */
  async removeWhiteout(path: string, style: 'oci' | 'overlay'): Promise<void> {
    await unlink(style === 'oci' ? this.whiteoutPathOf(path) : this.pathOf(path));
  }

  /** Remove a directory the union shows as empty (so it holds only markers). */
  async removeDir(path: string): Promise<void> {
    await rm(this.pathOf(path), { recursive: true, force: false });
  }

  /** Special files: Node has no mknod(2), coreutils' mknod does it. */
  async mknod(path: string, kind: NodeKind, mode: number, major = 0, minor = 0): Promise<void> {
    const type = kind === 'fifo' ? ['p'] : [kind === 'char' ? 'c' : 'b', String(major), String(minor)];
    const args = ['-m', (mode & 0o7777).toString(8), '--', this.pathOf(path), ...type];
    await new Promise<void>((resolve, reject) => {
      execFile('mknod', args, (err, _stdout, stderr) => {
        if (!err) return resolve();
        reject(new FsError(/exists/.test(stderr) ? 'EEXIST' : /not permitted/.test(stderr) ? 'EPERM' : 'EIO', path, 'mknod'));
      });
    });
  }

  /**
   * Copy a lower object into the upper at `path` with all its attributes:
   * owner first (chown clears setuid and capabilities), then xattrs, then
   * mode, then times (last, since every other change touches ctime/mtime).
   */
  async copyUpObject(path: string, kind: EntryKind, entry: LayerEntry, content: ContentRef | undefined): Promise<void> {
    const dest = this.pathOf(path);
    switch (kind) {
      case 'dir': await mkdir(dest, { mode: 0o700 }); break;
      case 'file':
        if (content === undefined) await writeFile(dest, '', { mode: 0o600 });
        else if (content.offset === 0) await copyFile(content.path, dest);
        else await pipeline(createReadStream(content.path, { start: content.offset, end: content.offset + content.size - 1 }), createWriteStream(dest, { mode: 0o600 }));
        break;
      case 'symlink': await symlink(entry.target ?? '', dest); break;
      default: await this.mknod(path, kind, 0o600, entry.devMajor ?? 0, entry.devMinor ?? 0);
    }
    await lchown(dest, entry.uid, entry.gid);
    for (const name of Object.keys(entry.xattrs ?? {})) await writeXattr(dest, name, xattrBytes(entry, name)!);
    if (kind !== 'symlink') await chmod(dest, entry.mode & 0o7777);
    const seconds = entry.mtime;
    await lutimes(dest, seconds, seconds);
  }
}
