import type { DiskWriter } from '../../disk.js';
import type { OutputFile } from '../../output-file.js';
import { PAGE_ENTRIES } from './block-map.js';
import {
  BLOCK_ENTRY_BYTES,
  BLOCK_SIZE,
  BLOCK_UNALLOCATED,
  SECTOR_SIZE,
  TYPE_STATIC,
  encodeHeader,
  type ImageType,
  type VdiGeometry,
} from './layout.js';

/** Block map pages encoded per write when the map is written out: 16 x 256 KiB. */
const PAGES_PER_WRITE = 16;
const ZERO_WRITE_CHUNK = 4 * 1024 * 1024;

/**
 * Writes a VDI image laid out as QEMU lays it out (header, block map, data), so `qemu-img check` finds
 * nothing to report.
 *
 * Dynamic: a block is allocated on its first write, appended after the last one. Parts of a block that are
 * never written stay holes in the file, which read as zeroes, and the file is extended to the end of the
 * last block. Only block map pages that were touched are held, so memory follows the data written, not
 * the disk size. Static: every block is preallocated in guest order (the file is sized, sparse, at the
 * end), so writes go straight to their place.
 */
export class VdiWriter implements DiskWriter {
  readonly granularity = SECTOR_SIZE;
  readonly sequential = false;
  readonly zeroInitialized = true;
  /** Dynamic images: the block map pages written to so far; untouched entries are BLOCK_UNALLOCATED. */
  private readonly bmapPages = new Map<number, Uint32Array>();
  private blocksAllocated: number;

  constructor(
    private readonly out: OutputFile,
    readonly virtualSize: number,
    private readonly geo: VdiGeometry,
    private readonly imageType: ImageType,
    private readonly durable: boolean,
  ) {
    this.blocksAllocated = imageType === TYPE_STATIC ? this.geo.blocks : 0;
  }

  get path(): string {
    return this.out.finalPath;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    const end = offset + data.length;
    const writes: Array<{ host: number; from: number; to: number }> = [];
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / BLOCK_SIZE);
      const stop = Math.min(end, (block + 1) * BLOCK_SIZE);
      const host = this.allocatedBlock(block) + (pos - block * BLOCK_SIZE);
      const prev = writes[writes.length - 1];
      if (prev && prev.host + (prev.to - prev.from) === host) prev.to += stop - pos;
      else writes.push({ host, from: pos - offset, to: stop - offset });
      pos = stop;
    }
    await Promise.all(writes.map((w) => this.out.writeAt(data.subarray(w.from, w.to), w.host)));
  }

  /** Unallocated blocks already read as zeroes; only stored bytes need clearing. */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / BLOCK_SIZE);
      const stop = Math.min(end, (block + 1) * BLOCK_SIZE);
      const start = this.storedBlock(block);
      if (start !== undefined) await this.clear(start + (pos - block * BLOCK_SIZE), stop - pos);
      pos = stop;
    }
  }

  async finish(): Promise<void> {
    try {
      await this.writeBlockMap();
      await this.out.writeAt(encodeHeader(this.geo, this.imageType, this.blocksAllocated), 0);
      // The file reaches the end of the last block, as QEMU leaves it, even where the block's tail was never written.
      const end = this.geo.offsetData + this.blocksAllocated * BLOCK_SIZE;
      const { size } = await this.out.handle.stat();
      if (size < end) await this.out.handle.truncate(end);
      await this.out.commit(this.durable);
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  abort(): Promise<void> {
    return this.out.discard();
  }

  private checkRange(offset: number, length: number): void {
    const end = offset + length;
    if (offset % SECTOR_SIZE !== 0 || (end % SECTOR_SIZE !== 0 && end !== this.virtualSize) || end > this.virtualSize) {
      throw new RangeError(`vdi writer: range ${offset}+${length} is not sector aligned or exceeds the disk`);
    }
  }

  /** Where guest block `block` starts in the file, allocating it at the end of the data area on first use. */
  private allocatedBlock(block: number): number {
    const stored = this.storedBlock(block);
    if (stored !== undefined) return stored;
    const pageIndex = Math.floor(block / PAGE_ENTRIES);
    let page = this.bmapPages.get(pageIndex);
    if (!page) {
      page = new Uint32Array(Math.min(PAGE_ENTRIES, this.geo.blocks - pageIndex * PAGE_ENTRIES)).fill(BLOCK_UNALLOCATED);
      this.bmapPages.set(pageIndex, page);
    }
    const index = this.blocksAllocated++;
    page[block % PAGE_ENTRIES] = index;
    return this.geo.offsetData + index * BLOCK_SIZE;
  }

  /** Where guest block `block` starts in the file, if it has a place yet. */
  private storedBlock(block: number): number | undefined {
    if (this.imageType === TYPE_STATIC) return this.geo.offsetData + block * BLOCK_SIZE;
    const entry = this.bmapPages.get(Math.floor(block / PAGE_ENTRIES))?.[block % PAGE_ENTRIES];
    return entry === undefined || entry === BLOCK_UNALLOCATED ? undefined : this.geo.offsetData + entry * BLOCK_SIZE;
  }

  /** Zeroes are written, not punched: they must queue behind earlier writes to the same bytes. */
  private async clear(host: number, length: number): Promise<void> {
    const zero = Buffer.alloc(Math.min(length, ZERO_WRITE_CHUNK));
    for (let pos = host; pos < host + length; pos += zero.length) {
      await this.out.writeAt(zero.subarray(0, Math.min(zero.length, host + length - pos)), pos);
    }
  }

  /** Writes the whole block map, in batches of pages so memory stays small for any disk size. */
  private async writeBlockMap(): Promise<void> {
    const pages = Math.ceil(this.geo.blocks / PAGE_ENTRIES);
    for (let first = 0; first < pages; first += PAGES_PER_WRITE) {
      const firstBlock = first * PAGE_ENTRIES;
      const blocks = Math.min(PAGES_PER_WRITE * PAGE_ENTRIES, this.geo.blocks - firstBlock);
      const buf = Buffer.alloc(blocks * BLOCK_ENTRY_BYTES, 0xff);
      for (let p = first; p < Math.min(pages, first + PAGES_PER_WRITE); p++) {
        const at = (p - first) * PAGE_ENTRIES;
        if (this.imageType === TYPE_STATIC) {
          // Static images map every block to the data block of the same index.
          const count = Math.min(PAGE_ENTRIES, this.geo.blocks - p * PAGE_ENTRIES);
          for (let i = 0; i < count; i++) buf.writeUInt32LE(p * PAGE_ENTRIES + i, (at + i) * BLOCK_ENTRY_BYTES);
          continue;
        }
        const page = this.bmapPages.get(p);
        if (page) for (let i = 0; i < page.length; i++) buf.writeUInt32LE(page[i], (at + i) * BLOCK_ENTRY_BYTES);
      }
      await this.out.writeAt(buf, this.geo.offsetBmap + firstBlock * BLOCK_ENTRY_BYTES);
    }
  }
}
