import { constants } from 'node:fs';
import { access, open as openFile, realpath, stat } from 'node:fs/promises';
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { CorruptImageError, UnsafeReferenceError, UnsupportedFeatureError } from '../errors.js';
import { DiskChain } from './disk-chain.js';
import type { ImageLayer } from './disk.js';
import type { FormatDriver, OpenContext } from './format.js';
import { readFully } from './output-file.js';
import { findDriver, probeDriver } from './registry.js';

export interface OpenOptions {
  /** Format of the top image; probed when absent. */
  format?: string;
  /** Allow backing files, data files and extents outside the referring image's folder. */
  allowExternal?: boolean;
  /** Open only the top image, not its backing chain (qemu-img info without --backing-chain still names it). */
  noBacking?: boolean;
}

/** Chains deeper than this are refused: QEMU's own limit is similar, and it bounds hostile recursion. */
export const MAX_CHAIN_DEPTH = 64;

/**
 * Refuses what is neither a regular file nor a block device before anything opens it: opening a FIFO
 * would block for ever, and a directory or socket is never an image.
 */
export async function assertImageFile(path: string): Promise<void> {
  const st = await stat(path);
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new UnsupportedFeatureError('not a regular file or block device', { file: path, field: 'file type' });
  }
}

/** Detects a file's format from its first bytes. */
export async function probeFormat(path: string): Promise<FormatDriver> {
  await assertImageFile(path);
  const handle = await openFile(path, 'r');
  try {
    const { size } = await handle.stat();
    const head = Buffer.alloc(Math.min(size, 64 * 1024));
    await readFully(handle, head, 0, head.length, 0);
    const tail = Buffer.alloc(Math.min(size, 512));
    await readFully(handle, tail, 0, tail.length, size - tail.length);
    return probeDriver(head, size, tail);
  } finally {
    await handle.close();
  }
}

/** The confinement rule for names found inside images (OSSA-2015-014, OSSA-2023-002). */
export function referenceResolver(allowExternal: boolean): OpenContext {
  return {
    async resolve(fromImage: string, name: string, what: string): Promise<string> {
      const folder = dirname(await realpath(fromImage));
      const candidate = isAbsolute(name) ? name : resolve(folder, name);
      let target: string;
      try {
        await access(candidate, constants.R_OK);
        target = await realpath(candidate);
      } catch {
        throw new CorruptImageError(`${what} '${name}' not found (looked for ${candidate})`, { file: fromImage, field: what });
      }
      if (!allowExternal && !isInside(folder, target)) {
        throw new UnsafeReferenceError(`${what} '${name}' resolves to ${target}, outside the image's folder ${folder}; pass --allow-external to permit it`, {
          file: fromImage,
          field: what,
        });
      }
      return target;
    },
  };
}

function isInside(folder: string, target: string): boolean {
  const rel = relative(folder, target);
  return rel !== '' && !rel.startsWith('..' + sep) && rel !== '..' && !isAbsolute(rel);
}

/** Opens an image and its whole backing chain, checking every reference and refusing loops. */
export async function openDisk(path: string, opts: OpenOptions = {}): Promise<DiskChain> {
  const ctx = referenceResolver(opts.allowExternal ?? false);
  const layers: ImageLayer[] = [];
  const seen = new Set<string>();
  try {
    let currentPath = path;
    let format = opts.format;
    for (;;) {
      const real = await realpath(currentPath).catch(() => currentPath);
      if (seen.has(real)) throw new UnsafeReferenceError(`backing chain loops back to ${currentPath}`, { file: layers[layers.length - 1]?.path ?? path, field: 'backing_file' });
      seen.add(real);
      if (layers.length >= MAX_CHAIN_DEPTH) throw new UnsafeReferenceError(`backing chain deeper than ${MAX_CHAIN_DEPTH}`, { file: path, field: 'backing_file' });
      await assertImageFile(currentPath);
      const driver = format ? findDriver(format) : await probeFormat(currentPath);
      const layer = await driver.open(currentPath, ctx);
      layers.push(layer);
      if (!layer.backing || opts.noBacking) break;
      currentPath = await ctx.resolve(layer.path, layer.backing.name, 'backing file');
      format = layer.backing.format;
    }
    return new DiskChain(layers);
  } catch (err) {
    await Promise.all(layers.map((l) => l.close().catch(() => undefined)));
    throw err;
  }
}
