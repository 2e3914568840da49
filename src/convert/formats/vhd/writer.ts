import { randomBytes } from '../../../util/random.js';
import type { DiskWriter } from '../../disk.js';
import type { OutputFile } from '../../output-file.js';
import {
  BAT_OFFSET,
  DiskType,
  HEADER_OFFSET,
  NO_DATA_OFFSET,
  SECTOR,
  UNALLOCATED,
  VHD_EPOCH,
  bitmapBytes,
  encodeDynamicHeader,
  encodeFooter,
  type Geometry,
} from './layout.js';

/** What a new VHD looks like; sizes already rounded the way qemu rounds them. */
export interface VhdImagePlan {
  diskType: DiskType.Fixed | DiskType.Dynamic;
  virtualSize: number;
  geometry: Geometry;
  /** "qemu" images are sized by geometry, "qem2" (force_size) by current_size: qemu's own convention. */
  creatorApp: 'qemu' | 'qem2';
  /** Dynamic disks only. */
  blockSize: number;
}

/** The footer Ferry writes, as qemu-img writes it (Virtual PC 2007 version fields, "Wi2k" host). */
function footerFor(plan: VhdImagePlan): Buffer {
  const uuid = randomBytes(16);
  uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4 (random)
  uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
  return encodeFooter({
    features: 0x00000002,
    version: 0x00010000,
    dataOffset: plan.diskType === DiskType.Dynamic ? BigInt(HEADER_OFFSET) : NO_DATA_OFFSET,
    timestamp: (Math.floor(Date.now() / 1000) - VHD_EPOCH) >>> 0,
    creatorApp: plan.creatorApp,
    creatorVersion: 0x00050003,
    creatorOs: 'Wi2k',
    originalSize: BigInt(plan.virtualSize),
    currentSize: BigInt(plan.virtualSize),
    geometry: plan.geometry,
    diskType: plan.diskType,
    uuid,
  });
}

/** Rejects writes outside the disk; the pipeline writes [0, source size), which may end mid-sector. */
function checkRange(offset: number, length: number, virtualSize: number): void {
  if (offset % SECTOR !== 0 || offset + length > virtualSize) {
    throw new RangeError(`vhd writer: range ${offset}+${length} is not sector aligned or exceeds the disk (${virtualSize} bytes)`);
  }
}

/** A fixed disk: the guest bytes at their own offsets in a sparse file, then the footer. */
export class VhdFixedWriter implements DiskWriter {
  readonly granularity = SECTOR;
  readonly sequential = false;
  readonly zeroInitialized = true;

  private constructor(
    private readonly out: OutputFile,
    private readonly plan: VhdImagePlan,
    private readonly durable: boolean,
  ) {}

  static async create(out: OutputFile, plan: VhdImagePlan, durable: boolean): Promise<VhdFixedWriter> {
    await out.handle.truncate(plan.virtualSize);
    return new VhdFixedWriter(out, plan, durable);
  }

  get path(): string {
    return this.out.finalPath;
  }

  get virtualSize(): number {
    return this.plan.virtualSize;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkRange(offset, data.length, this.plan.virtualSize);
    await this.out.writeAt(data, offset);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    // The file was created sparse at its full size: unwritten ranges already read as zeroes.
    checkRange(offset, length, this.plan.virtualSize);
  }

  async finish(): Promise<void> {
    try {
      await this.out.writeAt(footerFor(this.plan), this.plan.virtualSize);
      await this.out.commit(this.durable);
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  abort(): Promise<void> {
    return this.out.discard();
  }
}

/**
 * A dynamic disk in qemu's layout: footer copy, header, BAT (padded to a sector), then blocks in the order
 * they are first written, each a sector bitmap with every bit set (as qemu writes it: the block holds all
 * its sectors) followed by the block's data, and the footer at the end. Unwritten parts of an allocated
 * block are holes in the sparse file, so they read as zeroes; blocks never written stay unallocated.
 */
export class VhdDynamicWriter implements DiskWriter {
  readonly granularity = SECTOR;
  readonly sequential = false;
  readonly zeroInitialized = true;
  private readonly bat: Uint32Array;
  private readonly bitmapSize: number;
  private readonly fullBitmap: Buffer;
  private readonly batBytes: number;
  /** Where the next block goes. */
  private nextBlock: number;

  constructor(
    private readonly out: OutputFile,
    private readonly plan: VhdImagePlan,
    private readonly durable: boolean,
  ) {
    // qemu sizes the BAT for the virtual size exactly; memory is 4 bytes per block (16 MiB at 2040 GiB / 512 KiB).
    this.bat = new Uint32Array(Math.ceil(plan.virtualSize / plan.blockSize)).fill(UNALLOCATED);
    this.bitmapSize = bitmapBytes(plan.blockSize);
    this.fullBitmap = Buffer.alloc(this.bitmapSize, 0xff);
    this.batBytes = Math.ceil((this.bat.length * 4) / SECTOR) * SECTOR;
    this.nextBlock = BAT_OFFSET + this.batBytes;
  }

  get path(): string {
    return this.out.finalPath;
  }

  get virtualSize(): number {
    return this.plan.virtualSize;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkRange(offset, data.length, this.plan.virtualSize);
    const bs = this.plan.blockSize;
    const writes: Array<Promise<void>> = [];
    for (let pos = offset; pos < offset + data.length; ) {
      const block = Math.floor(pos / bs);
      const stop = Math.min(offset + data.length, (block + 1) * bs);
      let start = this.bat[block];
      if (start === UNALLOCATED) {
        // Allocation is synchronous, so concurrent writers never get the same place.
        start = this.nextBlock / SECTOR;
        this.bat[block] = start;
        this.nextBlock += this.bitmapSize + bs;
        writes.push(this.out.writeAt(this.fullBitmap, start * SECTOR));
      }
      const host = start * SECTOR + this.bitmapSize + (pos - block * bs);
      writes.push(this.out.writeAt(data.subarray(pos - offset, stop - offset), host));
      pos = stop;
    }
    await Promise.all(writes);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    // Nothing to record: unallocated blocks read as zeroes, and so do unwritten parts of allocated ones.
    checkRange(offset, length, this.plan.virtualSize);
  }

  async finish(): Promise<void> {
    try {
      const footer = footerFor(this.plan);
      const bat = Buffer.alloc(this.batBytes, 0xff);
      this.bat.forEach((entry, i) => bat.writeUInt32BE(entry, i * 4));
      await Promise.all([
        this.out.writeAt(footer, 0),
        this.out.writeAt(encodeDynamicHeader(this.bat.length, this.plan.blockSize), HEADER_OFFSET),
        this.out.writeAt(bat, BAT_OFFSET),
        // The footer closes the file, after the last block: it also makes the file cover that block's holes.
        this.out.writeAt(footer, this.nextBlock),
      ]);
      await this.out.commit(this.durable);
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  abort(): Promise<void> {
    return this.out.discard();
  }
}
