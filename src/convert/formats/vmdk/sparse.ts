/**
 * Reading one sparse extent (hosted "KDMV" or ESX "COWD"): the grain directory in memory, grain tables
 * through a bounded cache shared by all extents of an image, plain grains read in contiguous runs and
 * compressed grains fetched in few large reads and inflated in one native batch.
 */
import type { FileHandle } from 'node:fs/promises';
import { CorruptImageError } from '../../../errors.js';
import { Codec, native } from '../../../native.js';
import type { Extent } from '../../disk.js';
import { readFully } from '../../output-file.js';
import { GRAIN_MARKER_BYTES, GTE_ZEROED, SECTOR, type SparseGeometry } from './layout.js';

/** Grain tables kept in memory per image. */
const GT_CACHE_BYTES = 16 * 1024 * 1024;
/** Compressed grains closer than this in the file are fetched with one read. */
const COMPRESSED_READ_GAP = 64 * 1024;
/** Upper bound of one batched read of compressed grains, so a read's memory stays small. */
const COMPRESSED_READ_SPAN = 16 * 1024 * 1024;

/** Grain tables of every sparse extent of one image, least recently used dropped first. */
export class GrainTableCache {
  private readonly tables = new Map<number, Buffer>();
  private readonly loading = new Map<number, Promise<Buffer>>();
  private bytes = 0;

  async get(key: number, load: () => Promise<Buffer>): Promise<Buffer> {
    const cached = this.tables.get(key);
    if (cached) {
      this.tables.delete(key);
      this.tables.set(key, cached);
      return cached;
    }
    let pending = this.loading.get(key);
    if (!pending) {
      pending = load()
        .then((table) => {
          this.tables.set(key, table);
          this.bytes += table.length;
          for (const [k, t] of this.tables) {
            if (this.bytes <= GT_CACHE_BYTES) break;
            this.tables.delete(k);
            this.bytes -= t.length;
          }
          return table;
        })
        .finally(() => this.loading.delete(key));
      this.loading.set(key, pending);
    }
    return pending;
  }
}

type GrainKind = 'unallocated' | 'zero' | 'plain' | 'compressed';

interface CompressedGrain {
  /** Grain start, relative to the extent. */
  start: number;
  host: number;
  /** Bytes the grain inflates to: the grain size, or less for the last grain of an odd-sized extent. */
  size: number;
  /** The part of the grain wanted and where it goes. */
  from: number;
  to: number;
  at: number;
}

/** A compressed grain and where its compressed bytes are in the buffer read for its group. */
interface LocatedGrain {
  grain: CompressedGrain;
  offset: number;
  length: number;
}

export class SparseExtent {
  private readonly grainSize: number;
  private readonly gtCoverage: number;
  private readonly gtBytes: number;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    private readonly fileSize: number,
    readonly geometry: SparseGeometry,
    private readonly gd: Uint32Array,
    private readonly cache: GrainTableCache,
    /** Distinguishes this extent's tables in the shared cache. */
    private readonly cacheKey: number,
  ) {
    this.grainSize = geometry.grainSize;
    this.gtCoverage = geometry.gtesPerGt * geometry.grainSize;
    this.gtBytes = geometry.gtesPerGt * 4;
  }

  /** Loads and checks the grain directory: every grain table it names must lie inside the file. */
  static async open(
    path: string,
    handle: FileHandle,
    fileSize: number,
    geometry: SparseGeometry,
    cache: GrainTableCache,
    cacheKey: number,
  ): Promise<SparseExtent> {
    const raw = Buffer.alloc(geometry.gdEntries * 4);
    const got = await readFully(handle, raw, 0, raw.length, geometry.gdOffset);
    if (got < raw.length) {
      throw new CorruptImageError(`grain directory at ${geometry.gdOffset} is cut short by the end of the file`, { file: path, field: 'gdOffset' });
    }
    const gd = new Uint32Array(geometry.gdEntries);
    const gtBytes = geometry.gtesPerGt * 4;
    for (let i = 0; i < gd.length; i++) {
      const sector = raw.readUInt32LE(i * 4);
      if (sector !== 0 && sector * SECTOR + gtBytes > fileSize) {
        throw new CorruptImageError(`grain directory entry ${i}: grain table at ${sector * SECTOR} lies past the end of the file`, {
          file: path,
          field: 'grain_directory',
        });
      }
      gd[i] = sector;
    }
    return new SparseExtent(path, handle, fileSize, geometry, gd, cache, cacheKey);
  }

  get length(): number {
    return this.geometry.capacity;
  }

  /** Allocation of [offset, offset+length) relative to the extent; plain grains carry their file offset. */
  async *status(offset: number, length: number): AsyncIterable<Extent> {
    const end = offset + length;
    // Runs of like grains are merged here, so a huge empty or dense extent costs few objects.
    let run: Extent | undefined;
    const extend = (ext: Extent): Extent | undefined => {
      if (run && run.kind === ext.kind && (run.hostOffset === undefined ? ext.hostOffset === undefined : run.hostOffset + run.length === ext.hostOffset)) {
        run.length += ext.length;
        return undefined;
      }
      const done = run;
      run = ext;
      return done;
    };
    for (let pos = offset; pos < end; ) {
      const gtIndex = Math.floor(pos / this.gtCoverage);
      const gtEnd = Math.min(end, (gtIndex + 1) * this.gtCoverage);
      const table = await this.table(gtIndex);
      if (!table) {
        const done = extend({ offset: pos, length: gtEnd - pos, kind: 'unallocated', depth: 0 });
        if (done) yield done;
        pos = gtEnd;
        continue;
      }
      while (pos < gtEnd) {
        const grain = Math.floor(pos / this.grainSize);
        const stop = Math.min(gtEnd, (grain + 1) * this.grainSize);
        const entry = table.readUInt32LE((grain % this.geometry.gtesPerGt) * 4);
        const kind = this.kindOf(entry, grain);
        const ext: Extent = { offset: pos, length: stop - pos, kind: kind === 'plain' || kind === 'compressed' ? 'data' : kind, depth: 0 };
        if (kind === 'plain') ext.hostOffset = entry * SECTOR + (pos - grain * this.grainSize);
        const done = extend(ext);
        if (done) yield done;
        pos = stop;
      }
    }
    if (run) yield run;
  }

  /** Reads [offset, offset+length) of the extent into `into` at `at`; unallocated grains read as zeroes. */
  async read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    const end = offset + length;
    const reads: Array<Promise<void>> = [];
    const compressed: CompressedGrain[] = [];
    let run: { host: number; at: number; len: number } | undefined;
    const flush = () => {
      if (run) reads.push(this.readPlain(run.host, run.len, into, run.at));
      run = undefined;
    };
    for (let pos = offset; pos < end; ) {
      const gtIndex = Math.floor(pos / this.gtCoverage);
      const gtEnd = Math.min(end, (gtIndex + 1) * this.gtCoverage);
      const table = await this.table(gtIndex);
      if (!table) {
        flush();
        into.fill(0, at + (pos - offset), at + (gtEnd - offset));
        pos = gtEnd;
        continue;
      }
      while (pos < gtEnd) {
        const grain = Math.floor(pos / this.grainSize);
        const grainStart = grain * this.grainSize;
        const stop = Math.min(gtEnd, grainStart + this.grainSize);
        const dst = at + (pos - offset);
        const entry = table.readUInt32LE((grain % this.geometry.gtesPerGt) * 4);
        const kind = this.kindOf(entry, grain);
        if (kind === 'plain') {
          const host = entry * SECTOR + (pos - grainStart);
          if (run && run.host + run.len === host && run.at + run.len === dst) run.len += stop - pos;
          else {
            flush();
            run = { host, at: dst, len: stop - pos };
          }
        } else {
          flush();
          if (kind === 'compressed') {
            const size = Math.min(this.grainSize, this.geometry.capacity - grainStart);
            compressed.push({ start: grainStart, host: entry * SECTOR, size, from: pos - grainStart, to: stop - grainStart, at: dst });
          } else into.fill(0, dst, dst + (stop - pos));
        }
        pos = stop;
      }
    }
    flush();
    if (compressed.length) reads.push(this.readCompressed(compressed, into));
    await Promise.all(reads);
  }

  private async readPlain(host: number, len: number, into: Buffer, at: number): Promise<void> {
    const got = await readFully(this.handle, into, at, len, host);
    // A last grain cut short by the end of the file reads as zeroes, as in QEMU.
    if (got < len) into.fill(0, at + got, at + len);
  }

  /**
   * Groups compressed grains that lie close together in the file, reads each group at once and inflates
   * it in one native call. Groups run one after another so that a read's memory stays bounded.
   */
  private async readCompressed(grains: CompressedGrain[], into: Buffer): Promise<void> {
    const sorted = [...grains].sort((a, b) => a.host - b.host);
    // With markers the compressed size is in the marker; QEMU allows up to two grains of it.
    const maxSpan = this.geometry.markers ? GRAIN_MARKER_BYTES + 2 * this.grainSize : this.grainSize;
    for (let i = 0; i < sorted.length; ) {
      let j = i + 1;
      while (
        j < sorted.length &&
        sorted[j].size === sorted[i].size &&
        sorted[j].host - sorted[j - 1].host <= maxSpan + COMPRESSED_READ_GAP &&
        sorted[j].host + maxSpan - sorted[i].host <= COMPRESSED_READ_SPAN
      ) {
        j++;
      }
      await this.inflateGroup(sorted.slice(i, j), maxSpan, into);
      i = j;
    }
  }

  private async inflateGroup(group: CompressedGrain[], maxSpan: number, into: Buffer): Promise<void> {
    const base = group[0].host;
    const stop = Math.min(this.fileSize, group[group.length - 1].host + maxSpan);
    const src = Buffer.allocUnsafe(stop - base);
    const got = await readFully(this.handle, src, 0, src.length, base);
    const blockSize = group[0].size;
    // Whole grains inflate straight into the caller's buffer; only partly wanted ones need a scratch copy.
    const direct: LocatedGrain[] = [];
    const partial: LocatedGrain[] = [];
    for (const grain of group) {
      const located = { grain, ...this.locate(grain, src, got, base) };
      if (grain.from === 0 && grain.to === blockSize) direct.push(located);
      else partial.push(located);
    }
    const inflate = async (grains: LocatedGrain[], dst: Buffer, dstOffset: (g: CompressedGrain, k: number) => number) => {
      const triples = new Float64Array(grains.length * 3);
      grains.forEach(({ grain, offset, length }, k) => triples.set([offset, length, dstOffset(grain, k)], k * 3));
      try {
        await native.decompressBlocks(Codec.Zlib, src.subarray(0, got), triples, dst, blockSize);
      } catch (err) {
        throw new CorruptImageError(`compressed grain in the group at ${base} cannot be decompressed (${(err as Error).message})`, {
          file: this.path,
          field: 'compressed_grain',
        });
      }
    };
    const jobs: Array<Promise<void>> = [];
    if (direct.length) jobs.push(inflate(direct, into, (g) => g.at));
    if (partial.length) {
      const scratch = Buffer.allocUnsafe(partial.length * blockSize);
      const copyOut = () => partial.forEach(({ grain: g }, k) => scratch.copy(into, g.at, k * blockSize + g.from, k * blockSize + g.to));
      jobs.push(inflate(partial, scratch, (_g, k) => k * blockSize).then(copyOut));
    }
    await Promise.all(jobs);
  }

  /** Where a grain's compressed bytes lie in `src`, which was read from file offset `base`. */
  private locate(g: CompressedGrain, src: Buffer, got: number, base: number): { offset: number; length: number } {
    const off = g.host - base;
    if (!this.geometry.markers) return { offset: off, length: Math.min(this.grainSize, got - off) };
    if (off + GRAIN_MARKER_BYTES > got) throw this.badGrain(g, 'its grain marker is cut short by the end of the file');
    const length = src.readUInt32LE(off + 8);
    if (length === 0 || length > 2 * this.grainSize) throw this.badGrain(g, `grain marker gives an invalid compressed size of ${length} bytes`);
    if (off + GRAIN_MARKER_BYTES + length > got) throw this.badGrain(g, `${length} compressed bytes run past the end of the file`);
    return { offset: off + GRAIN_MARKER_BYTES, length };
  }

  private badGrain(g: CompressedGrain, why: string): CorruptImageError {
    return new CorruptImageError(`compressed grain at ${g.host} (guest offset ${g.start} of the extent): ${why}`, {
      file: this.path,
      field: 'compressed_grain',
    });
  }

  private kindOf(entry: number, grain: number): GrainKind {
    if (entry === 0) return 'unallocated';
    if (entry === GTE_ZEROED && this.geometry.zeroedGrain) return 'zero';
    if (entry * SECTOR >= this.fileSize) {
      throw new CorruptImageError(`grain table entry for grain ${grain} points to sector ${entry}, past the end of the file`, {
        file: this.path,
        field: 'grain_table_entry',
      });
    }
    return this.geometry.compressed ? 'compressed' : 'plain';
  }

  /** The grain table for `gtIndex`, or undefined when the directory entry is empty. */
  private async table(gtIndex: number): Promise<Buffer | undefined> {
    const sector = this.gd[gtIndex];
    if (!sector) return undefined;
    return this.cache.get(this.cacheKey + sector, async () => {
      const table = Buffer.allocUnsafe(this.gtBytes);
      const got = await readFully(this.handle, table, 0, table.length, sector * SECTOR);
      if (got < table.length) {
        throw new CorruptImageError(`grain table at ${sector * SECTOR} is cut short by the end of the file`, { file: this.path, field: 'grain_directory' });
      }
      return table;
    });
  }
}
