import { InvalidOptionError } from '../../../errors.js';
import { readFully, type OutputFile } from '../../output-file.js';
import {
  FLAG_NEWLINE_TEST,
  FLAG_REDUNDANT_GD,
  FLAG_ZEROED_GRAIN,
  MAX_GTES_PER_GT,
  MAX_SPARSE_SECTORS,
  SECTOR,
  encodeSparseHeader,
} from './layout.js';

/** QEMU's grain: 128 sectors. */
export const GRAIN_SECTORS = 128;
export const GRAIN_SIZE = GRAIN_SECTORS * SECTOR;
/** Embedded descriptor area of a new sparse file, as QEMU reserves it. */
export const DESCRIPTOR_SECTORS = 20;
const GT_SECTORS = (MAX_GTES_PER_GT * 4) / SECTOR;
/** Grain tables held in memory per image before the oldest is written back (each 2 KiB: 512 GiB of disk). */
const GT_CACHE_TABLES = 16384;

/** Where QEMU puts the tables of a new hosted sparse extent, in sectors. */
export interface SparseLayout {
  capacity: number;
  gtCount: number;
  gdSectors: number;
  rgdOffset: number;
  gdOffset: number;
  grainOffset: number;
}

export function sparseLayout(capacitySectors: number): SparseLayout {
  const grains = Math.ceil(capacitySectors / GRAIN_SECTORS);
  const gtCount = Math.ceil(grains / MAX_GTES_PER_GT);
  const gdSectors = Math.ceil((gtCount * 4) / SECTOR);
  const rgdOffset = 1 + DESCRIPTOR_SECTORS;
  const gdOffset = rgdOffset + gdSectors + GT_SECTORS * gtCount;
  const grainOffset = Math.ceil((gdOffset + gdSectors + GT_SECTORS * gtCount) / GRAIN_SECTORS) * GRAIN_SECTORS;
  return { capacity: capacitySectors, gtCount, gdSectors, rgdOffset, gdOffset, grainOffset };
}

/** Refuses sizes whose grains could not all be addressed by 32-bit grain table entries. */
export function checkSparseCapacity(capacitySectors: number, subformat: string): void {
  const layout = sparseLayout(capacitySectors);
  if (layout.grainOffset + layout.gtCount * MAX_GTES_PER_GT * GRAIN_SECTORS > MAX_SPARSE_SECTORS) {
    throw new InvalidOptionError(`a ${subformat} VMDK extent holds less than 2 TiB; use subformat=twoGbMaxExtentSparse or monolithicFlat`, {
      field: 'subformat',
    });
  }
}

interface TableSlot {
  table: Buffer;
  dirty: boolean;
}

/**
 * The grain tables in memory across all extents of one image, oldest loaded first: a split image of 2 TiB
 * has a thousand extent writers, and together they must stay within one bound.
 */
export class GrainTableBudget {
  private readonly loaded = new Map<number, () => void>();

  /** Records a loaded table under a key unique in the image; `evict` writes it back and forgets it. */
  add(key: number, evict: () => void): void {
    this.loaded.set(key, evict);
    while (this.loaded.size > GT_CACHE_TABLES) {
      const [oldest, evictOldest] = this.loaded.entries().next().value as [number, () => void];
      this.loaded.delete(oldest);
      evictOldest();
    }
  }
}

/**
 * One hosted sparse extent laid out exactly as QEMU creates it: header, descriptor area, redundant grain
 * directory and tables, grain directory and tables (all preallocated), then grains in allocation order.
 * Grain tables live in a bounded cache; evicted tables are written to both copies and read back if needed.
 */
export class SparseExtentWriter {
  private readonly layout: SparseLayout;
  private readonly tables = new Map<number, TableSlot>();
  private readonly evicted = new Set<number>();
  private readonly loading = new Map<number, Promise<void>>();
  private readonly pendingIo = new Set<Promise<void>>();
  private nextSector: number;
  private failed?: unknown;

  constructor(
    readonly out: OutputFile,
    /** Guest bytes, a multiple of 512. */
    readonly length: number,
    private readonly zeroedGrain: boolean,
    private readonly budget: GrainTableBudget,
    /** Distinguishes this extent's tables in the budget. */
    private readonly budgetKey: number,
    /** The descriptor text of a monolithicSparse file; split extents leave the area empty, as QEMU does. */
    private readonly descriptor?: string,
  ) {
    this.layout = sparseLayout(length / SECTOR);
    this.nextSector = this.layout.grainOffset;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    if (this.failed) throw this.failed;
    const end = offset + data.length;
    const firstTable = Math.floor(offset / GRAIN_SIZE / MAX_GTES_PER_GT);
    const lastTable = Math.floor((end - 1) / GRAIN_SIZE / MAX_GTES_PER_GT);
    // Tables may be evicted while others load: retry until all are in memory at once.
    for (;;) {
      const missing: Array<Promise<void>> = [];
      for (let t = firstTable; t <= lastTable; t++) if (!this.tables.has(t)) missing.push(this.loadTable(t));
      if (!missing.length) break;
      await Promise.all(missing);
    }
    const writes: Array<{ host: number; from: number; to: number }> = [];
    for (let pos = offset; pos < end; ) {
      const grain = Math.floor(pos / GRAIN_SIZE);
      const stop = Math.min(end, (grain + 1) * GRAIN_SIZE);
      const slot = this.tables.get(Math.floor(grain / MAX_GTES_PER_GT))!;
      const at = (grain % MAX_GTES_PER_GT) * 4;
      let sector = slot.table.readUInt32LE(at);
      if (sector === 0) {
        sector = this.nextSector;
        this.nextSector += GRAIN_SECTORS;
        slot.table.writeUInt32LE(sector, at);
        slot.dirty = true;
      }
      const host = sector * SECTOR + (pos - grain * GRAIN_SIZE);
      const prev = writes[writes.length - 1];
      if (prev && prev.host + (prev.to - prev.from) === host) prev.to += stop - pos;
      else writes.push({ host, from: pos - offset, to: stop - offset });
      pos = stop;
    }
    await Promise.all(writes.map((w) => this.out.writeAt(data.subarray(w.from, w.to), w.host)));
  }

  private loadTable(index: number): Promise<void> {
    let pending = this.loading.get(index);
    if (!pending) {
      pending = (async () => {
        const table = Buffer.alloc(GT_SECTORS * SECTOR);
        if (this.evicted.has(index)) {
          // The evicted copy must be on disk before it is read back.
          await Promise.all(this.pendingIo);
          await readFully(this.out.handle, table, 0, table.length, this.tableSector(this.layout.gdOffset, index) * SECTOR);
          this.evicted.delete(index);
        }
        this.tables.set(index, { table, dirty: false });
        this.budget.add(this.budgetKey + index, () => this.evict(index));
      })().finally(() => this.loading.delete(index));
      this.loading.set(index, pending);
    }
    return pending;
  }

  private evict(index: number): void {
    const slot = this.tables.get(index);
    if (!slot) return;
    this.tables.delete(index);
    this.evicted.add(index);
    if (slot.dirty) this.writeTable(index, slot.table);
  }

  /** Both copies: the redundant tables must match for VMware's consistency check. */
  private writeTable(index: number, table: Buffer): void {
    for (const dir of [this.layout.gdOffset, this.layout.rgdOffset]) {
      const io = this.out.writeAt(table, this.tableSector(dir, index) * SECTOR).catch((err) => {
        this.failed ??= err;
      });
      this.pendingIo.add(io);
      void io.finally(() => this.pendingIo.delete(io));
    }
  }

  /** Grain table `index` follows the directory that starts at `dirSector`. */
  private tableSector(dirSector: number, index: number): number {
    return dirSector + this.layout.gdSectors + index * GT_SECTORS;
  }

  /** Writes the metadata and extends the file to its last grain; the caller commits the file. */
  async finalize(): Promise<void> {
    for (const [index, slot] of this.tables) if (slot.dirty) this.writeTable(index, slot.table);
    const l = this.layout;
    const writes: Array<Promise<void>> = [];
    for (const dir of [l.rgdOffset, l.gdOffset]) {
      const gd = Buffer.alloc(l.gdSectors * SECTOR);
      for (let i = 0; i < l.gtCount; i++) gd.writeUInt32LE(this.tableSector(dir, i), i * 4);
      writes.push(this.out.writeAt(gd, dir * SECTOR));
    }
    writes.push(
      this.out.writeAt(
        encodeSparseHeader({
          version: this.zeroedGrain ? 2 : 1,
          flags: FLAG_REDUNDANT_GD | FLAG_NEWLINE_TEST | (this.zeroedGrain ? FLAG_ZEROED_GRAIN : 0),
          capacity: l.capacity,
          grainSectors: GRAIN_SECTORS,
          descriptorOffset: 1,
          descriptorSectors: DESCRIPTOR_SECTORS,
          gtesPerGt: MAX_GTES_PER_GT,
          rgdOffset: l.rgdOffset,
          gdOffset: BigInt(l.gdOffset),
          grainOffset: l.grainOffset,
          compressAlgorithm: 0,
        }),
        0,
      ),
    );
    if (this.descriptor) writes.push(this.out.writeAt(Buffer.from(this.descriptor), SECTOR));
    await Promise.all(writes);
    await this.settle();
    if (this.failed) throw this.failed;
    // Grains are whole in the file, even the last one of an odd-sized disk, and the tables always exist.
    const end = Math.max(l.grainOffset, this.nextSector) * SECTOR;
    const { size } = await this.out.handle.stat();
    if (size < end) await this.out.handle.truncate(end);
  }

  /** Waits for background table writes, for finish and for abort alike. */
  async settle(): Promise<void> {
    while (this.pendingIo.size) await Promise.allSettled([...this.pendingIo]);
  }
}
