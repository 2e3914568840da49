import { open, type FileHandle } from 'node:fs/promises';
import { CorruptImageError } from '../../../errors.js';
import { Codec, native } from '../../../native.js';
import type { Extent, ExtentKind, FileReference, FormatDetails, ImageLayer } from '../../disk.js';
import type { OpenContext } from '../../format.js';
import { readFully } from '../../output-file.js';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  SUBCLUSTERS,
  l2Entries,
  readHeader,
  type HeaderExtensions,
  type Qcow2Header,
} from './layout.js';

/** L2 tables kept in memory per open image; enough for sequential reads of any size. */
const L2_CACHE_BYTES = 16 * 1024 * 1024;
/** Compressed clusters closer than this in the file are fetched with one read. */
const COMPRESSED_READ_GAP = 64 * 1024;

/** One guest cluster as its L2 entry describes it. */
interface ClusterInfo {
  kind: 'plain' | 'compressed' | 'zero' | 'unallocated' | 'mixed';
  hostOffset: number;
  /** compressed: bytes from hostOffset to the end of the last claimed sector */
  compressedLength: number;
  /** extended L2: per-subcluster bitmaps */
  allocMask: number;
  zeroMask: number;
}

interface CompressedRead {
  guest: number;
  info: ClusterInfo;
  /** index of the cluster's slot in the scratch buffer */
  slot: number;
}

const UNALLOCATED: ClusterInfo = { kind: 'unallocated', hostOffset: 0, compressedLength: 0, allocMask: 0, zeroMask: 0 };
const ZERO: ClusterInfo = { kind: 'zero', hostOffset: 0, compressedLength: 0, allocMask: 0, zeroMask: 0 };

export class Qcow2Layer implements ImageLayer {
  readonly format = 'qcow2';
  readonly virtualSize: number;
  readonly backing?: FileReference;
  private readonly clusterSize: number;
  private readonly entriesPerL2: number;
  private readonly subclusterSize: number;
  private readonly l2Cache = new Map<number, Buffer>();
  private readonly l2CacheLimit: number;
  private readonly l2Loading = new Map<number, Promise<Buffer>>();

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    private readonly fileSize: number,
    readonly header: Qcow2Header,
    readonly extensions: HeaderExtensions,
    private readonly l1: Float64Array,
    private readonly dataHandle: FileHandle,
    backing: FileReference | undefined,
  ) {
    this.virtualSize = header.virtualSize;
    this.clusterSize = header.clusterSize;
    this.entriesPerL2 = l2Entries(header);
    this.subclusterSize = header.extendedL2 ? header.clusterSize / SUBCLUSTERS : header.clusterSize;
    this.l2CacheLimit = Math.max(4, Math.floor(L2_CACHE_BYTES / header.clusterSize));
    this.backing = backing;
  }

  static async open(path: string, ctx: OpenContext): Promise<Qcow2Layer> {
    const handle = await open(path, 'r');
    try {
      const { fileSize, head, header, extensions } = await readHeader(handle, path);

      let backing: FileReference | undefined;
      if (header.backingFileOffset) {
        const name = head.subarray(header.backingFileOffset, header.backingFileOffset + header.backingFileSize).toString('utf8');
        if (name) backing = { name, format: extensions.backingFormat };
      }

      const l1 = await readL1(handle, header, fileSize, path);

      let dataHandle = handle;
      if (header.incompatible & INCOMPAT_DATA_FILE) {
        if (!extensions.dataFile) throw new CorruptImageError('external data file bit set but no data file name recorded', { file: path, field: 'data_file' });
        if (backing && header.autoclear & AUTOCLEAR_DATA_FILE_RAW) {
          throw new CorruptImageError('a raw external data file cannot have a backing file', { file: path, field: 'data_file' });
        }
          const dataPath = await ctx.resolve(path, extensions.dataFile, 'data file');
        dataHandle = await open(dataPath, 'r');
      }
      return new Qcow2Layer(path, handle, fileSize, header, extensions, l1, dataHandle, backing);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  get dataFd(): number {
    return this.dataHandle.fd;
  }

  get hasExternalData(): boolean {
    return this.dataHandle !== this.handle;
  }

  details(): FormatDetails {
    const h = this.header;
    const data: Record<string, unknown> = {
      compat: h.version === 3 ? '1.1' : '0.10',
      'compression-type': h.compressionType,
    };
    if (h.version === 3) data['lazy-refcounts'] = (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n;
    data['refcount-bits'] = 2 ** h.refcountOrder;
    if (h.version === 3) {
      data.corrupt = false;
      data['extended-l2'] = h.extendedL2;
    }
    if (this.extensions.dataFile) {
      data['data-file'] = this.extensions.dataFile;
      data['data-file-raw'] = (h.autoclear & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    }
    return { clusterSize: h.clusterSize, dirty: (h.incompatible & INCOMPAT_DIRTY) !== 0n, specific: { type: 'qcow2', data } };
  }

  async *blockStatus(offset: number, length: number): AsyncIterable<Extent> {
    const end = offset + length;
    const cs = this.clusterSize;
    let pending: Extent | undefined;
    let pos = offset;
    while (pos < end) {
      const cluster = Math.floor(pos / cs);
      const l1Index = Math.floor(cluster / this.entriesPerL2);
      if (this.l1[l1Index] === 0) {
        // A whole L2 table's range is unallocated: one step, however large the image.
        const stop = Math.min(end, (l1Index + 1) * this.entriesPerL2 * cs);
        const out = merge(pending, { offset: pos, length: stop - pos, kind: 'unallocated', depth: 0 });
        if (out.emit) yield out.emit;
        pending = out.pending;
        pos = stop;
        continue;
      }
      const info = await this.cluster(cluster);
      const clusterEnd = Math.min(end, (cluster + 1) * cs);
      if (info.kind === 'mixed') {
        // Extended L2: each subcluster has its own state.
        const sub = this.subclusterSize;
        while (pos < clusterEnd) {
          const index = Math.floor((pos - cluster * cs) / sub);
          const stop = Math.min(clusterEnd, cluster * cs + (index + 1) * sub);
          const bit = 1 << index;
          const kind: ExtentKind = info.allocMask & bit ? 'data' : info.zeroMask & bit ? 'zero' : 'unallocated';
          const ext: Extent = { offset: pos, length: stop - pos, kind, depth: 0 };
          if (kind === 'data') ext.hostOffset = info.hostOffset + (pos - cluster * cs);
          const out = merge(pending, ext);
          if (out.emit) yield out.emit;
          pending = out.pending;
          pos = stop;
        }
        continue;
      }
      const ext: Extent = { offset: pos, length: clusterEnd - pos, kind: kindOf(info), depth: 0 };
      if (info.kind === 'plain') ext.hostOffset = info.hostOffset + (pos - cluster * cs);
      const out = merge(pending, ext);
      if (out.emit) yield out.emit;
      pending = out.pending;
      pos = clusterEnd;
    }
    if (pending) yield pending;
  }

  async readAllocated(offset: number, length: number, into: Buffer, intoOffset: number): Promise<void> {
    const cs = this.clusterSize;
    const end = offset + length;
    const plainReads: Array<Promise<void>> = [];
    const compressed: CompressedRead[] = [];
    let run: { host: number; at: number; len: number } | undefined;
    const flush = () => {
      if (run) plainReads.push(this.readPlain(run.host, run.len, into, run.at));
      run = undefined;
    };
    for (let pos = offset; pos < end; ) {
      const cluster = Math.floor(pos / cs);
      const within = pos - cluster * cs;
      const stop = Math.min(end, (cluster + 1) * cs);
      const at = intoOffset + (pos - offset);
      const info = await this.cluster(cluster);
      if (info.kind === 'plain' || (info.kind === 'mixed' && info.allocMask === 0xffffffff)) {
        const host = info.hostOffset + within;
        if (run && run.host + run.len === host && run.at + run.len === at) run.len += stop - pos;
        else {
          flush();
          run = { host, at, len: stop - pos };
        }
      } else {
        flush();
        if (info.kind === 'compressed') compressed.push({ guest: cluster * cs, info, slot: compressed.length });
        else if (info.kind === 'mixed') plainReads.push(this.readMixed(info, cluster * cs, pos, stop, into, at));
        else into.fill(0, at, at + (stop - pos));
      }
      pos = stop;
    }
    flush();
    if (compressed.length) plainReads.push(this.readCompressed(compressed, offset, end, into, intoOffset));
    await Promise.all(plainReads);
  }

  private async readPlain(host: number, len: number, into: Buffer, at: number): Promise<void> {
    const got = await readFully(this.dataHandle, into, at, len, host);
    // A last cluster cut short by the end of the file reads as zeroes, as in QEMU.
    if (got < len) into.fill(0, at + got, at + len);
  }

  private async readMixed(info: ClusterInfo, clusterStart: number, pos: number, stop: number, into: Buffer, at: number): Promise<void> {
    const sub = this.subclusterSize;
    const reads: Array<Promise<void>> = [];
    for (let p = pos; p < stop; ) {
      const index = Math.floor((p - clusterStart) / sub);
      const s = Math.min(stop, clusterStart + (index + 1) * sub);
      const dst = at + (p - pos);
      if (info.allocMask & (1 << index)) reads.push(this.readPlain(info.hostOffset + (p - clusterStart), s - p, into, dst));
      else into.fill(0, dst, dst + (s - p));
      p = s;
    }
    await Promise.all(reads);
  }

  /** Fetches compressed clusters in few large reads and inflates them in one native batch. */
  private async readCompressed(
    clusters: CompressedRead[],
    offset: number,
    end: number,
    into: Buffer,
    intoOffset: number,
  ): Promise<void> {
    const cs = this.clusterSize;
    const codec = this.header.compressionType === 'zstd' ? Codec.Zstd : Codec.Deflate;
    const sorted = [...clusters].sort((a, b) => a.info.hostOffset - b.info.hostOffset);
    const scratch = Buffer.allocUnsafe(cs * clusters.length);
    let i = 0;
    const jobs: Array<Promise<void>> = [];
    while (i < sorted.length) {
      let j = i;
      let stop = sorted[i].info.hostOffset + sorted[i].info.compressedLength;
      while (j + 1 < sorted.length && sorted[j + 1].info.hostOffset <= stop + COMPRESSED_READ_GAP) {
        j++;
        stop = Math.max(stop, sorted[j].info.hostOffset + sorted[j].info.compressedLength);
      }
      const group = sorted.slice(i, j + 1);
      const base = group[0].info.hostOffset;
      jobs.push(
        (async () => {
          const src = Buffer.allocUnsafe(stop - base);
          const got = await readFully(this.handle, src, 0, src.length, base);
          const triples = new Float64Array(group.length * 3);
          group.forEach((c, k) => {
            triples[k * 3] = c.info.hostOffset - base;
            triples[k * 3 + 1] = Math.min(c.info.compressedLength, got - (c.info.hostOffset - base));
            triples[k * 3 + 2] = c.slot * cs;
          });
          try {
            await native.decompressBlocks(codec, src.subarray(0, got), triples, scratch, cs);
          } catch (err) {
            throw new CorruptImageError(`compressed cluster in the group at ${base} cannot be decompressed (${(err as Error).message})`, {
              file: this.path,
              field: 'compressed_cluster',
            });
          }
        })(),
      );
      i = j + 1;
    }
    await Promise.all(jobs);
    clusters.forEach((c, k) => {
      const from = Math.max(offset, c.guest);
      const to = Math.min(end, c.guest + cs);
      scratch.copy(into, intoOffset + (from - offset), k * cs + (from - c.guest), k * cs + (to - c.guest));
    });
  }

  /** Decodes guest cluster `index`'s L2 entry. */
  private async cluster(index: number): Promise<ClusterInfo> {
    const l1Index = Math.floor(index / this.entriesPerL2);
    const l2Offset = this.l1[l1Index];
    if (!l2Offset) return UNALLOCATED;
    const table = await this.l2Table(l2Offset);
    const i = index % this.entriesPerL2;
    const stride = this.header.extendedL2 ? 16 : 8;
    const hi = table.readUInt32BE(i * stride);
    const lo = table.readUInt32BE(i * stride + 4);
    if (hi & 0x40000000) return this.compressedCluster(hi, lo, index);
    const hostOffset = (hi & 0x00ffffff) * 2 ** 32 + (lo & 0xfffffe00);
    if (this.header.extendedL2) {
      const zeroMask = table.readUInt32BE(i * stride + 8);
      const allocMask = table.readUInt32BE(i * stride + 12);
      if (allocMask & zeroMask) throw this.badEntry(index, 'subcluster marked both allocated and zero');
      if (allocMask && (!hostOffset && !this.hasExternalData)) throw this.badEntry(index, 'allocated subclusters without a host cluster');
      if (allocMask) this.checkHostCluster(hostOffset, index);
      if (allocMask === 0 && zeroMask === 0) return UNALLOCATED;
      if (zeroMask === 0xffffffff) return ZERO;
      return { kind: 'mixed', hostOffset, compressedLength: 0, allocMask, zeroMask };
    }
    if (lo & 1) {
      if (this.header.version === 2) throw this.badEntry(index, 'zero flag set in a version 2 image');
      return ZERO;
    }
    if (hostOffset === 0 && !(this.hasExternalData && hi & 0x80000000)) return UNALLOCATED;
    this.checkHostCluster(hostOffset, index);
    return { kind: 'plain', hostOffset, compressedLength: 0, allocMask: 0, zeroMask: 0 };
  }

  private compressedCluster(hi: number, lo: number, index: number): ClusterInfo {
    if (this.hasExternalData) throw this.badEntry(index, 'compressed cluster in an image with an external data file');
    const cb = this.header.clusterBits;
    // Bits 0..x-1 are the byte offset, x..61 the extra sector count, x = 70 - cluster_bits (>= 49).
    const highBits = 38 - cb;
    const hi30 = hi & 0x3fffffff;
    const hostOffset = (hi30 % 2 ** highBits) * 2 ** 32 + lo;
    const extraSectors = Math.floor(hi30 / 2 ** highBits);
    const compressedLength = (extraSectors + 1) * 512 - (hostOffset % 512);
    if (hostOffset >= this.fileSize) throw this.badEntry(index, `compressed data at ${hostOffset} lies past the end of the file`);
    return { kind: 'compressed', hostOffset, compressedLength, allocMask: 0, zeroMask: 0 };
  }

  private checkHostCluster(hostOffset: number, index: number): void {
    if (hostOffset % this.clusterSize !== 0) throw this.badEntry(index, `host offset ${hostOffset} is not cluster aligned`);
    if (!this.hasExternalData && hostOffset >= this.fileSize) {
      throw this.badEntry(index, `host offset ${hostOffset} lies past the end of the file`);
    }
  }

  private badEntry(index: number, why: string): CorruptImageError {
    return new CorruptImageError(`L2 entry for guest cluster ${index}: ${why}`, { file: this.path, field: 'l2_entry' });
  }

  private async l2Table(offset: number): Promise<Buffer> {
    const cached = this.l2Cache.get(offset);
    if (cached) {
      this.l2Cache.delete(offset);
      this.l2Cache.set(offset, cached);
      return cached;
    }
    let loading = this.l2Loading.get(offset);
    if (!loading) {
      loading = this.loadL2(offset).finally(() => this.l2Loading.delete(offset));
      this.l2Loading.set(offset, loading);
    }
    return loading;
  }

  private async loadL2(offset: number): Promise<Buffer> {
    const table = Buffer.allocUnsafe(this.clusterSize);
    const got = await readFully(this.handle, table, 0, table.length, offset);
    if (got < table.length) throw new CorruptImageError(`L2 table at ${offset} extends past the end of the file`, { file: this.path, field: 'l1_entry' });
    this.l2Cache.set(offset, table);
    if (this.l2Cache.size > this.l2CacheLimit) this.l2Cache.delete(this.l2Cache.keys().next().value as number);
    return table;
  }

  async close(): Promise<void> {
    if (this.dataHandle !== this.handle) await this.dataHandle.close();
    await this.handle.close();
  }
}

async function readL1(handle: FileHandle, h: Qcow2Header, fileSize: number, file: string): Promise<Float64Array> {
  const raw = Buffer.alloc(h.l1Size * 8);
  if (h.l1Size) await readFully(handle, raw, 0, raw.length, h.l1TableOffset);
  const l1 = new Float64Array(h.l1Size);
  for (let i = 0; i < h.l1Size; i++) {
    const hi = raw.readUInt32BE(i * 8);
    const lo = raw.readUInt32BE(i * 8 + 4);
    const offset = (hi & 0x00ffffff) * 2 ** 32 + (lo & 0xfffffe00);
    if (offset === 0) continue;
    if (offset % h.clusterSize !== 0) {
      throw new CorruptImageError(`L1 entry ${i}: L2 table offset ${offset} is not cluster aligned`, { file, field: 'l1_entry' });
    }
    if (offset + h.clusterSize > fileSize) {
      throw new CorruptImageError(`L1 entry ${i}: L2 table at ${offset} lies past the end of the file`, { file, field: 'l1_entry' });
    }
    l1[i] = offset;
  }
  return l1;
}

function kindOf(info: ClusterInfo): ExtentKind {
  return info.kind === 'plain' || info.kind === 'compressed' ? 'data' : info.kind === 'zero' ? 'zero' : 'unallocated';
}

function merge(pending: Extent | undefined, next: Extent): { emit?: Extent; pending: Extent } {
  if (pending && pending.kind === next.kind && pending.offset + pending.length === next.offset) {
    const contiguous =
      pending.hostOffset === undefined ? next.hostOffset === undefined : next.hostOffset === pending.hostOffset + pending.length;
    if (contiguous) {
      pending.length += next.length;
      return { pending };
    }
  }
  return { emit: pending, pending: { ...next } };
}

