/**
 * A store layer laid out as a kernel-overlayfs lower directory, for running
 * overlayfs and fuse-overlayfs on the very same layers as layerd: GNU tar
 * extracts the layer's tar, then OCI whiteouts become 0/0 character devices
 * and opaque markers the trusted.overlay.opaque xattr. For trusted layers
 * only (the corpus): GNU tar is not layerd's hardened unpacker.
 */
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { execFileAsync } from './env.js';

/** Lay a store layer out as an overlayfs lower directory (GNU tar + whiteout conversion). */
export async function overlayLower(tarPath: string, dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  try {
    await execFileAsync('tar', ['--xattrs', '--xattrs-include=*', '--numeric-owner', '-p', '-xf', tarPath, '-C', dir], { maxBuffer: 64 * 1024 * 1024 });
  } catch (err) {
    // Whiteouts under a path the same layer made a file or symlink (umoci
    // writes those; see the corpus README) are refused by tar, as they must
    // be; a timestamp in the future only draws a warning.
    const benign = /(\.wh\.[^:]*: Cannot open: Not a directory|time stamp .* in the future|Exiting with failure status due to previous errors)$/;
    const lines = String((err as { stderr?: string }).stderr ?? '').split('\n').filter((l) => l !== '');
    if (lines.length === 0 || !lines.every((l) => benign.test(l))) throw err;
  }
  const { stdout } = await execFileAsync('find', [dir, '-name', '.wh.*'], { maxBuffer: 64 * 1024 * 1024 });
  for (const marker of stdout.split('\n').filter((l) => l !== '')) {
    const parent = marker.slice(0, marker.lastIndexOf('/'));
    const name = marker.slice(marker.lastIndexOf('/') + 1);
    await rm(marker);
    if (name === '.wh..wh..opq') await execFileAsync('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', parent]);
    else await execFileAsync('mknod', [join(parent, name.slice(4)), 'c', '0', '0']);
  }
}

