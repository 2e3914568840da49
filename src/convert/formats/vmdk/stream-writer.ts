import { Codec, native } from '../../../native.js';
import type { DiskWriter } from '../../disk.js';
import type { OutputFile } from '../../output-file.js';
import {
  COMPRESSION_DEFLATE,
  FLAG_COMPRESSED,
  FLAG_MARKERS,
  FLAG_NEWLINE_TEST,
  FLAG_ZEROED_GRAIN,
  GD_AT_END,
  GRAIN_MARKER_BYTES,
  MARKER_END_OF_STREAM,
  MARKER_FOOTER,
  MARKER_GRAIN_DIRECTORY,
  MARKER_GRAIN_TABLE,
  MAX_GTES_PER_GT,
  MAX_SPARSE_SECTORS,
  SECTOR,
  encodeMarker,
  encodeSparseHeader,
  type NewSparseHeader,
} from './layout.js';
import { DESCRIPTOR_SECTORS, GRAIN_SECTORS, GRAIN_SIZE } from './sparse-writer.js';

/** zlib's default level, which QEMU's compress() uses. */
const ZLIB_LEVEL = 6;
/** Room for one compressed grain: above zlib's worst-case expansion of incompressible data. */
const COMPRESSED_STRIDE = GRAIN_SIZE + GRAIN_SIZE / 8 + 1024;
const GT_SECTORS = (MAX_GTES_PER_GT * 4) / SECTOR;
const GT_COVERAGE = MAX_GTES_PER_GT * GRAIN_SIZE;
/** A grain table in the stream: its marker sector and the table. */
const TABLE_BYTES = (1 + GT_SECTORS) * SECTOR;

interface CompressedChunk {
  out: Buffer;
  sizes: Uint32Array;
}

/** A placed chunk: its I/O runs on, while the next chunk is placed behind it. */
interface Placed {
  io: Promise<void>;
}

/**
 * streamOptimized as VMware's spec lays it out for OVF import (which QEMU reads too): a version 3 header
 * whose grain directory is "at end", the descriptor, compressed grains each behind a grain marker, each
 * grain table behind its marker once its range is complete, then the grain directory, the footer and the
 * end-of-stream marker. Grains are compressed as soon as a chunk arrives, several chunks at once on the
 * libuv pool; a promise chain then appends the results in call order, which is the guest order.
 */
export class StreamOptimizedWriter implements DiskWriter {
  readonly granularity = GRAIN_SIZE;
  readonly sequential = true;
  readonly zeroInitialized = true;
  private readonly gd: Uint32Array;
  private readonly capacity: number;
  /** The grain table being filled: only one is open at a time, since grains arrive in order. */
  private table?: { index: number; entries: Buffer };
  /** Next free sector of the file. */
  private cursor = GRAIN_SECTORS;
  private expectedFrom = 0;
  private chain: Promise<void> = Promise.resolve();
  private readonly pendingIo = new Set<Promise<void>>();
  private failed?: unknown;

  constructor(
    private readonly out: OutputFile,
    readonly virtualSize: number,
    private readonly descriptor: string,
    private readonly zeroedGrain: boolean,
    private readonly durable: boolean,
  ) {
    this.capacity = Math.ceil(virtualSize / SECTOR);
    this.gd = new Uint32Array(Math.ceil(this.capacity / (GRAIN_SECTORS * MAX_GTES_PER_GT)));
  }

  get path(): string {
    return this.out.finalPath;
  }

  write(offset: number, data: Buffer): Promise<void> {
    try {
      this.claim(offset, data.length);
    } catch (err) {
      return Promise.reject(err);
    }
    const compressed = compressGrains(data);
    const placed = this.chain.then(async () => this.place(offset, await compressed));
    this.chain = placed.then(
      () => undefined,
      (err) => {
        this.failed ??= err;
      },
    );
    return placed.then((p) => p.io);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    // Unwritten grains read as zeroes; only the order is checked.
    this.claim(offset, length);
  }

  /** Checks alignment and that ranges come in ascending order, and records the range as taken. */
  private claim(offset: number, length: number): void {
    if (this.failed) throw this.failed;
    const end = offset + length;
    if (offset % GRAIN_SIZE !== 0 || (end % GRAIN_SIZE !== 0 && end !== this.virtualSize) || end > this.virtualSize) {
      throw new RangeError(`streamOptimized writer: range ${offset}+${length} is not aligned to grains or exceeds the disk`);
    }
    if (offset < this.expectedFrom) throw new RangeError(`streamOptimized writer: range at ${offset} arrives after ${this.expectedFrom}`);
    this.expectedFrom = end;
  }

  /** Lays out one chunk's grains (and any grain table completed before them) and starts writing it. */
  private place(offset: number, chunk: CompressedChunk): Placed {
    if (this.failed) throw this.failed;
    const { sizes } = chunk;
    // One buffer for the whole chunk: grains padded to sectors, plus room for the tables it may complete.
    let bound = (Math.ceil(sizes.length / MAX_GTES_PER_GT) + 1) * TABLE_BYTES;
    for (const size of sizes) bound += Math.ceil((GRAIN_MARKER_BYTES + size) / SECTOR) * SECTOR;
    const buf = Buffer.alloc(bound);
    const start = this.cursor;
    let used = 0;
    for (let k = 0; k < sizes.length; k++) {
      const guest = offset + k * GRAIN_SIZE;
      const gtIndex = Math.floor(guest / GT_COVERAGE);
      if (this.table && this.table.index !== gtIndex) used += this.closeTable().copy(buf, used);
      this.table ??= { index: gtIndex, entries: Buffer.alloc(GT_SECTORS * SECTOR) };
      const size = sizes[k];
      if (size === 0) throw new RangeError('streamOptimized writer: a grain did not fit its compression buffer');
      buf.writeBigUInt64LE(BigInt(guest / SECTOR), used);
      buf.writeUInt32LE(size, used + 8);
      chunk.out.copy(buf, used + GRAIN_MARKER_BYTES, k * COMPRESSED_STRIDE, k * COMPRESSED_STRIDE + size);
      this.table.entries.writeUInt32LE(this.cursor, ((guest / GRAIN_SIZE) % MAX_GTES_PER_GT) * 4);
      const padded = Math.ceil((GRAIN_MARKER_BYTES + size) / SECTOR) * SECTOR;
      this.advance(padded / SECTOR);
      used += padded;
    }
    return { io: this.track(this.out.writeAt(buf.subarray(0, used), start * SECTOR)) };
  }

  /** The open grain table behind its marker; its directory entry points past the marker. */
  private closeTable(): Buffer {
    const { index, entries } = this.table!;
    this.table = undefined;
    this.gd[index] = this.cursor + 1;
    this.advance(1 + GT_SECTORS);
    return Buffer.concat([encodeMarker(GT_SECTORS, MARKER_GRAIN_TABLE), entries]);
  }

  private advance(sectors: number): void {
    this.cursor += sectors;
    // Grain table entries are 32-bit sector numbers.
    if (this.cursor >= MAX_SPARSE_SECTORS) throw new RangeError('streamOptimized writer: the file would exceed 2 TiB of sectors');
  }

  private track(io: Promise<void>): Promise<void> {
    this.pendingIo.add(io);
    const done = io.finally(() => this.pendingIo.delete(io));
    done.catch((err) => {
      this.failed ??= err;
    });
    return done;
  }

  async finish(): Promise<void> {
    try {
      await this.chain;
      if (this.failed) throw this.failed;
      const pieces: Buffer[] = [];
      const start = this.cursor;
      if (this.table) pieces.push(this.closeTable());
      const gdSectors = Math.ceil((this.gd.length * 4) / SECTOR);
      const gd = Buffer.alloc(gdSectors * SECTOR);
      this.gd.forEach((sector, i) => gd.writeUInt32LE(sector, i * 4));
      pieces.push(encodeMarker(gdSectors, MARKER_GRAIN_DIRECTORY));
      const gdSector = this.cursor + 1;
      this.advance(1 + gdSectors);
      pieces.push(gd, encodeMarker(1, MARKER_FOOTER), encodeSparseHeader(this.header(BigInt(gdSector))), encodeMarker(0, MARKER_END_OF_STREAM));
      this.advance(3);
      await Promise.all([
        this.track(this.out.writeAt(Buffer.concat(pieces), start * SECTOR)),
        this.track(this.out.writeAt(encodeSparseHeader(this.header(GD_AT_END)), 0)),
        this.track(this.out.writeAt(Buffer.from(this.descriptor), SECTOR)),
      ]);
      await Promise.all(this.pendingIo);
      if (this.failed) throw this.failed;
      await this.out.commit(this.durable);
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  private header(gdOffset: bigint): NewSparseHeader {
    return {
      version: 3,
      flags: FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS | (this.zeroedGrain ? FLAG_ZEROED_GRAIN : 0),
      capacity: this.capacity,
      grainSectors: GRAIN_SECTORS,
      descriptorOffset: 1,
      descriptorSectors: DESCRIPTOR_SECTORS,
      gtesPerGt: MAX_GTES_PER_GT,
      rgdOffset: 0,
      gdOffset,
      grainOffset: GRAIN_SECTORS,
      compressAlgorithm: COMPRESSION_DEFLATE,
    };
  }

  async abort(): Promise<void> {
    await this.chain;
    await Promise.allSettled([...this.pendingIo]);
    await this.out.discard();
  }
}

/** Starts compressing every grain of `data` on the libuv pool; a short last grain is compressed short, as QEMU does. */
async function compressGrains(data: Buffer): Promise<CompressedChunk> {
  const full = Math.floor(data.length / GRAIN_SIZE);
  const rest = data.length - full * GRAIN_SIZE;
  const count = full + (rest ? 1 : 0);
  const out = Buffer.allocUnsafe(count * COMPRESSED_STRIDE);
  const sizes = new Uint32Array(count);
  const jobs: Array<Promise<number>> = [];
  if (full) jobs.push(native.compressBlocks(Codec.Zlib, ZLIB_LEVEL, data, GRAIN_SIZE, full, out, COMPRESSED_STRIDE, COMPRESSED_STRIDE, sizes));
  if (rest) {
    // The capacity is whole sectors: a disk size that is not is zero-padded to the sector.
    const tailBytes = Math.ceil(rest / SECTOR) * SECTOR;
    const tail = Buffer.alloc(tailBytes);
    data.copy(tail, 0, full * GRAIN_SIZE);
    const at = full * COMPRESSED_STRIDE;
    jobs.push(native.compressBlocks(Codec.Zlib, ZLIB_LEVEL, tail, tailBytes, 1, out.subarray(at), COMPRESSED_STRIDE, COMPRESSED_STRIDE, sizes.subarray(full)));
  }
  await Promise.all(jobs);
  return { out, sizes };
}
