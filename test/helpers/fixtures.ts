import { join } from 'node:path';
import { qemuImg, qemuIo } from './env.js';

/**
 * A raw disk with the shapes conversions must get right: data at odd places, explicit zeroes, a partly
 * filled cluster, compressible and incompressible runs, holes, and data in the very last sector.
 */
export async function makePatternedRaw(dir: string, name = 'source.raw', size = '64M'): Promise<string> {
  const path = join(dir, name);
  await qemuImg('create', '-q', '-f', 'raw', path, size);
  await qemuIo(
    path,
    'raw',
    'write -P 0xab 0 1M',
    'write -P 0x11 1536k 4k', // a lone 4 KiB block inside an otherwise empty cluster range
    'write -z 3M 1M', // explicit zeroes
    'write -P 0xcd 5M 3M',
    'write -P 0x5a 10M 70k', // ends mid-cluster
    'write -P 0x77 20M 2M',
    'write -P 0x01 40M 512',
  );
  // The last sector of the disk, so size handling at the end is exercised.
  const bytes = await sizeOf(path);
  await qemuIo(path, 'raw', `write -P 0xee ${bytes - 512} 512`);
  await writeRandom(path, 24 * 1024 * 1024, 1024 * 1024);
  return path;
}

async function sizeOf(path: string): Promise<number> {
  const { stat } = await import('node:fs/promises');
  return (await stat(path)).size;
}

/** Incompressible data, so compression must fall back to plain clusters for it. */
async function writeRandom(path: string, offset: number, length: number): Promise<void> {
  const { open } = await import('node:fs/promises');
  const { randomBytes } = await import('node:crypto');
  const h = await open(path, 'r+');
  try {
    await h.write(randomBytes(length), 0, length, offset);
  } finally {
    await h.close();
  }
}
