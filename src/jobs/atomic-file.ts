import { randomBytes } from 'node:crypto';
import { open, rename, unlink } from 'node:fs/promises';

/**
 * Replaces `path` with `data` so that a crash at any moment leaves either the old or the new content:
 * written under a temporary name and renamed over. `durable` fsyncs before the rename, for records
 * that must survive a power cut and not only a killed process.
 */
export async function writeFileAtomic(path: string, data: string, opts: { durable: boolean; mode?: number }): Promise<void> {
  const temp = `${path}.${randomBytes(4).toString('hex')}.tmp`;
  const handle = await open(temp, 'wx', opts.mode ?? 0o644);
  try {
    await handle.writeFile(data);
    if (opts.durable) await handle.sync();
  } catch (err) {
    await handle.close();
    await unlink(temp).catch(() => undefined);
    throw err;
  }
  await handle.close();
  await rename(temp, path);
}
