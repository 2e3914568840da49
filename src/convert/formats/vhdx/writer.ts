import { randomUUID } from '../../../util/random.js';
import type { DiskWriter } from '../../disk.js';
import type { OutputFile } from '../../output-file.js';
import {
  FILE_SIGNATURE,
  HEADER_OFFSETS,
  HEADER_SIZE,
  ITEM_FILE_PARAMETERS,
  ITEM_LOGICAL_SECTOR_SIZE,
  ITEM_PAGE83,
  ITEM_PHYSICAL_SECTOR_SIZE,
  ITEM_VIRTUAL_DISK_SIZE,
  METADATA_IS_REQUIRED,
  METADATA_IS_VIRTUAL_DISK,
  METADATA_TABLE_SIZE,
  MiB,
  PARAMS_LEAVE_BLOCKS_ALLOCATED,
  PayloadState,
  REGION_BAT,
  REGION_METADATA,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  batGeometry,
  checksumWithField,
  encodeEntry,
  guidBytes,
  type BatGeometry,
} from './layout.js';

/** Ferry writes 512-byte logical and physical sectors, as QEMU does. */
export const SECTOR_SIZE = 512;

export interface VhdxWriterOptions {
  /** Every block preallocated in place (Hyper-V "fixed"), instead of allocated on first write. */
  fixed: boolean;
  blockSize: number;
  logSize: number;
  /** Blocks that receive no data are marked ZERO rather than NOT_PRESENT (QEMU's block_state_zero). */
  blockStateZero: boolean;
  durable: boolean;
}

/** Where QEMU puts each structure of a new image; Ferry uses the same places. */
interface VhdxPlan {
  /** The virtual size recorded: the requested size rounded up to whole sectors. */
  diskSize: number;
  geo: BatGeometry;
  logOffset: number;
  batOffset: number;
  batLength: number;
  metadataOffset: number;
  /** First payload block: QEMU leaves 4 MiB beyond the 1 MiB metadata region free for growth. */
  dataOffset: number;
}

function planVhdx(virtualSize: number, blockSize: number, logSize: number): VhdxPlan {
  const diskSize = Math.ceil(virtualSize / SECTOR_SIZE) * SECTOR_SIZE;
  const geo = batGeometry(diskSize, blockSize, SECTOR_SIZE, false);
  const logOffset = MiB;
  const batOffset = Math.ceil((logOffset + logSize) / MiB) * MiB;
  const batLength = Math.ceil((geo.entries * 8) / MiB) * MiB;
  const metadataOffset = batOffset + batLength;
  return { diskSize, geo, logOffset, batOffset, batLength, metadataOffset, dataOffset: batOffset + batLength + 5 * MiB };
}

/** Payload blocks per page of the writer's block table. */
const TABLE_PAGE = 32768;
/** BAT entries written per write at finish (1 MiB). */
const BAT_WRITE_ENTRIES = 131072;
const ZERO_WRITE = MiB;

/**
 * Writes a dynamic or fixed VHDX image that QEMU and Hyper-V read and `qemu-img check` accepts.
 *
 * Blocks are taken on their first write: a dynamic image appends them at the end of the file (1 MiB
 * aligned, as every VHDX object), a fixed one uses the block's preallocated place. Parts of a block that
 * are never written are left as holes, so they read as zeroes, and the block is FULLY_PRESENT, as QEMU
 * does it. The unit of writing is one sector, so however large the blocks, the pipeline never has to hold
 * a whole block in memory. All metadata (BAT, metadata region, region tables, headers) is written on
 * finish; the log stays empty.
 */
export class VhdxWriter implements DiskWriter {
  readonly granularity = SECTOR_SIZE;
  readonly sequential = false;
  readonly zeroInitialized = true;
  private readonly plan: VhdxPlan;
  /** File offset, in MiB, of each payload block written so far (0: none). Pages appear on first write. */
  private readonly hostMiB = new Map<number, Uint32Array>();
  /** Where the next dynamic block goes. */
  private nextFree: number;
  private zeroBuffer?: Buffer;

  constructor(
    private readonly out: OutputFile,
    readonly virtualSize: number,
    private readonly opts: VhdxWriterOptions,
  ) {
    this.plan = planVhdx(virtualSize, opts.blockSize, opts.logSize);
    this.nextFree = this.plan.dataOffset;
  }

  get path(): string {
    return this.out.finalPath;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    const writes: Array<{ host: number; from: number; to: number }> = [];
    this.forEachBlockPiece(offset, data.length, (block, within, from, to) => {
      const host = this.hostOf(block, true) + within;
      const prev = writes[writes.length - 1];
      if (prev && prev.host + (prev.to - prev.from) === host) prev.to = to;
      else writes.push({ host, from, to });
    });
    await Promise.all(writes.map((w) => this.out.writeAt(data.subarray(w.from, w.to), w.host)));
  }

  /** Unwritten blocks already read as zeroes; only blocks holding data need zeroes written over it. */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    const writes: Array<Promise<void>> = [];
    this.forEachBlockPiece(offset, length, (block, within, from, to) => {
      const host = this.hostOf(block, false);
      if (!host) return;
      const zero = (this.zeroBuffer ??= Buffer.alloc(ZERO_WRITE));
      for (let at = 0; at < to - from; at += ZERO_WRITE) {
        writes.push(this.out.writeAt(zero.subarray(0, Math.min(ZERO_WRITE, to - from - at)), host + within + at));
      }
    });
    await Promise.all(writes);
  }

  private checkRange(offset: number, length: number): void {
    const end = offset + length;
    if (offset % SECTOR_SIZE !== 0 || (end % SECTOR_SIZE !== 0 && end !== this.virtualSize) || end > this.virtualSize) {
      throw new RangeError(`vhdx writer: range ${offset}+${length} is not sector aligned or exceeds the disk`);
    }
  }

  /** Calls `fn` for each block-sized piece of [offset, offset+length): block, offset in it, piece bounds relative to `offset`. */
  private forEachBlockPiece(offset: number, length: number, fn: (block: number, within: number, from: number, to: number) => void): void {
    const bs = this.opts.blockSize;
    for (let pos = offset; pos < offset + length; ) {
      const block = Math.floor(pos / bs);
      const stop = Math.min(offset + length, (block + 1) * bs);
      fn(block, pos - block * bs, pos - offset, stop - offset);
      pos = stop;
    }
  }

  /** The block's file offset, taking a place for it when `allocate` is set; 0 for a block never written. */
  private hostOf(block: number, allocate: boolean): number {
    const page = Math.floor(block / TABLE_PAGE);
    let table = this.hostMiB.get(page);
    if (!table) {
      if (!allocate) return 0;
      table = new Uint32Array(TABLE_PAGE);
      this.hostMiB.set(page, table);
    }
    const slot = block % TABLE_PAGE;
    if (table[slot] === 0 && allocate) {
      let host: number;
      if (this.opts.fixed) host = this.plan.dataOffset + block * this.opts.blockSize;
      else {
        host = this.nextFree;
        this.nextFree += this.opts.blockSize;
      }
      table[slot] = host / MiB;
    }
    return table[slot] * MiB;
  }

  async finish(): Promise<void> {
    try {
      await this.writeBat();
      const p = this.plan;
      await Promise.all([
        this.out.writeAt(fileIdentifier(), 0),
        ...headers(this.opts.logSize, p.logOffset).map((h, i) => this.out.writeAt(h, HEADER_OFFSETS[i])),
        ...REGION_TABLE_OFFSETS.map((o) => this.out.writeAt(regionTable(p), o)),
        this.out.writeAt(metadataRegion(p, this.opts), p.metadataOffset),
      ]);
      // Fixed images hold every block in full; dynamic ones end with their last block (or the free space QEMU leaves).
      const end = this.opts.fixed ? p.dataOffset + p.geo.payloadBlocks * this.opts.blockSize : this.nextFree;
      await this.out.handle.truncate(end);
      await this.out.commit(this.opts.durable);
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  async abort(): Promise<void> {
    await this.out.discard();
  }

  /** The BAT, a page at a time; all-zero pages stay holes. */
  private async writeBat(): Promise<void> {
    const { geo, batOffset } = this.plan;
    const absent = this.opts.blockStateZero ? PayloadState.Zero : PayloadState.NotPresent;
    for (let first = 0; first < geo.entries; first += BAT_WRITE_ENTRIES) {
      const count = Math.min(BAT_WRITE_ENTRIES, geo.entries - first);
      const buf = Buffer.alloc(count * 8);
      let used = false;
      for (let k = 0; k < count; k++) {
        const index = first + k;
        // Sector bitmap entries stay NOT_PRESENT: only differencing images have bitmaps.
        if (index % (geo.chunkRatio + 1) === geo.chunkRatio) continue;
        const block = index - Math.floor(index / (geo.chunkRatio + 1));
        if (block >= geo.payloadBlocks) continue;
        const host = this.hostOf(block, false);
        if (host) encodeEntry(buf, k * 8, host, PayloadState.FullyPresent);
        else if (this.opts.fixed && !this.opts.blockStateZero) encodeEntry(buf, k * 8, this.plan.dataOffset + block * this.opts.blockSize, PayloadState.FullyPresent);
        else if (absent === PayloadState.NotPresent) continue;
        else encodeEntry(buf, k * 8, 0, absent);
        used = true;
      }
      if (used) await this.out.writeAt(buf, batOffset + first * 8);
    }
  }
}

function newGuid(): Buffer {
  return guidBytes(randomUUID());
}

function fileIdentifier(): Buffer {
  const buf = Buffer.alloc(8 + 512);
  buf.write(FILE_SIGNATURE, 0, 'latin1');
  buf.write('Ferry', 8, 'utf16le');
  return buf;
}

/** Both headers carry the same fields; the second, with the higher sequence number, is current. */
function headers(logSize: number, logOffset: number): Buffer[] {
  const fileWriteGuid = newGuid();
  const dataWriteGuid = newGuid();
  return [1n, 2n].map((sequence) => {
    const buf = Buffer.alloc(HEADER_SIZE);
    buf.write('head', 0, 'latin1');
    buf.writeBigUInt64LE(sequence, 8);
    fileWriteGuid.copy(buf, 16);
    dataWriteGuid.copy(buf, 32);
    // LogGuid (48) stays zero: the log is empty. LogVersion (64) is 0.
    buf.writeUInt16LE(1, 66); // Version
    buf.writeUInt32LE(logSize, 68);
    buf.writeBigUInt64LE(BigInt(logOffset), 72);
    buf.writeUInt32LE(checksumWithField(buf, 4), 4);
    return buf;
  });
}

function regionTable(p: VhdxPlan): Buffer {
  const buf = Buffer.alloc(REGION_TABLE_SIZE);
  buf.write('regi', 0, 'latin1');
  buf.writeUInt32LE(2, 8);
  const entry = (i: number, guid: Buffer, offset: number, length: number) => {
    const at = 16 + i * 32;
    guid.copy(buf, at);
    buf.writeBigUInt64LE(BigInt(offset), at + 16);
    buf.writeUInt32LE(length, at + 24);
    buf.writeUInt32LE(1, at + 28); // Required: both regions are, per the specification
  };
  entry(0, REGION_BAT, p.batOffset, p.batLength);
  entry(1, REGION_METADATA, p.metadataOffset, MiB);
  buf.writeUInt32LE(checksumWithField(buf, 4), 4);
  return buf;
}

/** The metadata table and the five items it lists, laid out as QEMU lays them out. */
function metadataRegion(p: VhdxPlan, opts: VhdxWriterOptions): Buffer {
  const itemsAt = METADATA_TABLE_SIZE;
  const buf = Buffer.alloc(itemsAt + 40);
  buf.write('metadata', 0, 'latin1');
  const items: Array<[Buffer, number, number, (at: number) => void]> = [
    [ITEM_FILE_PARAMETERS, 8, METADATA_IS_REQUIRED, (at) => {
      buf.writeUInt32LE(opts.blockSize, at);
      buf.writeUInt32LE(opts.fixed ? PARAMS_LEAVE_BLOCKS_ALLOCATED : 0, at + 4);
    }],
    [ITEM_VIRTUAL_DISK_SIZE, 8, METADATA_IS_REQUIRED | METADATA_IS_VIRTUAL_DISK, (at) => buf.writeBigUInt64LE(BigInt(p.diskSize), at)],
    [ITEM_PAGE83, 16, METADATA_IS_REQUIRED | METADATA_IS_VIRTUAL_DISK, (at) => newGuid().copy(buf, at)],
    [ITEM_LOGICAL_SECTOR_SIZE, 4, METADATA_IS_REQUIRED | METADATA_IS_VIRTUAL_DISK, (at) => buf.writeUInt32LE(SECTOR_SIZE, at)],
    [ITEM_PHYSICAL_SECTOR_SIZE, 4, METADATA_IS_REQUIRED | METADATA_IS_VIRTUAL_DISK, (at) => buf.writeUInt32LE(SECTOR_SIZE, at)],
  ];
  buf.writeUInt16LE(items.length, 10);
  let offset = itemsAt;
  items.forEach(([guid, length, flags, fill], i) => {
    const at = 32 + i * 32;
    guid.copy(buf, at);
    buf.writeUInt32LE(offset, at + 16);
    buf.writeUInt32LE(length, at + 20);
    buf.writeUInt32LE(flags, at + 24);
    fill(offset);
    offset += length;
  });
  return buf;
}
