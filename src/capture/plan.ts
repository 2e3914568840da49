import { MAX_CHUNK } from '../transfer/protocol.js';
import { extUsage } from './ext.js';
import { ntfsUsage } from './ntfs.js';
import { readPartitionTable, type PartitionTable } from './partitions.js';
import type { ByteRange } from './ranges.js';
import type { BlockSource } from './source.js';
import { xfsUsage } from './xfs.js';

/** A filesystem found on the source whose free space is skipped. */
export interface FilesystemArea {
  start: number;
  size: number;
  type: string;
  usedBytes: number;
  /** False when its bitmaps could not be trusted for this pass (see ExtUsage.needsRecovery): copied whole. */
  skippedFree: boolean;
}

/** Which chunks of the source a pass covers. */
export interface CapturePlan {
  chunkSize: number;
  /** 1 for each chunk to capture. */
  chunks: Uint8Array;
  /** Bytes in the chunks to capture. */
  bytes: number;
  table: PartitionTable;
  filesystems: FilesystemArea[];
}

export interface PlanOptions {
  /** Skip free blocks of filesystems Ferry understands (default). Off: every allocated chunk. */
  usedBlocksOnly: boolean;
  /**
   * The plan must be exact (a final pass): a filesystem whose journal still holds unwritten allocations
   * is copied whole instead of trusting its bitmaps. Earlier passes may be approximate, since later
   * passes correct them.
   */
  exact: boolean;
}

/**
 * Decides what to capture: the ranges the source stores data in (a sparse file's holes are skipped), minus
 * the free blocks of every filesystem found on the disk or its partitions. Everything else (partition
 * tables, boot loaders in the gaps, filesystems Ferry does not parse) is copied, zero chunks elided.
 */
export async function planCapture(source: BlockSource, chunkSize: number, opts: PlanOptions): Promise<CapturePlan> {
  const count = Math.ceil(source.size / chunkSize);
  const chunks = new Uint8Array(count);
  for (const [start, end] of await source.allocated(0, source.size)) {
    chunks.fill(1, Math.floor(start / chunkSize), Math.ceil(end / chunkSize));
  }
  const read = (offset: number, length: number) => readInPieces(source, offset, length);
  const table = await readPartitionTable(read, source.size, source.sectorSize);
  const filesystems: FilesystemArea[] = [];
  if (opts.usedBlocksOnly) {
    const areas = table.partitions.length ? table.partitions.map((p) => ({ start: p.start, length: p.length })) : [{ start: 0, length: source.size }];
    for (const area of areas) {
      const usage = (await extUsage(read, area.start, area.length, source.parallelism)) ?? (await xfsUsage(read, area.start, area.length, source.parallelism)) ?? (await ntfsUsage(read, area.start, area.length, source.parallelism));
      if (!usage) continue;
      const trusted = !(opts.exact && usage.needsRecovery);
      filesystems.push({ start: area.start, size: usage.size, type: usage.type, usedBytes: usage.usedBytes, skippedFree: trusted });
      if (trusted) for (const range of usage.free) dropWholeChunks(chunks, range, chunkSize, source.size);
    }
  }
  let bytes = 0;
  for (let i = 0; i < count; i++) if (chunks[i]) bytes += Math.min(chunkSize, source.size - i * chunkSize);
  return { chunkSize, chunks, bytes, table, filesystems };
}

/** Unmarks the chunks that lie entirely inside a free range. */
function dropWholeChunks(chunks: Uint8Array, [start, end]: ByteRange, chunkSize: number, size: number): void {
  const first = Math.ceil(start / chunkSize);
  for (let i = first; i < chunks.length; i++) {
    const chunkEnd = Math.min((i + 1) * chunkSize, size);
    if (chunkEnd > end) break;
    chunks[i] = 0;
  }
}

async function readInPieces(source: BlockSource, offset: number, length: number): Promise<Buffer> {
  if (offset + length > source.size) throw new RangeError(`metadata read ${offset}+${length} past the end of the source`);
  if (length <= MAX_CHUNK) return source.readBytes(offset, length);
  const parts: Buffer[] = [];
  for (let at = 0; at < length; at += MAX_CHUNK) parts.push(await source.readBytes(offset + at, Math.min(MAX_CHUNK, length - at)));
  return Buffer.concat(parts);
}
