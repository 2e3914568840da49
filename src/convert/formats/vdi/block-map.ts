import type { FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import { CorruptImageError } from '../../../errors.js';
import { readFully } from '../../output-file.js';
import { BLOCK_ENTRY_BYTES, type VdiHeader } from './layout.js';

/**
 * The block map is read in pages rather than whole: QEMU allows maps of up to 2 GiB, and a sparse file can
 * claim one for free, so holding it all would let a stranger's image set Ferry's memory use. A page of
 * 64 Ki entries is 256 KiB and covers 64 GiB of disk.
 */
export const PAGE_ENTRIES = 64 * 1024;

const BIG_ENDIAN_HOST = endianness() === 'BE';

export function pageCount(h: VdiHeader): number {
  return Math.ceil(h.blocksInImage / PAGE_ENTRIES);
}

/** Reads block map page `index` (the last one may be short). The header check guarantees it lies in the file. */
export async function readPage(handle: FileHandle, h: VdiHeader, index: number, file: string): Promise<Uint32Array> {
  const first = index * PAGE_ENTRIES;
  const count = Math.min(PAGE_ENTRIES, h.blocksInImage - first);
  const entries = new Uint32Array(count);
  const raw = Buffer.from(entries.buffer);
  const got = await readFully(handle, raw, 0, raw.length, h.offsetBmap + first * BLOCK_ENTRY_BYTES);
  if (got < raw.length) throw new CorruptImageError(`block map page ${index} is cut short by the end of the file`, { file, field: 'offset_bmap' });
  // Entries are little-endian on disk; the array reads them in host order.
  if (BIG_ENDIAN_HOST) raw.swap32();
  return entries;
}

/**
 * The first data block index that cannot be read: beyond blocks_allocated, or starting past the end of the
 * file. Entries below it (and the unallocated and discarded markers) are fine, so a page is checked with
 * one comparison per entry.
 */
export function firstUnreadableEntry(h: VdiHeader, fileSize: number): number {
  const inFile = Math.max(0, Math.ceil((fileSize - h.offsetData) / h.blockSize));
  return Math.min(h.blocksAllocated, inFile);
}

/** Why block map entry `entry` (for guest block `block`), at or above `firstUnreadableEntry`, cannot be read. */
export function unreadableReason(block: number, entry: number, h: VdiHeader): string {
  if (entry >= h.blocksAllocated) return `block map entry ${block} points to data block ${entry}, beyond blocks_allocated ${h.blocksAllocated}`;
  return `block map entry ${block}: data block ${entry} at ${dataOffset(h, entry)} lies past the end of the file`;
}

/** Where data block `entry` starts in the file. */
export function dataOffset(h: VdiHeader, entry: number): number {
  return h.offsetData + entry * h.blockSize;
}
