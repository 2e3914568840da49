import { InvalidOptionError } from '../../../errors.js';
import { Codec, native } from '../../../native.js';
import type { DiskWriter } from '../../disk.js';
import { OutputFile, readFully } from '../../output-file.js';
import {
  COMPAT_LAZY_REFCOUNTS,
  COPIED,
  EXT_BACKING_FORMAT,
  EXT_END,
  EXT_FEATURE_TABLE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_EXTL2,
  QCOW2_MAGIC,
  SUBCLUSTERS,
  V2_HEADER_LENGTH,
  V3_HEADER_LENGTH_WITH_COMPRESSION,
  compressedDescriptor,
  writeRefcount,
  type CompressionType,
} from './layout.js';
import { planLayout, type Qcow2Geometry } from './geometry.js';

export interface Qcow2WriterOptions {
  version: 2 | 3;
  clusterSize: number;
  refcountBits: number;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  compressionType: CompressionType;
  /** Compress every cluster that shrinks (qemu-img convert -c). */
  compress: boolean;
  compressionLevel: number;
  backingFile?: string;
  backingFormat?: string;
  durable: boolean;
}

/** Dirty L2 tables kept in memory before the oldest is written back. */
const L2_CACHE_BYTES = 32 * 1024 * 1024;

interface L2Slot {
  host: number;
  table: Buffer;
  dirty: boolean;
}

interface RefBlock {
  host: number;
  counts: Uint32Array;
}

/**
 * Writes a qcow2 image in one pass with exact refcounts, so `qemu-img check` finds no errors and no leaks.
 *
 * Layout: cluster 0 header, then the refcount table and the L1 table (both sized up front for the worst
 * case), then data, L2 tables and refcount blocks from a bump allocator. Because clusters are only ever
 * allocated at the end, a refcount block is final once allocation has moved past the clusters it covers,
 * and it is written out and dropped then: memory stays bounded whatever the image size.
 */
export class Qcow2Writer implements DiskWriter {
  readonly sequential = false;
  readonly granularity: number;
  readonly zeroInitialized: boolean;
  private readonly cs: number;
  private readonly geo: Qcow2Geometry;
  private readonly l1: Buffer;
  private readonly reftable: Float64Array;
  private readonly l2 = new Map<number, L2Slot>();
  private readonly l2Evicted = new Map<number, number>();
  private readonly l2Loading = new Map<number, Promise<L2Slot>>();
  private readonly refblocks = new Map<number, RefBlock>();
  private readonly pendingIo = new Set<Promise<void>>();
  private readonly refcountsPerBlock: number;
  private readonly maxRefcount: number;
  private readonly entryBytes: number;
  private readonly subclusterSize: number;
  /** Next free host cluster. */
  private nextCluster: number;
  /** Byte cursor and limit of the area being filled with compressed clusters. */
  private packCursor = 0;
  private packLimit = 0;
  private failed?: unknown;

  constructor(
    private readonly out: OutputFile,
    readonly virtualSize: number,
    private readonly opts: Qcow2WriterOptions,
  ) {
    this.cs = opts.clusterSize;
    this.geo = planLayout(virtualSize, opts.clusterSize, opts.refcountBits, opts.extendedL2);
    this.entryBytes = opts.extendedL2 ? 16 : 8;
    this.subclusterSize = opts.extendedL2 ? this.cs / SUBCLUSTERS : this.cs;
    this.granularity = opts.compress ? this.cs : this.subclusterSize;
    this.zeroInitialized = !opts.backingFile;
    this.l1 = Buffer.alloc(this.geo.l1Entries * 8);
    this.reftable = new Float64Array(this.geo.reftableClusters * (this.cs / 8));
    this.refcountsPerBlock = (this.cs * 8) / opts.refcountBits;
    this.maxRefcount = opts.refcountBits >= 32 ? 2 ** 32 - 1 : 2 ** opts.refcountBits - 1;
    // Header, refcount table and L1 table sit at fixed places before anything the allocator hands out.
    this.nextCluster = this.geo.firstFreeCluster;
    for (let c = 0; c < this.geo.firstFreeCluster; c++) {
      this.ensureRefblock(Math.floor(c / this.refcountsPerBlock));
      this.addRef(c);
    }
  }

  get path(): string {
    return this.out.finalPath;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    if (this.opts.compress) await this.writeCompressed(offset, data);
    else await this.writePlain(offset, data);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    if (this.zeroInitialized) return;
    // Over a backing file, zeroes must be recorded: v3 has a zero flag, v2 needs real zero clusters.
    if (this.opts.version === 3 && !this.opts.extendedL2) {
      for (let pos = offset; pos < offset + length; pos += this.cs) {
        const slot = await this.l2For(pos);
        const i = this.l2Index(pos) * this.entryBytes;
        slot.table.writeBigUInt64BE(1n, i);
        slot.dirty = true;
      }
      return;
    }
    const zero = Buffer.alloc(Math.min(length, 4 * 1024 * 1024));
    for (let pos = offset; pos < offset + length; pos += zero.length) {
      await this.writePlain(pos, zero.subarray(0, Math.min(zero.length, offset + length - pos)));
    }
  }

  private checkRange(offset: number, length: number): void {
    if (this.failed) throw this.failed;
    const end = offset + length;
    if (offset % this.granularity !== 0 || (end % this.granularity !== 0 && end !== this.virtualSize) || end > this.virtualSize) {
      throw new RangeError(`qcow2 writer: range ${offset}+${length} is not aligned to ${this.granularity} bytes or exceeds the disk`);
    }
  }

  private async writePlain(offset: number, data: Buffer): Promise<void> {
    const end = offset + data.length;
    // L2 tables first, so the data clusters that follow them are contiguous in the file.
    for (let pos = offset; pos < end; pos = (Math.floor(pos / this.geo.l2Coverage) + 1) * this.geo.l2Coverage) await this.l2For(pos);
    const writes: Array<{ host: number; from: number; to: number }> = [];
    for (let pos = offset; pos < end; ) {
      const clusterStart = pos - (pos % this.cs);
      const stop = Math.min(end, clusterStart + this.cs);
      const slot = this.l2.get(this.l1Index(pos))!;
      const at = this.l2Index(pos) * this.entryBytes;
      let host = readHost(slot.table, at);
      if (host === 0) {
        host = this.allocateCluster(true) * this.cs;
        slot.table.writeBigUInt64BE(BigInt(host) | COPIED, at);
      }
      if (this.opts.extendedL2) {
        const first = (pos - clusterStart) / this.subclusterSize;
        const last = Math.ceil((stop - clusterStart) / this.subclusterSize);
        let mask = slot.table.readUInt32BE(at + 12);
        for (let b = first; b < last; b++) mask |= 1 << b;
        slot.table.writeUInt32BE(mask >>> 0, at + 12);
        slot.table.writeUInt32BE(0, at + 8);
      }
      slot.dirty = true;
      const hostPos = host + (pos - clusterStart);
      const prev = writes[writes.length - 1];
      if (prev && prev.host + (prev.to - prev.from) === hostPos) prev.to += stop - pos;
      else writes.push({ host: hostPos, from: pos - offset, to: stop - offset });
      pos = stop;
    }
    this.flushFinishedRefblocks();
    await Promise.all(writes.map((w) => this.out.writeAt(data.subarray(w.from, w.to), w.host)));
  }

  private async writeCompressed(offset: number, data: Buffer): Promise<void> {
    const cs = this.cs;
    const count = Math.ceil(data.length / cs);
    let src = data;
    if (data.length % cs) {
      // The last cluster of an odd-sized disk is compressed as a whole, zero-padded cluster.
      src = Buffer.alloc(count * cs);
      data.copy(src);
    }
    // Capacity cs - 1: a cluster that does not shrink below the cluster size is stored plainly, as QEMU does.
    const compressed = Buffer.allocUnsafe(count * cs);
    const sizes = new Uint32Array(count);
    await native.compressBlocks(
      this.opts.compressionType === 'zstd' ? Codec.Zstd : Codec.Deflate,
      this.opts.compressionLevel,
      src,
      cs,
      count,
      compressed,
      cs,
      cs - 1,
      sizes,
    );
    for (let pos = offset; pos < offset + data.length; pos = (Math.floor(pos / this.geo.l2Coverage) + 1) * this.geo.l2Coverage) await this.l2For(pos);

    const writes: Array<{ host: number; buf: Buffer }> = [];
    const push = (host: number, buf: Buffer) => {
      const prev = writes[writes.length - 1];
      if (prev && prev.host + prev.buf.length === host && prev.buf.buffer === buf.buffer && prev.buf.byteOffset + prev.buf.length === buf.byteOffset) {
        prev.buf = Buffer.from(buf.buffer, prev.buf.byteOffset, prev.buf.length + buf.length);
      } else writes.push({ host, buf });
    };
    for (let k = 0; k < count; k++) {
      const guest = offset + k * cs;
      const slot = this.l2.get(this.l1Index(guest))!;
      const at = this.l2Index(guest) * this.entryBytes;
      if (readHost(slot.table, at) !== 0 || slot.table.readBigUInt64BE(at) !== 0n) {
        throw new RangeError(`qcow2 writer: guest cluster at ${guest} written twice in compressed mode`);
      }
      const size = sizes[k];
      if (size === 0) {
        const host = this.allocateCluster(true) * cs;
        slot.table.writeBigUInt64BE(BigInt(host) | COPIED, at);
        if (this.opts.extendedL2) slot.table.writeUInt32BE(0xffffffff, at + 12);
        writes.push({ host, buf: src.subarray(k * cs, k * cs + cs) });
      } else {
        const host = this.placeCompressed(size);
        slot.table.writeBigUInt64BE(compressedDescriptor(host, size, Math.log2(cs)), at);
        push(host, compressed.subarray(k * cs, k * cs + size));
      }
      slot.dirty = true;
    }
    this.flushFinishedRefblocks();
    await Promise.all(writes.map((w) => this.out.writeAt(w.buf, w.host)));
  }

  /** Reserves `size` bytes for a compressed cluster, packed tightly after the previous one. */
  private placeCompressed(size: number): number {
    if (this.packCursor + size > this.packLimit) {
      const cluster = this.allocateCluster(false);
      if (cluster * this.cs === this.packLimit) this.packLimit += this.cs; // contiguous: span into it
      else {
        this.packCursor = cluster * this.cs;
        this.packLimit = this.packCursor + this.cs;
      }
    }
    const host = this.packCursor;
    this.packCursor += size;
    // Refcounts follow what qemu-img check counts: every cluster the descriptor's sectors touch, once per descriptor.
    const sectorStart = host - (host % 512);
    const sectorEnd = Math.ceil((host + size) / 512) * 512;
    for (let c = Math.floor(sectorStart / this.cs); c * this.cs < sectorEnd; c++) this.addRef(c);
    return host;
  }

  private l1Index(guest: number): number {
    return Math.floor(guest / this.geo.l2Coverage);
  }

  private l2Index(guest: number): number {
    return Math.floor((guest % this.geo.l2Coverage) / this.cs);
  }

  /** The L2 table covering `guest`, allocated on first use, reloaded if it was written back. */
  private async l2For(guest: number): Promise<L2Slot> {
    const index = this.l1Index(guest);
    const slot = this.l2.get(index);
    if (slot) return slot;
    const evictedAt = this.l2Evicted.get(index);
    if (evictedAt === undefined) {
      const host = this.allocateCluster(true) * this.cs;
      const fresh: L2Slot = { host, table: Buffer.alloc(this.cs), dirty: true };
      this.l1.writeBigUInt64BE(BigInt(host) | COPIED, index * 8);
      this.l2.set(index, fresh);
      this.evictIfNeeded();
      return fresh;
    }
    let loading = this.l2Loading.get(index);
    if (!loading) {
      loading = (async () => {
        await Promise.all(this.pendingIo);
        const table = Buffer.alloc(this.cs);
        await readFully(this.out.handle, table, 0, this.cs, evictedAt);
        const loaded: L2Slot = { host: evictedAt, table, dirty: false };
        this.l2Evicted.delete(index);
        this.l2.set(index, loaded);
        this.l2Loading.delete(index);
        this.evictIfNeeded();
        return loaded;
      })();
      this.l2Loading.set(index, loading);
    }
    return loading;
  }

  private evictIfNeeded(): void {
    const limit = Math.max(8, Math.floor(L2_CACHE_BYTES / this.cs));
    while (this.l2.size > limit) {
      const [index, slot] = this.l2.entries().next().value as [number, L2Slot];
      this.l2.delete(index);
      this.l2Evicted.set(index, slot.host);
      if (slot.dirty) this.track(this.out.writeAt(slot.table, slot.host));
    }
  }

  private track(io: Promise<void>): void {
    const p = io.catch((err) => {
      this.failed ??= err;
    });
    this.pendingIo.add(p);
    void p.finally(() => this.pendingIo.delete(p));
  }

  /** Takes the next host cluster; `counted` clusters get refcount 1, compressed-data clusters are counted per descriptor. */
  private allocateCluster(counted: boolean): number {
    const cluster = this.nextCluster++;
    if (cluster >= this.geo.maxClusters) throw new RangeError('qcow2 writer: host cluster estimate exceeded');
    this.ensureRefblock(Math.floor(cluster / this.refcountsPerBlock));
    if (counted) this.addRef(cluster);
    return cluster;
  }

  private ensureRefblock(block: number): void {
    if (this.reftable[block]) return;
    const cluster = this.nextCluster++;
    this.reftable[block] = cluster * this.cs;
    this.refblocks.set(block, { host: cluster * this.cs, counts: new Uint32Array(this.refcountsPerBlock) });
    this.ensureRefblock(Math.floor(cluster / this.refcountsPerBlock));
    this.addRef(cluster);
  }

  private addRef(cluster: number): void {
    const block = this.refblocks.get(Math.floor(cluster / this.refcountsPerBlock));
    if (!block) throw new RangeError(`qcow2 writer: refcount block for cluster ${cluster} already written`);
    const i = cluster % this.refcountsPerBlock;
    if (block.counts[i] >= this.maxRefcount) {
      throw new InvalidOptionError(`refcount_bits=${this.opts.refcountBits} is too small for this image (a cluster needs refcount ${block.counts[i] + 1})`, {
        field: 'refcount_bits',
      });
    }
    block.counts[i]++;
  }

  /** Writes out refcount blocks that allocation has moved past: nothing can change them any more. */
  private flushFinishedRefblocks(): void {
    const open = Math.min(this.nextCluster, Math.floor(this.packCursor / this.cs) || this.nextCluster);
    for (const [index, block] of this.refblocks) {
      if ((index + 1) * this.refcountsPerBlock > open) continue;
      this.refblocks.delete(index);
      this.track(this.out.writeAt(this.encodeRefblock(block.counts), block.host));
    }
  }

  private encodeRefblock(counts: Uint32Array): Buffer {
    const buf = Buffer.alloc(this.cs);
    counts.forEach((count, i) => count && writeRefcount(buf, i, this.opts.refcountBits, count));
    return buf;
  }

  async finish(): Promise<void> {
    try {
      if (this.failed) throw this.failed;
      const writes: Array<Promise<void>> = [];
      for (const slot of this.l2.values()) if (slot.dirty) writes.push(this.out.writeAt(slot.table, slot.host));
      for (const block of this.refblocks.values()) writes.push(this.out.writeAt(this.encodeRefblock(block.counts), block.host));
      this.refblocks.clear();
      const reftable = Buffer.alloc(this.geo.reftableClusters * this.cs);
      this.reftable.forEach((v, i) => v && reftable.writeBigUInt64BE(BigInt(v), i * 8));
      writes.push(this.out.writeAt(reftable, this.geo.reftableOffset));
      writes.push(this.out.writeAt(this.l1, this.geo.l1Offset));
      writes.push(this.out.writeAt(this.headerCluster(), 0));
      await Promise.all(writes);
      await Promise.all(this.pendingIo);
      if (this.failed) throw this.failed;
      // The file must reach the end of the last allocated cluster, even where its tail was never written.
      const end = this.nextCluster * this.cs;
      const { size } = await this.out.handle.stat();
      if (size < end) await this.out.handle.truncate(end);
      await this.out.commit(this.opts.durable);
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  async abort(): Promise<void> {
    await Promise.allSettled([...this.pendingIo]);
    await this.out.discard();
  }

  private headerCluster(): Buffer {
    const o = this.opts;
    const buf = Buffer.alloc(this.cs);
    buf.writeUInt32BE(QCOW2_MAGIC, 0);
    buf.writeUInt32BE(o.version, 4);
    buf.writeUInt32BE(Math.log2(this.cs), 20);
    buf.writeBigUInt64BE(BigInt(this.virtualSize), 24);
    buf.writeUInt32BE(0, 32);
    buf.writeUInt32BE(this.geo.l1Entries, 36);
    buf.writeBigUInt64BE(BigInt(this.geo.l1Offset), 40);
    buf.writeBigUInt64BE(BigInt(this.geo.reftableOffset), 48);
    buf.writeUInt32BE(this.geo.reftableClusters, 56);
    let at = V2_HEADER_LENGTH;
    if (o.version === 3) {
      let incompatible = 0n;
      if (o.compressionType === 'zstd') incompatible |= INCOMPAT_COMPRESSION;
      if (o.extendedL2) incompatible |= INCOMPAT_EXTL2;
      buf.writeBigUInt64BE(incompatible, 72);
      buf.writeBigUInt64BE(o.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n, 80);
      buf.writeBigUInt64BE(0n, 88);
      buf.writeUInt32BE(Math.log2(o.refcountBits), 96);
      buf.writeUInt32BE(V3_HEADER_LENGTH_WITH_COMPRESSION, 100);
      buf[104] = o.compressionType === 'zstd' ? 1 : 0;
      at = V3_HEADER_LENGTH_WITH_COMPRESSION;
    }
    const ext = (type: number, data: Buffer) => {
      buf.writeUInt32BE(type, at);
      buf.writeUInt32BE(data.length, at + 4);
      data.copy(buf, at + 8);
      at += 8 + Math.ceil(data.length / 8) * 8;
    };
    const backingName = Buffer.from(o.backingFile ?? '');
    if (o.backingFormat) ext(EXT_BACKING_FORMAT, Buffer.from(o.backingFormat));
    // The feature table is optional: leave it out where small clusters leave no room for it.
    const table = featureTable();
    if (o.version === 3 && at + 8 + table.length + 8 + backingName.length <= this.cs) ext(EXT_FEATURE_TABLE, table);
    ext(EXT_END, Buffer.alloc(0));
    if (backingName.length) {
      if (at + backingName.length > this.cs) throw new InvalidOptionError('backing file name does not fit in the header cluster', { field: 'backing_file' });
      buf.writeBigUInt64BE(BigInt(at), 8);
      buf.writeUInt32BE(backingName.length, 16);
      backingName.copy(buf, at);
    }
    return buf;
  }
}

function readHost(table: Buffer, at: number): number {
  return (table.readUInt32BE(at) & 0x00ffffff) * 2 ** 32 + (table.readUInt32BE(at + 4) & 0xfffffe00);
}

/** The feature name table QEMU writes, so tools can name the bits. */
function featureTable(): Buffer {
  const names: Array<[number, number, string]> = [
    [0, 0, 'dirty bit'],
    [0, 1, 'corrupt bit'],
    [0, 2, 'external data file'],
    [0, 3, 'compression type'],
    [0, 4, 'extended L2 entries'],
    [1, 0, 'lazy refcounts'],
    [2, 0, 'bitmaps'],
    [2, 1, 'raw external data'],
  ];
  const buf = Buffer.alloc(names.length * 48);
  names.forEach(([type, bit, name], i) => {
    buf[i * 48] = type;
    buf[i * 48 + 1] = bit;
    buf.write(name, i * 48 + 2, 46, 'utf8');
  });
  return buf;
}
