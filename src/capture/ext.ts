/**
 * Free space of an ext2/3/4 filesystem, read from its block bitmaps as partclone does, so a capture skips
 * blocks no file uses. The source is hostile input: any field out of range makes the filesystem
 * "unknown" (copied whole), never a crash or a wrong skip.
 */
import { type ByteRange, type ReadAt, inParallel } from './ranges.js';

export interface ExtUsage {
  type: 'ext2' | 'ext3' | 'ext4';
  /** Bytes the filesystem spans (it may be smaller than its partition). */
  size: number;
  usedBytes: number;
  /** Free blocks as absolute byte ranges, ascending. */
  free: ByteRange[];
  /**
   * The journal holds changes not yet written to their home blocks (a mounted filesystem): the bitmaps may
   * miss recent allocations. A frozen filesystem has its journal flushed and this flag cleared.
   */
  needsRecovery: boolean;
}

const MAGIC = 0xef53;
const INCOMPAT_RECOVER = 0x4;
const INCOMPAT_META_BG = 0x10;
const INCOMPAT_EXTENTS = 0x40;
const INCOMPAT_64BIT = 0x80;
const INCOMPAT_FLEX_BG = 0x200;
const COMPAT_HAS_JOURNAL = 0x4;
const COMPAT_SPARSE_SUPER2 = 0x200;
const RO_COMPAT_SPARSE_SUPER = 0x1;
const RO_COMPAT_GDT_CSUM = 0x10;
const RO_COMPAT_METADATA_CSUM = 0x400;
const BG_BLOCK_UNINIT = 0x2;
/** Metadata reads are batched up to this size (one agent request each). */
const READ_BATCH = 1024 * 1024;
const MAX_GROUPS = 1 << 22;

interface Group {
  start: number;
  blocks: number;
  blockBitmap: number;
  inodeBitmap: number;
  inodeTable: number;
  uninit: boolean;
}

export async function extUsage(read: ReadAt, start: number, length: number, parallelism: number): Promise<ExtUsage | undefined> {
  if (length < 2048) return undefined;
  const sb = await read(start + 1024, 1024);
  if (sb.readUInt16LE(0x38) !== MAGIC) return undefined;
  const logBlock = sb.readUInt32LE(0x18);
  if (logBlock > 6) return undefined;
  const blockSize = 1024 << logBlock;
  const compat = sb.readUInt32LE(0x5c);
  const incompat = sb.readUInt32LE(0x60);
  const roCompat = sb.readUInt32LE(0x64);
  const is64 = (incompat & INCOMPAT_64BIT) !== 0;
  const blocksCount = sb.readUInt32LE(0x04) + (is64 ? sb.readUInt32LE(0x150) * 2 ** 32 : 0);
  const firstDataBlock = sb.readUInt32LE(0x14);
  const blocksPerGroup = sb.readUInt32LE(0x20);
  const inodesPerGroup = sb.readUInt32LE(0x28);
  const inodeSize = sb.readUInt32LE(0x4c) >= 1 ? sb.readUInt16LE(0x58) : 128;
  const descSize = is64 ? sb.readUInt16LE(0xfe) : 32;
  const reservedGdt = sb.readUInt16LE(0xce);
  const firstMetaBg = sb.readUInt32LE(0x104);
  const backupGroups = [sb.readUInt32LE(0x24c), sb.readUInt32LE(0x250)];
  if (
    blocksPerGroup < 8 ||
    blocksPerGroup > 8 * blockSize ||
    blocksPerGroup % 8 !== 0 ||
    descSize < 32 ||
    descSize > blockSize ||
    (descSize & (descSize - 1)) !== 0 ||
    blocksCount <= firstDataBlock ||
    blocksCount * blockSize > length ||
    inodeSize < 128 ||
    inodeSize > blockSize
  ) {
    return undefined;
  }
  const groupCount = Math.ceil((blocksCount - firstDataBlock) / blocksPerGroup);
  if (groupCount > MAX_GROUPS) return undefined;
  const descPerBlock = blockSize / descSize;
  const metaBg = (incompat & INCOMPAT_META_BG) !== 0;
  const uninitValid = (roCompat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM)) !== 0;
  const at = (block: number) => start + block * blockSize;

  const hasSuper = (g: number): boolean => {
    if (g === 0) return true;
    if (compat & COMPAT_SPARSE_SUPER2) return g === backupGroups[0] || g === backupGroups[1];
    if (!(roCompat & RO_COMPAT_SPARSE_SUPER)) return true;
    if (g === 1) return true;
    for (const base of [3, 5, 7]) {
      let p = base;
      while (p < g) p *= base;
      if (p === g) return true;
    }
    return false;
  };
  const groupStart = (g: number) => firstDataBlock + g * blocksPerGroup;

  // Group descriptors: one table after the superblock, or with meta_bg one block at the start of each meta group.
  const descriptors = Buffer.alloc(groupCount * descSize);
  const gdtBlocks = Math.ceil(groupCount / descPerBlock);
  const descReads: Array<{ block: number; count: number; into: number }> = [];
  for (let m = 0; m < gdtBlocks; ) {
    if (metaBg && m >= firstMetaBg) {
      const g = m * descPerBlock;
      descReads.push({ block: groupStart(g) + (hasSuper(g) ? 1 : 0), count: 1, into: m * blockSize });
      m++;
    } else {
      const last = metaBg ? Math.min(gdtBlocks, firstMetaBg) : gdtBlocks;
      const count = Math.min(last - m, READ_BATCH / blockSize);
      descReads.push({ block: firstDataBlock + 1 + m, count, into: m * blockSize });
      m += count;
    }
  }
  if (descReads.some((r) => r.block + r.count > blocksCount)) return undefined;
  await inParallel(descReads, parallelism, async (r) => {
    const data = await read(at(r.block), r.count * blockSize);
    data.copy(descriptors, r.into, 0, Math.min(data.length, descriptors.length - r.into));
  });

  const groups: Group[] = [];
  const itableBlocks = Math.ceil((inodesPerGroup * inodeSize) / blockSize);
  for (let g = 0; g < groupCount; g++) {
    const d = descriptors.subarray(g * descSize, (g + 1) * descSize);
    const hi = (off: number) => (descSize >= 64 ? d.readUInt32LE(off) * 2 ** 32 : 0);
    const group: Group = {
      start: groupStart(g),
      blocks: Math.min(blocksPerGroup, blocksCount - groupStart(g)),
      blockBitmap: d.readUInt32LE(0x00) + hi(0x20),
      inodeBitmap: d.readUInt32LE(0x04) + hi(0x24),
      inodeTable: d.readUInt32LE(0x08) + hi(0x28),
      uninit: uninitValid && (d.readUInt16LE(0x12) & BG_BLOCK_UNINIT) !== 0,
    };
    if (group.blockBitmap >= blocksCount || group.inodeBitmap >= blocksCount || group.inodeTable + itableBlocks > blocksCount) return undefined;
    if (group.blockBitmap === 0 && !group.uninit) return undefined;
    groups.push(group);
  }

  // Bitmap blocks: flex_bg packs them together, so neighbours are read in one request.
  const bitmaps = new Map<number, Buffer>();
  const wanted = groups
    .map((gr, g) => ({ g, block: gr.blockBitmap }))
    .filter(({ g }) => !groups[g].uninit)
    .sort((a, b) => a.block - b.block);
  const batches: Array<Array<{ g: number; block: number }>> = [];
  for (const w of wanted) {
    const batch = batches[batches.length - 1];
    const prev = batch?.[batch.length - 1];
    if (prev && w.block === prev.block + 1 && (batch.length + 1) * blockSize <= READ_BATCH) batch.push(w);
    else batches.push([w]);
  }
  await inParallel(batches, parallelism, async (batch) => {
    const data = await read(at(batch[0].block), batch.length * blockSize);
    batch.forEach((w, i) => bitmaps.set(w.g, data.subarray(i * blockSize, (i + 1) * blockSize)));
  });

  const gdtReserved = metaBg ? 0 : gdtBlocks + reservedGdt;
  const free: ByteRange[] = [];
  let freeBlocks = 0;
  const addFree = (fromBlock: number, toBlock: number) => {
    freeBlocks += toBlock - fromBlock;
    const last = free[free.length - 1];
    if (last && last[1] === at(fromBlock)) last[1] = at(toBlock);
    else free.push([at(fromBlock), at(toBlock)]);
  };
  for (let g = 0; g < groups.length; g++) {
    const gr = groups[g];
    let bitmap = bitmaps.get(g);
    if (!bitmap) {
      // BLOCK_UNINIT: the kernel computes this bitmap, so do the same: superblock backup and descriptor
      // blocks, plus any group's bitmaps and inode table that flex_bg placed here. With meta_bg the
      // descriptor placement is irregular: keep the whole group.
      if (metaBg) continue;
      bitmap = Buffer.alloc(blockSize);
      const mark = (from: number, count: number) => {
        for (let b = Math.max(from, gr.start); b < Math.min(from + count, gr.start + gr.blocks); b++) {
          const i = b - gr.start;
          bitmap![i >> 3] |= 1 << (i & 7);
        }
      };
      if (hasSuper(g)) mark(gr.start, 1 + gdtReserved);
      for (const other of groups) {
        mark(other.blockBitmap, 1);
        mark(other.inodeBitmap, 1);
        mark(other.inodeTable, itableBlocks);
      }
    }
    let runStart = -1;
    for (let i = 0; i < gr.blocks; i++) {
      const byte = bitmap[i >> 3];
      if (byte === 0 && (i & 7) === 0 && i + 8 <= gr.blocks) {
        if (runStart < 0) runStart = i;
        i += 7;
        continue;
      }
      const used = (byte >> (i & 7)) & 1;
      if (!used && runStart < 0) runStart = i;
      else if (used && runStart >= 0) {
        addFree(gr.start + runStart, gr.start + i);
        runStart = -1;
      }
    }
    if (runStart >= 0) addFree(gr.start + runStart, gr.start + gr.blocks);
  }

  const type = incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) ? 'ext4' : compat & COMPAT_HAS_JOURNAL ? 'ext3' : 'ext2';
  return {
    type,
    size: blocksCount * blockSize,
    usedBytes: (blocksCount - freeBlocks) * blockSize,
    free,
    needsRecovery: (incompat & INCOMPAT_RECOVER) !== 0,
  };
}
