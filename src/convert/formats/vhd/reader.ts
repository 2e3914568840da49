import { open, type FileHandle } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { CorruptImageError, UnsupportedFeatureError } from '../../../errors.js';
import { fileRuns } from '../../sparse-file.js';
import type { Extent, FileReference, FormatDetails, ImageLayer } from '../../disk.js';
import { readFully } from '../../output-file.js';
import { BlockTable } from './block-table.js';
import {
  DiskType,
  FOOTER_SIZE,
  HEADER_SIZE,
  MAX_TABLE_ENTRIES,
  SECTOR,
  UNALLOCATED,
  bitmapBytes,
  decodeUtf16,
  hasFooterCookie,
  parseDynamicHeader,
  parseFooter,
  virtualSizeOf,
  type DynamicHeader,
  type Footer,
  type ParentLocator,
} from './layout.js';

/** Sector bitmaps of differencing disks kept in memory. */
const BITMAP_CACHE_BYTES = 8 * 1024 * 1024;
/** A parent path longer than Windows' 32767 UTF-16 units is not a path. */
const MAX_LOCATOR_BYTES = 65536;
/**
 * Locators by preference, the first that names a path wins: relative ones first, so an image moved with
 * its parent still opens; then absolute ones; the deprecated ANSI codes after their Unicode successors.
 */
const LOCATOR_PREFERENCE = ['W2ru', 'Wi2r', 'W2ku', 'Wi2k', 'MacX'];

/** The allocation layout of a dynamic or differencing disk. */
interface Sparse {
  table: BlockTable;
  blockSize: number;
  bitmapSize: number;
}

/** Merges adjacent extents of the same kind whose host ranges continue each other. */
class ExtentRun {
  private pending?: Extent;

  /** Adds `next`; returns the extent it completes, if any. */
  add(next: Extent): Extent | undefined {
    const p = this.pending;
    if (p && p.kind === next.kind && p.offset + p.length === next.offset) {
      const contiguous = p.hostOffset === undefined ? next.hostOffset === undefined : next.hostOffset === p.hostOffset + p.length;
      if (contiguous) {
        p.length += next.length;
        return undefined;
      }
    }
    this.pending = { ...next };
    return p;
  }

  finish(): Extent | undefined {
    return this.pending;
  }
}

/**
 * One VHD file. Fixed disks are the guest bytes followed by the footer; dynamic and differencing disks map
 * guest blocks through the BAT. For dynamic disks every sector of an allocated block is data, as QEMU
 * reads them; for differencing disks the block's sector bitmap decides between this file and the parent.
 */
export class VhdLayer implements ImageLayer {
  readonly format = 'vpc';
  private readonly bitmaps = new Map<number, Promise<Buffer>>();

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    private readonly fileSize: number,
    readonly virtualSize: number,
    private readonly sparse: Sparse | undefined,
    readonly backing: FileReference | undefined,
  ) {}

  /** Opens `path` the way QEMU's vpc driver does, refusing what it refuses before allocating anything large. */
  static async open(path: string): Promise<VhdLayer> {
    const handle = await open(path, 'r');
    try {
      const { size: fileSize } = await handle.stat();
      const footer = await readFooter(handle, fileSize, path);
      const virtualSize = virtualSizeOf(footer, path);
      if (footer.diskType === DiskType.Fixed) return new VhdLayer(path, handle, fileSize, virtualSize, undefined, undefined);
      const header = await readDynamicHeader(handle, fileSize, footer, path);
      const blockSize = header.blockSize;
      const bitmapSize = bitmapBytes(blockSize);
      const differencing = footer.diskType === DiskType.Differencing;
      if (differencing && bitmapSize === 0) {
        throw new UnsupportedFeatureError(`differencing disk with ${blockSize}-byte blocks: blocks under 4 KiB leave no room for a sector bitmap`, {
          file: path,
          field: 'block_size',
        });
      }
      const table = await BlockTable.load(handle, Number(header.tableOffset), header.maxTableEntries, Math.ceil(virtualSize / blockSize), (index, entry) => {
        const end = entry * SECTOR + bitmapSize + blockSize;
        if (end > fileSize) {
          throw new CorruptImageError(`BAT entry ${index}: block at sector ${entry} ends at ${end}, past the end of the file (${fileSize} bytes); the image is truncated`, {
            file: path,
            field: 'bat_entry',
          });
        }
      });
      const backing = differencing ? { name: await parentName(handle, fileSize, header, path), format: 'vhd' } : undefined;
      return new VhdLayer(path, handle, fileSize, virtualSize, { table, blockSize, bitmapSize }, backing);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  get dataFd(): number {
    return this.handle.fd;
  }

  details(): FormatDetails {
    // qemu-img reports the block size as the cluster size of dynamic and differencing disks, and nothing else.
    return this.sparse ? { clusterSize: this.sparse.blockSize } : {};
  }

  blockStatus(offset: number, length: number): AsyncIterable<Extent> {
    return this.sparse ? this.sparseStatus(this.sparse, offset, length) : this.fixedStatus(offset, length);
  }

  /** Fixed disks: data where the file has blocks, zeroes in its holes and past its end. */
  private async *fixedStatus(offset: number, length: number): AsyncIterable<Extent> {
    const end = offset + length;
    const inFile = Math.min(end, this.fileSize);
    let pos = offset;
    for (const run of fileRuns(this.handle.fd, offset, inFile)) {
      yield { offset: run.start, length: run.end - run.start, kind: run.data ? 'data' : 'zero', depth: 0, hostOffset: run.start };
      pos = run.end;
    }
    // A geometry larger than the file: QEMU reads zeroes past the end.
    if (pos < end) yield { offset: pos, length: end - pos, kind: 'zero', depth: 0 };
  }

  private async *sparseStatus(s: Sparse, offset: number, length: number): AsyncIterable<Extent> {
    const end = offset + length;
    const run = new ExtentRun();
    let pos = offset;
    while (pos < end) {
      const pageIndex = s.table.pageOf(Math.floor(pos / s.blockSize));
      const entries = await s.table.page(pageIndex);
      // All blocks this BAT page covers are handled without another await, except for bitmaps.
      const pageEnd = Math.min(end, s.table.firstBlockOf(pageIndex + 1) * s.blockSize);
      while (pos < pageEnd) {
        const block = Math.floor(pos / s.blockSize);
        const entry = entries[block - s.table.firstBlockOf(pageIndex)];
        const blockStart = block * s.blockSize;
        const stop = Math.min(pageEnd, blockStart + s.blockSize);
        if (entry === UNALLOCATED) {
          // A dynamic disk's unallocated blocks are zeroes of its own (qemu-img map: present, zero); a
          // differencing disk's fall through to the parent.
          const done = run.add({ offset: pos, length: stop - pos, kind: this.backing ? 'unallocated' : 'zero', depth: 0 });
          if (done) yield done;
        } else if (!this.backing) {
          const done = run.add({ offset: pos, length: stop - pos, kind: 'data', depth: 0, hostOffset: this.dataHost(s, entry, pos - blockStart) });
          if (done) yield done;
        } else {
          const bitmap = await this.bitmap(s, block, entry);
          for (const [from, to, present] of sectorRuns(bitmap, pos - blockStart, stop - blockStart)) {
            const ext: Extent = { offset: blockStart + from, length: to - from, kind: present ? 'data' : 'unallocated', depth: 0 };
            if (present) ext.hostOffset = this.dataHost(s, entry, from);
            const done = run.add(ext);
            if (done) yield done;
          }
        }
        pos = stop;
      }
    }
    const last = run.finish();
    if (last) yield last;
  }

  async readAllocated(offset: number, length: number, into: Buffer, intoOffset: number): Promise<void> {
    if (!this.sparse) return this.readHost(offset, length, into, intoOffset);
    const s = this.sparse;
    const end = offset + length;
    const reads: Array<Promise<void>> = [];
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / s.blockSize);
      const entry = await s.table.entry(block);
      const blockStart = block * s.blockSize;
      const stop = Math.min(end, blockStart + s.blockSize);
      const at = intoOffset + (pos - offset);
      // Unallocated blocks of a dynamic disk are its zero extents (a differencing disk's go to the parent).
      if (entry === UNALLOCATED) into.fill(0, at, at + (stop - pos));
      else reads.push(this.readHost(this.dataHost(s, entry, pos - blockStart), stop - pos, into, at));
      pos = stop;
    }
    await Promise.all(reads);
  }

  private dataHost(s: Sparse, entry: number, withinBlock: number): number {
    return entry * SECTOR + s.bitmapSize + withinBlock;
  }

  private async readHost(host: number, length: number, into: Buffer, at: number): Promise<void> {
    const got = await readFully(this.handle, into, at, length, host);
    // Past the end of the file QEMU reads zeroes (fixed disks whose geometry exceeds the file).
    if (got < length) into.fill(0, at + got, at + length);
  }

  /** The sector bitmap of an allocated block of a differencing disk, cached. */
  private bitmap(s: Sparse, block: number, entry: number): Promise<Buffer> {
    const cached = this.bitmaps.get(block);
    if (cached) return cached;
    const loading = (async () => {
      const buf = Buffer.alloc(s.bitmapSize);
      await readFully(this.handle, buf, 0, buf.length, entry * SECTOR);
      return buf;
    })();
    loading.catch(() => this.bitmaps.delete(block));
    this.bitmaps.set(block, loading);
    const limit = Math.max(16, Math.floor(BITMAP_CACHE_BYTES / s.bitmapSize));
    if (this.bitmaps.size > limit) this.bitmaps.delete(this.bitmaps.keys().next().value as number);
    return loading;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/**
 * Finds the footer where QEMU does: a copy at offset 0 means a dynamic or differencing disk; otherwise the
 * footer at the end must describe a fixed disk (QEMU refuses anything else there, as it has no header).
 */
async function readFooter(handle: FileHandle, fileSize: number, file: string): Promise<Footer> {
  if (fileSize < FOOTER_SIZE) {
    throw new CorruptImageError(`file of ${fileSize} bytes is too small for a VHD footer (${FOOTER_SIZE} bytes)`, { file, field: 'footer' });
  }
  const buf = Buffer.alloc(FOOTER_SIZE);
  await readFully(handle, buf, 0, FOOTER_SIZE, 0);
  if (hasFooterCookie(buf)) {
    const footer = parseFooter(buf, file, 'copy at offset 0');
    if (footer.diskType === DiskType.Dynamic || footer.diskType === DiskType.Differencing) return footer;
    if (footer.diskType === DiskType.Fixed) {
      throw new CorruptImageError('footer copy at offset 0 describes a fixed disk, which has no dynamic disk header', { file, field: 'disk_type' });
    }
    throw new UnsupportedFeatureError(`disk type ${footer.diskType} is none of fixed (2), dynamic (3), differencing (4)`, { file, field: 'disk_type' });
  }
  await readFully(handle, buf, 0, FOOTER_SIZE, fileSize - FOOTER_SIZE);
  if (!hasFooterCookie(buf)) {
    throw new CorruptImageError("not a VHD image: no 'conectix' footer at offset 0 or in the last 512 bytes", { file, field: 'cookie' });
  }
  const footer = parseFooter(buf, file, 'at the end of the file');
  if (footer.diskType !== DiskType.Fixed) {
    throw new CorruptImageError(`footer at the end of the file has disk type ${footer.diskType}, but only a fixed disk (2) lacks a footer copy at offset 0`, {
      file,
      field: 'disk_type',
    });
  }
  return footer;
}

/** Reads and checks the dynamic disk header against the file and the virtual size, as QEMU does. */
async function readDynamicHeader(handle: FileHandle, fileSize: number, footer: Footer, file: string): Promise<DynamicHeader> {
  const corrupt = (msg: string, field: string) => new CorruptImageError(msg, { file, field });
  if (footer.dataOffset > BigInt(fileSize - HEADER_SIZE)) {
    throw corrupt(`data_offset ${footer.dataOffset}: a ${HEADER_SIZE}-byte dynamic disk header there ends past the end of the file (${fileSize} bytes)`, 'data_offset');
  }
  const buf = Buffer.alloc(HEADER_SIZE);
  await readFully(handle, buf, 0, HEADER_SIZE, Number(footer.dataOffset));
  const header = parseDynamicHeader(buf, file);
  const { blockSize, maxTableEntries } = header;
  if (blockSize < SECTOR || (blockSize & (blockSize - 1)) !== 0) throw corrupt(`block_size ${blockSize} is not a power of two of at least ${SECTOR}`, 'block_size');
  if (maxTableEntries > MAX_TABLE_ENTRIES) throw corrupt(`max_table_entries ${maxTableEntries} exceeds ${MAX_TABLE_ENTRIES}`, 'max_table_entries');
  const virtualSize = virtualSizeOf(footer, file);
  if (maxTableEntries * blockSize < virtualSize) {
    throw corrupt(`max_table_entries ${maxTableEntries} blocks of ${blockSize} bytes cover less than the virtual size ${virtualSize}`, 'max_table_entries');
  }
  if (header.tableOffset + BigInt(maxTableEntries * 4) > BigInt(fileSize)) {
    throw corrupt(`table_offset ${header.tableOffset}: the BAT of ${maxTableEntries} entries extends past the end of the file (${fileSize} bytes)`, 'table_offset');
  }
  return header;
}

/**
 * The parent named by a differencing disk's locators, as a path relative to the image's folder or absolute;
 * the chain resolves it under the confinement rule. Windows separators become '/'.
 */
async function parentName(handle: FileHandle, fileSize: number, header: DynamicHeader, file: string): Promise<string> {
  const byPreference = [...header.locators]
    .filter((l) => LOCATOR_PREFERENCE.includes(l.platform))
    .sort((a, b) => LOCATOR_PREFERENCE.indexOf(a.platform) - LOCATOR_PREFERENCE.indexOf(b.platform));
  for (const locator of byPreference) {
    const name = await readLocator(handle, fileSize, locator, file);
    if (name) return name;
  }
  if (header.parentName) return header.parentName.replace(/\\/g, '/');
  throw new CorruptImageError('differencing disk names no parent: no usable parent locator and an empty parent name', { file, field: 'parent_locator' });
}

async function readLocator(handle: FileHandle, fileSize: number, locator: ParentLocator, file: string): Promise<string> {
  const { platform, dataLength, dataOffset } = locator;
  const corrupt = (why: string) => new CorruptImageError(`parent locator ${platform}: ${why}`, { file, field: 'parent_locator' });
  if (dataLength > MAX_LOCATOR_BYTES) throw corrupt(`data length ${dataLength} exceeds ${MAX_LOCATOR_BYTES} bytes`);
  if (dataOffset + BigInt(dataLength) > BigInt(fileSize)) throw corrupt(`data at ${dataOffset} (${dataLength} bytes) extends past the end of the file`);
  const data = Buffer.alloc(dataLength);
  await readFully(handle, data, 0, dataLength, Number(dataOffset));
  switch (platform) {
    case 'W2ru':
    case 'W2ku':
      return decodeUtf16(data, 'le').replace(/\\/g, '/');
    case 'Wi2r':
    case 'Wi2k':
      return data.toString('utf8').replace(/\0[\s\S]*$/, '').replace(/\\/g, '/');
    default: {
      // MacX: a file:// URL.
      const url = data.toString('utf8').replace(/\0[\s\S]*$/, '');
      try {
        return fileURLToPath(url);
      } catch {
        throw corrupt(`'${url}' is not a file URL`);
      }
    }
  }
}

/**
 * Runs of present / absent sectors over [from, to) bytes of a block, from its sector bitmap: bit 7 of byte 0
 * is the block's first sector. Whole bytes of 0x00 or 0xff are taken in one step.
 */
function* sectorRuns(bitmap: Buffer, from: number, to: number): Iterable<[number, number, boolean]> {
  const bit = (sector: number) => (bitmap[sector >> 3] & (0x80 >> (sector & 7))) !== 0;
  const lastSector = Math.ceil(to / SECTOR);
  let pos = from;
  while (pos < to) {
    let sector = Math.floor(pos / SECTOR);
    const present = bit(sector);
    sector++;
    while (sector < lastSector) {
      if ((sector & 7) === 0 && sector + 8 <= lastSector && bitmap[sector >> 3] === (present ? 0xff : 0x00)) sector += 8;
      else if (bit(sector) === present) sector++;
      else break;
    }
    const stop = Math.min(to, sector * SECTOR);
    yield [pos, stop, present];
    pos = stop;
  }
}
