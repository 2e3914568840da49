import type { FileHandle } from 'node:fs/promises';
import { CorruptImageError, UnsupportedFeatureError } from '../../../errors.js';
import { readFully } from '../../output-file.js';
import { MAX_REFTABLE_BYTES, readRefcount, writeRefcount, type Qcow2Header } from './layout.js';

interface RefBlock {
  host: number;
  data: Buffer;
  dirty: boolean;
}

/** A byte range whose clusters each lose one reference once the tables no longer point into it. */
interface PendingFree {
  offset: number;
  length: number;
}

/** Offset of the refcount table fields in the header: offset (u64) and clusters (u32), written together. */
const HEADER_REFTABLE_FIELDS = 48;

/**
 * The refcounts of an existing qcow2 image opened for writing in place. Refcount blocks are read on
 * demand and kept in a bounded cache; only increments for clusters allocated at the end of the file touch
 * them before the tables are written. Decrements are held back until the L2/L1 tables that dropped the
 * reference are on disk (QEMU's dependency of the refcount cache on the L2 cache when freeing), so a
 * crash can leak a cluster but never leave a table pointing at a cluster counted as free.
 */
export class RefcountStore {
  private table: Float64Array;
  private tableOffset: number;
  private tableClusters: number;
  /** Entries of the on-disk table to rewrite in place; unused once the table has moved. */
  private readonly tableDirty = new Set<number>();
  /** Tables replaced since the last flush: freed once the header names the new one. */
  private readonly superseded: PendingFree[] = [];
  private relocated = false;
  private readonly blocks = new Map<number, RefBlock>();
  private readonly loading = new Map<number, Promise<RefBlock>>();
  private readonly frees: PendingFree[] = [];
  private dirtyBlocks = 0;
  private readonly perBlock: number;
  private readonly bits: number;
  private readonly cs: number;
  /** The next cluster to hand out: past the file's end and past every counted cluster. */
  private next: number;

  private constructor(
    private readonly handle: FileHandle,
    private readonly file: string,
    header: Qcow2Header,
    table: Float64Array,
    next: number,
    private readonly cacheLimit: number,
  ) {
    this.cs = header.clusterSize;
    this.bits = 2 ** header.refcountOrder;
    this.perBlock = (this.cs * 8) / this.bits;
    this.table = table;
    this.tableOffset = header.refcountTableOffset;
    this.tableClusters = header.refcountTableClusters;
    this.next = next;
  }

  /**
   * Reads the refcount table and scans every refcount block once (without keeping them) to find the
   * last counted cluster: allocation must start past it even where the file ends earlier.
   */
  static async open(handle: FileHandle, file: string, header: Qcow2Header, fileSize: number, cacheBytes: number): Promise<RefcountStore> {
    const cs = header.clusterSize;
    const bits = 2 ** header.refcountOrder;
    const raw = Buffer.alloc(header.refcountTableClusters * cs);
    await readFully(handle, raw, 0, raw.length, header.refcountTableOffset);
    const table = new Float64Array(raw.length / 8);
    const block = Buffer.alloc(cs);
    const perBlock = (cs * 8) / bits;
    let lastCounted = -1;
    for (let i = 0; i < table.length; i++) {
      const offset = Number(raw.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
      if (!offset) continue;
      if (offset % cs || offset + cs > fileSize) {
        throw new CorruptImageError(`refcount table entry ${i}: refcount block at ${offset} is misaligned or past the end of the file`, {
          file,
          field: 'refcount_table',
        });
      }
      table[i] = offset;
      await readFully(handle, block, 0, cs, offset);
      for (let j = perBlock - 1; j >= 0; j--) {
        if (readRefcount(block, j, bits)) {
          lastCounted = Math.max(lastCounted, i * perBlock + j);
          break;
        }
      }
    }
    const next = Math.max(Math.ceil(fileSize / cs), lastCounted + 1);
    return new RefcountStore(handle, file, header, table, next, Math.max(8, Math.floor(cacheBytes / cs)));
  }

  /** Clusters in use up to here: the file must reach `end` once the tables are written. */
  get end(): number {
    return this.next * this.cs;
  }

  get pendingFrees(): number {
    return this.frees.length;
  }

  /** True when dirty blocks fill the cache: only a flush can make room. */
  get full(): boolean {
    return this.dirtyBlocks >= this.cacheLimit;
  }

  async refcount(cluster: number): Promise<number> {
    const index = Math.floor(cluster / this.perBlock);
    if (index >= this.table.length || !this.table[index]) return 0;
    const block = await this.block(index);
    return readRefcount(block.data, cluster % this.perBlock, this.bits);
  }

  /** A new cluster at the end of the file with refcount 1, creating refcount blocks and growing the table as needed. */
  async allocate(): Promise<number> {
    const cluster = this.next++;
    await this.ensureBlock(Math.floor(cluster / this.perBlock));
    await this.increment(cluster);
    return cluster;
  }

  /** Drops one reference to every cluster of [offset, offset+length) after the tables stop pointing there. */
  freeLater(offset: number, length: number): void {
    this.frees.push({ offset, length });
  }

  /** Step 1 of a flush: the blocks holding new clusters' counts. The caller syncs before the tables use them. */
  async writeBlocks(): Promise<void> {
    for (const block of this.blocks.values()) {
      if (!block.dirty) continue;
      await this.writeAt(block.data, block.host);
      block.dirty = false;
      this.dirtyBlocks--;
    }
  }

  /**
   * Step 2: makes the table point at new blocks. A moved table is written whole, synced, and only then
   * named in the header (one write of both fields), as QEMU does when it grows the table.
   */
  async writeTable(): Promise<boolean> {
    if (this.relocated) {
      const raw = Buffer.alloc(this.tableClusters * this.cs);
      this.table.forEach((v, i) => v && raw.writeBigUInt64BE(BigInt(v), i * 8));
      await this.writeAt(raw, this.tableOffset);
      await this.handle.datasync();
      const fields = Buffer.alloc(12);
      fields.writeBigUInt64BE(BigInt(this.tableOffset), 0);
      fields.writeUInt32BE(this.tableClusters, 8);
      await this.writeAt(fields, HEADER_REFTABLE_FIELDS);
      this.frees.push(...this.superseded);
      this.superseded.length = 0;
      this.relocated = false;
      this.tableDirty.clear();
      return true;
    }
    if (!this.tableDirty.size) return false;
    const entry = Buffer.alloc(8);
    for (const i of [...this.tableDirty].sort((a, b) => a - b)) {
      entry.writeBigUInt64BE(BigInt(this.table[i]), 0);
      await this.writeAt(entry, this.tableOffset + i * 8);
    }
    this.tableDirty.clear();
    return true;
  }

  /**
   * Last step, once the tables on disk no longer reference them: applies the held-back decrements and
   * returns the clusters that became free, for the caller to discard.
   */
  async applyFrees(): Promise<number[]> {
    const freed: number[] = [];
    const pending = this.frees.splice(0).sort((a, b) => a.offset - b.offset);
    for (const f of pending) {
      for (let c = Math.floor(f.offset / this.cs); c * this.cs < f.offset + f.length; c++) {
        const index = Math.floor(c / this.perBlock);
        if (index >= this.table.length || !this.table[index]) throw this.corrupt(`cluster ${c} is referenced but has no refcount block`);
        const block = await this.block(index);
        const i = c % this.perBlock;
        const count = readRefcount(block.data, i, this.bits);
        if (count === 0) throw this.corrupt(`cluster ${c} is referenced but its refcount is 0`);
        writeRefcount(block.data, i, this.bits, count - 1);
        this.markDirty(block);
        if (count === 1) freed.push(c);
      }
    }
    await this.writeBlocks();
    this.trim();
    return freed;
  }

  /** Drops clean blocks beyond the cache bound, less `room` (dirty ones wait for the next flush). */
  trim(room = 0): void {
    for (const [index, block] of this.blocks) {
      if (this.blocks.size + room <= this.cacheLimit) return;
      if (!block.dirty) this.blocks.delete(index);
    }
  }

  private async ensureBlock(index: number): Promise<void> {
    if (index >= this.table.length) await this.growTable(index);
    if (this.table[index]) return;
    const host = this.next++;
    this.table[index] = host * this.cs;
    this.tableDirty.add(index);
    const block: RefBlock = { host: host * this.cs, data: Buffer.alloc(this.cs), dirty: false };
    this.markDirty(block);
    this.blocks.set(index, block);
    await this.ensureBlock(Math.floor(host / this.perBlock));
    await this.increment(host);
  }

  /** Moves the table to the end of the file, half as large again or enough for `index`, and counts its clusters. */
  private async growTable(index: number): Promise<void> {
    const perCluster = this.cs / 8;
    let clusters = Math.max(Math.ceil((index + 1) / perCluster), Math.ceil((this.tableClusters * 3) / 2));
    // The table's own clusters (and a few new blocks after them) must be covered by the table itself.
    while (Math.floor((this.next + clusters + 4) / this.perBlock) >= clusters * perCluster) clusters++;
    if (clusters * this.cs > MAX_REFTABLE_BYTES) {
      throw new UnsupportedFeatureError(`the refcount table would grow past the 8 MiB limit (${clusters} clusters)`, { file: this.file, field: 'refcount_table_clusters' });
    }
    const start = this.next;
    this.next += clusters;
    const grown = new Float64Array(clusters * perCluster);
    grown.set(this.table);
    this.superseded.push({ offset: this.tableOffset, length: this.tableClusters * this.cs });
    this.table = grown;
    this.tableOffset = start * this.cs;
    this.tableClusters = clusters;
    this.relocated = true;
    for (let c = start; c < start + clusters; c++) {
      await this.ensureBlock(Math.floor(c / this.perBlock));
      await this.increment(c);
    }
  }

  private async increment(cluster: number): Promise<void> {
    const block = await this.block(Math.floor(cluster / this.perBlock));
    const i = cluster % this.perBlock;
    const count = readRefcount(block.data, i, this.bits);
    if (count >= maxRefcount(this.bits)) throw new UnsupportedFeatureError(`cluster ${cluster} already has the largest refcount ${this.bits}-bit entries hold`, { file: this.file, field: 'refcount_bits' });
    writeRefcount(block.data, i, this.bits, count + 1);
    this.markDirty(block);
  }

  private markDirty(block: RefBlock): void {
    if (block.dirty) return;
    block.dirty = true;
    this.dirtyBlocks++;
  }

  private async block(index: number): Promise<RefBlock> {
    const cached = this.blocks.get(index);
    if (cached) {
      this.blocks.delete(index);
      this.blocks.set(index, cached);
      return cached;
    }
    let loading = this.loading.get(index);
    if (!loading) {
      loading = (async () => {
        const host = this.table[index];
        const data = Buffer.alloc(this.cs);
        await readFully(this.handle, data, 0, this.cs, host);
        const block: RefBlock = { host, data, dirty: false };
        // Room is made before the new block goes in, so the block the caller is about to change stays cached.
        this.trim(1);
        this.blocks.set(index, block);
        return block;
      })().finally(() => this.loading.delete(index));
      this.loading.set(index, loading);
    }
    return loading;
  }

  private async writeAt(data: Buffer, position: number): Promise<void> {
    let done = 0;
    while (done < data.length) done += (await this.handle.write(data, done, data.length - done, position + done)).bytesWritten;
  }

  private corrupt(msg: string): CorruptImageError {
    return new CorruptImageError(msg, { file: this.file, field: 'refcount' });
  }
}

function maxRefcount(bits: number): number {
  return bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
}
