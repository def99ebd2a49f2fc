/** Small layer tars for tests: a `data/` directory holding the given files, fixed mtimes. */
import tarStream from 'tar-stream';

const MTIME = new Date(1_700_000_000_000);

export async function dataDirTar(files: { path: string; bytes: Buffer }[]): Promise<Buffer> {
  const pack = tarStream.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c: Buffer) => chunks.push(c));
  const done = new Promise<void>((resolve, reject) => { pack.on('end', resolve); pack.on('error', reject); });
  pack.entry({ name: 'data/', type: 'directory', mode: 0o755, mtime: MTIME });
  for (const f of files) pack.entry({ name: f.path, type: 'file', mode: 0o644, mtime: MTIME }, f.bytes);
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}
