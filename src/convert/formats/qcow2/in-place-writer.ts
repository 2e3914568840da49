import { open, type FileHandle } from 'node:fs/promises';
import { CancelledError, CorruptImageError, InvalidOptionError, UnsupportedFeatureError } from '../../../errors.js';
import { native } from '../../../native.js';
import type { DiskWriter } from '../../disk.js';
import { readFully } from '../../output-file.js';
import { AUTOCLEAR_BITMAPS, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, compressedRange, l2Entries, readHeader, type Qcow2Header } from './layout.js';
import { RefcountStore } from './refcount-store.js';

export interface InPlaceOptions {
  /** Lets the backing chain be read from outside the image's folder (needed only to fill a partial last cluster). */
  allowExternal?: boolean;
  /** Bound on cached L2 tables; reaching it with dirty tables writes the metadata out (a flush). */
  l2CacheBytes?: number;
  /** Bound on cached refcount blocks, likewise. */
  refcountCacheBytes?: number;
}

const DEFAULT_L2_CACHE = 32 * 1024 * 1024;
const DEFAULT_REFCOUNT_CACHE = 8 * 1024 * 1024;
/** Held-back decrements before a flush applies them: bounds their memory like the caches. */
const MAX_PENDING_FREES = 1024 * 1024;
/** iovecs per writev, well under IOV_MAX. */
const MAX_IOVECS = 512;
const HEADER_AUTOCLEAR = 88;
const ALL_SUBCLUSTERS = 0xffffffff;

interface L2Slot {
  host: number;
  table: Buffer;
  dirty: boolean;
}

/** A guest cluster as its L2 entry describes it. */
interface Entry {
  kind: 'unallocated' | 'zero' | 'plain' | 'compressed';
  /** plain: the host cluster (also for a v3 zero cluster that keeps its allocation) */
  host: number;
  copied: boolean;
  zeroFlag: boolean;
  /** extended L2 bitmaps */
  zeroMask: number;
  allocMask: number;
  /** compressed: the sectors the descriptor claims */
  claimStart: number;
  claimLength: number;
}

interface HostRun {
  host: number;
  length: number;
  buffers: Buffer[];
}

/** The part of the last cluster past the source's end, when the target is larger: it keeps its old contents. */
interface TailCluster {
  index: number;
  data: Buffer;
}

/**
 * Writes a disk into an existing qcow2 image in place (qemu-img convert -n). Allocated clusters with
 * refcount 1 are overwritten where they are; anything else (unallocated, zero, compressed, shared) gets a
 * new cluster at the end of the file, and the cluster it replaces loses its reference.
 *
 * Metadata follows the order of QEMU's allocating writes, with a sync between stages: data and the
 * refcounts of new clusters, then the refcount table, then L2 tables, then L1; references dropped by the
 * tables are decremented only after the tables are on disk. New clusters are never taken from freed
 * space during a run, so an L2 entry on disk always points at data that was written and counted: a
 * failure leaks clusters at worst. Dirty tables stay in bounded caches and are written in such a flush
 * when a cache fills, and at the end.
 */
export class Qcow2InPlaceWriter implements DiskWriter {
  readonly sequential = false;
  readonly zeroInitialized = false;
  readonly granularity: number;
  private readonly cs: number;
  private readonly entriesPerL2: number;
  private readonly stride: number;
  private readonly extendedL2: boolean;
  private readonly l2Coverage: number;
  private readonly l2 = new Map<number, L2Slot>();
  private readonly l2Limit: number;
  private readonly l1Dirty = new Set<number>();
  private readonly inflight = new Set<Promise<void>>();
  private lock: Promise<void> = Promise.resolve();
  private lane: Promise<void> = Promise.resolve();
  private zero?: Buffer;
  private failed?: unknown;
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    private readonly header: Qcow2Header,
    private readonly l1: Buffer,
    private readonly refs: RefcountStore,
    /** The guest range written: the source's size. */
    readonly virtualSize: number,
    private readonly hasBacking: boolean,
    private readonly tail: TailCluster | undefined,
    l2CacheBytes: number,
  ) {
    this.cs = header.clusterSize;
    this.granularity = this.cs;
    this.extendedL2 = header.extendedL2;
    this.stride = header.extendedL2 ? 16 : 8;
    this.entriesPerL2 = l2Entries(header);
    this.l2Coverage = this.entriesPerL2 * this.cs;
    this.l2Limit = Math.max(8, Math.floor(l2CacheBytes / this.cs));
  }

  static async open(path: string, sourceSize: number, opts: InPlaceOptions = {}): Promise<Qcow2InPlaceWriter> {
    const handle = await open(path, 'r+');
    try {
      const { fileSize, header, extensions } = await readHeader(handle, path);
      const refuse = (msg: string, field: string) => new UnsupportedFeatureError(`-n: ${msg}`, { file: path, field });
      if (header.incompatible & INCOMPAT_DIRTY) throw refuse('the image is dirty (lazy refcounts not written back); run qemu-img check -r all first', 'incompatible_features');
      if (header.incompatible & INCOMPAT_DATA_FILE) throw refuse('images with an external data file are not supported', 'data_file');
      if (header.nbSnapshots) throw refuse(`images with internal snapshots (${header.nbSnapshots}) are not supported`, 'nb_snapshots');
      if (extensions.bitmaps || header.autoclear & AUTOCLEAR_BITMAPS) throw refuse('images with persistent dirty bitmaps are not supported', 'bitmaps');
      if (header.virtualSize < sourceSize) {
        throw new InvalidOptionError(`target ${path} is ${header.virtualSize} bytes, smaller than the source (${sourceSize} bytes)`, { file: path, field: 'size' });
      }
      const l1 = await readL1(handle, header, fileSize, path);
      const refs = await RefcountStore.open(handle, path, header, fileSize, opts.refcountCacheBytes ?? DEFAULT_REFCOUNT_CACHE);
      const tail = await readTail(path, header, sourceSize, opts.allowExternal ?? false);
      if (header.autoclear) {
        // Autoclear bits name features a writer that does not maintain them must disable (qcow2 spec).
        await handle.write(Buffer.alloc(8), 0, 8, HEADER_AUTOCLEAR);
        await handle.datasync();
      }
      const hasBacking = header.backingFileOffset !== 0 && header.backingFileSize > 0;
      return new Qcow2InPlaceWriter(path, handle, header, l1, refs, sourceSize, hasBacking, tail, opts.l2CacheBytes ?? DEFAULT_L2_CACHE);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    await this.writeSteps(offset, offset + data.length, (pos, len) => data.subarray(pos - offset, pos - offset + len));
  }

  /**
   * Zero ranges must read as zeroes afterwards: v3 records them with the zero flag (needed over a backing
   * file), v2 without a backing file drops the clusters, and v2 over a backing file can only store zeroes.
   */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    const end = offset + length;
    const zeroes = (_pos: number, len: number) => this.zeroBuffer().subarray(0, len);
    if (this.header.version === 2 && this.hasBacking) return this.writeSteps(offset, end, zeroes);
    const tailStart = this.tail ? this.tail.index * this.cs : Infinity;
    const zeroEnd = Math.min(end, tailStart);
    for (let pos = offset; pos < zeroEnd; ) {
      const stop = Math.min(zeroEnd, this.nextL2Boundary(pos));
      const from = pos;
      await this.locked(() => this.mapZeroes(from, stop));
      pos = stop;
    }
    if (zeroEnd < end) await this.writeSteps(zeroEnd, end, zeroes);
  }

  async finish(): Promise<void> {
    try {
      await this.locked(async () => {
        await this.flush();
        await this.handle.datasync();
      });
      this.closed = true;
      await this.handle.close();
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  /**
   * Stops without writing the tables changed since the last flush: what is on disk stays consistent (the
   * data of this last stretch is unreferenced, or overwritten in place as any partial write would be).
   */
  async abort(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.failed ??= new CancelledError('conversion aborted');
    await this.locked(async () => {
      await Promise.allSettled([...this.inflight]);
    }).catch(() => undefined);
    await this.handle.close().catch(() => undefined);
  }

  private checkRange(offset: number, length: number): void {
    if (this.failed) throw this.failed;
    const end = offset + length;
    if (offset % this.cs !== 0 || (end % this.cs !== 0 && end !== this.virtualSize) || end > this.virtualSize) {
      throw new RangeError(`qcow2 in-place writer: range ${offset}+${length} is not aligned to ${this.cs} bytes or exceeds the disk`);
    }
  }

  /** Maps [offset, end) one L2 table at a time and writes the pieces; returns once every byte is written. */
  private async writeSteps(offset: number, end: number, piece: (pos: number, len: number) => Buffer): Promise<void> {
    const writes: Array<Promise<void>> = [];
    try {
      for (let pos = offset; pos < end; ) {
        const stop = Math.min(end, this.nextL2Boundary(pos));
        const from = pos;
        writes.push(...(await this.locked(() => this.mapData(from, stop, piece))));
        pos = stop;
      }
    } finally {
      // The caller may reuse its buffer once this returns: every started write must be over first.
      const settled = await Promise.allSettled(writes);
      const failure = settled.find((r) => r.status === 'rejected');
      if (failure) throw failure.reason;
    }
  }

  /**
   * Under the lock: picks the host cluster of every guest cluster in [start, stop) (one L2 table) and
   * starts the data writes, tracked so that no flush writes a table before the data it points to.
   */
  private async mapData(start: number, stop: number, piece: (pos: number, len: number) => Buffer): Promise<Array<Promise<void>>> {
    await this.beforeStep();
    const slot = (await this.l2Slot(this.l1Index(start), true))!;
    const runs: HostRun[] = [];
    for (let pos = start; pos < stop; pos += this.cs) {
      const len = Math.min(this.cs, stop - pos);
      let buf = piece(pos, len);
      const guestCluster = pos / this.cs;
      if (this.tail && guestCluster === this.tail.index) {
        buf.copy(this.tail.data, 0, 0, len);
        buf = this.tail.data;
      }
      const host = await this.hostForData(slot, this.entryAt(pos));
      appendRun(runs, host, buf);
    }
    return runs.map((r) => this.track(this.writeRun(r)));
  }

  /** The host cluster new data for this entry goes to, updating the entry when it changes. */
  private async hostForData(slot: L2Slot, at: number): Promise<number> {
    const e = this.decode(slot.table, at);
    if (e.kind === 'plain') {
      const refcount = await this.refs.refcount(e.host / this.cs);
      if (refcount === 0) throw this.corrupt(`data cluster at ${e.host} is referenced but its refcount is 0`);
      if ((refcount === 1) !== e.copied) throw this.corrupt(`the COPIED flag of the entry for cluster ${e.host} disagrees with its refcount ${refcount}`);
      if (refcount === 1) {
        this.setEntry(slot, at, e.host, 0, ALL_SUBCLUSTERS);
        return e.host;
      }
      this.refs.freeLater(e.host, this.cs);
    } else if (e.kind === 'compressed') {
      this.refs.freeLater(e.claimStart, e.claimLength);
    }
    const host = (await this.refs.allocate()) * this.cs;
    this.setEntry(slot, at, host, 0, ALL_SUBCLUSTERS);
    return host;
  }

  /** Under the lock: makes the clusters of [start, stop) (one L2 table) read as zeroes without data. */
  private async mapZeroes(start: number, stop: number): Promise<void> {
    await this.beforeStep();
    // Without a backing file an absent table already reads as zeroes.
    const slot = await this.l2Slot(this.l1Index(start), this.hasBacking);
    if (!slot) return;
    for (let pos = start; pos < stop; pos += this.cs) {
      const at = this.entryAt(pos);
      const e = this.decode(slot.table, at);
      if (this.readsZero(e)) continue;
      if (e.kind === 'plain') {
        if ((await this.refs.refcount(e.host / this.cs)) === 0) throw this.corrupt(`data cluster at ${e.host} is referenced but its refcount is 0`);
        this.refs.freeLater(e.host, this.cs);
      } else if (e.kind === 'compressed') {
        this.refs.freeLater(e.claimStart, e.claimLength);
      }
      if (this.extendedL2) this.setEntry(slot, at, 0, ALL_SUBCLUSTERS, 0);
      else if (this.header.version === 3) this.setEntry(slot, at, 0, 1, 0);
      else this.setEntry(slot, at, 0, 0, 0);
    }
  }

  /** Whether an entry already reads as zeroes without any stored data. */
  private readsZero(e: Entry): boolean {
    if (e.kind === 'zero') return true;
    if (e.kind === 'plain') return !this.extendedL2 && e.zeroFlag;
    if (e.kind === 'unallocated') return !this.hasBacking;
    return false;
  }

  /**
   * Writes an entry: `zero` is the zero flag (1 or 0) for standard entries and the zero bitmap for
   * extended ones, `alloc` the allocation bitmap (extended only). Host clusters are always COPIED: they
   * are ours alone.
   */
  private setEntry(slot: L2Slot, at: number, host: number, zero: number, alloc: number): void {
    const t = slot.table;
    const hi = (host ? 0x80000000 : 0) + Math.floor(host / 2 ** 32);
    const lo = (host % 2 ** 32) + (this.extendedL2 ? 0 : zero);
    let changed = t.readUInt32BE(at) !== hi || t.readUInt32BE(at + 4) !== lo;
    t.writeUInt32BE(hi, at);
    t.writeUInt32BE(lo, at + 4);
    if (this.extendedL2) {
      const allocMask = host ? alloc : 0;
      changed ||= t.readUInt32BE(at + 8) !== zero || t.readUInt32BE(at + 12) !== allocMask;
      t.writeUInt32BE(zero >>> 0, at + 8);
      t.writeUInt32BE(allocMask >>> 0, at + 12);
    }
    if (changed) slot.dirty = true;
  }

  private decode(t: Buffer, at: number): Entry {
    const hi = t.readUInt32BE(at);
    const lo = t.readUInt32BE(at + 4);
    const e: Entry = { kind: 'unallocated', host: 0, copied: (hi & 0x80000000) !== 0, zeroFlag: false, zeroMask: 0, allocMask: 0, claimStart: 0, claimLength: 0 };
    if (hi & 0x40000000) {
      const r = compressedRange((BigInt(hi) << 32n) | BigInt(lo), this.header.clusterBits);
      if (r.offset >= this.refs.end) throw this.corrupt(`compressed cluster at ${r.offset} lies past the end of the image`);
      e.kind = 'compressed';
      e.claimStart = r.sectorStart;
      e.claimLength = r.offset + r.length - r.sectorStart;
      return e;
    }
    e.host = (hi & 0x00ffffff) * 2 ** 32 + (lo & 0xfffffe00);
    if (e.host % this.cs) throw this.corrupt(`data cluster offset ${e.host} is not cluster aligned`);
    if (e.host >= this.refs.end) throw this.corrupt(`data cluster at ${e.host} lies past the end of the image`);
    if (this.extendedL2) {
      e.zeroMask = t.readUInt32BE(at + 8);
      e.allocMask = t.readUInt32BE(at + 12);
      if (e.zeroMask & e.allocMask) throw this.corrupt('a subcluster is marked both allocated and zero');
      if (e.allocMask && !e.host) throw this.corrupt('allocated subclusters without a host cluster');
      if (e.host) e.kind = 'plain';
      else if (e.zeroMask === ALL_SUBCLUSTERS) e.kind = 'zero';
      return e;
    }
    e.zeroFlag = (lo & 1) !== 0;
    if (e.zeroFlag && this.header.version === 2) throw this.corrupt('zero flag set in a version 2 image');
    if (e.host) e.kind = 'plain';
    else if (e.zeroFlag) e.kind = 'zero';
    return e;
  }

  /** The L2 table for L1 entry `index`: cached, read, or (with `create`) new at the end of the file. */
  private async l2Slot(index: number, create: boolean): Promise<L2Slot | undefined> {
    const cached = this.l2.get(index);
    if (cached) {
      this.l2.delete(index);
      this.l2.set(index, cached);
      return cached;
    }
    const hi = this.l1.readUInt32BE(index * 8);
    const offset = (hi & 0x00ffffff) * 2 ** 32 + (this.l1.readUInt32BE(index * 8 + 4) & 0xfffffe00);
    let slot: L2Slot;
    if (offset) {
      const refcount = await this.refs.refcount(offset / this.cs);
      if (refcount !== 1 || !(hi & 0x80000000)) throw this.corrupt(`L2 table at ${offset} has refcount ${refcount} (COPIED ${hi >>> 31}); expected an unshared table`);
      const table = Buffer.alloc(this.cs);
      await readFully(this.handle, table, 0, this.cs, offset);
      slot = { host: offset, table, dirty: false };
    } else {
      if (!create) return undefined;
      const host = (await this.refs.allocate()) * this.cs;
      slot = { host, table: Buffer.alloc(this.cs), dirty: true };
      this.l1.writeUInt32BE((0x80000000 + Math.floor(host / 2 ** 32)) >>> 0, index * 8);
      this.l1.writeUInt32BE(host % 2 ** 32, index * 8 + 4);
      this.l1Dirty.add(index);
    }
    this.l2.set(index, slot);
    return slot;
  }

  /** Flushes when a cache or the held-back frees reach their bound, then drops clean tables. */
  private async beforeStep(): Promise<void> {
    if (this.failed) throw this.failed;
    if (this.l2.size <= this.l2Limit && !this.refs.full && this.refs.pendingFrees < MAX_PENDING_FREES) return;
    await this.flush();
    for (const [index, slot] of this.l2) {
      if (this.l2.size <= this.l2Limit / 2) break;
      if (!slot.dirty) this.l2.delete(index);
    }
  }

  /** Under the lock: writes all metadata changed so far, each stage synced before the next depends on it. */
  private async flush(): Promise<void> {
    await Promise.all([...this.inflight]);
    if (this.failed) throw this.failed;
    const dirtyL2 = [...this.l2.values()].filter((s) => s.dirty);
    if (!dirtyL2.length && !this.l1Dirty.size && !this.refs.pendingFrees) return;
    await this.refs.writeBlocks();
    await this.handle.datasync();
    if (await this.refs.writeTable()) await this.handle.datasync();
    // A new cluster the data did not fill must still lie inside the file before a table points at it.
    if ((await this.handle.stat()).size < this.refs.end) await this.handle.truncate(this.refs.end);
    for (const slot of dirtyL2) {
      await writeFully(this.handle, slot.table, slot.host);
      slot.dirty = false;
    }
    await this.handle.datasync();
    if (this.l1Dirty.size) {
      for (const [first, count] of consecutiveRuns([...this.l1Dirty].sort((a, b) => a - b))) {
        await writeFully(this.handle, this.l1.subarray(first * 8, (first + count) * 8), this.header.l1TableOffset + first * 8);
      }
      this.l1Dirty.clear();
      await this.handle.datasync();
    }
    const freed = await this.refs.applyFrees();
    for (const [first, count] of consecutiveRuns(freed)) native.punchHole(this.handle.fd, first * this.cs, count * this.cs);
  }

  /**
   * Data goes out through one lane, as in OutputFile: parallel writes to one file only contend for its
   * inode lock (measured here too: the copy took about half as long through one lane).
   */
  private writeRun(run: HostRun): Promise<void> {
    const write = this.lane.then(() => this.writeRunNow(run));
    this.lane = write.catch(() => undefined);
    return write;
  }

  private async writeRunNow(run: HostRun): Promise<void> {
    let position = run.host;
    let buffers = run.buffers;
    while (buffers.length) {
      let written = (await this.handle.writev(buffers, position)).bytesWritten;
      position += written;
      while (buffers.length && written >= buffers[0].length) {
        written -= buffers[0].length;
        buffers = buffers.slice(1);
      }
      if (written > 0) buffers[0] = buffers[0].subarray(written);
    }
  }

  private track(io: Promise<void>): Promise<void> {
    const p = io.catch((err) => {
      this.failed ??= err;
      throw err;
    });
    const settled = p.catch(() => undefined);
    this.inflight.add(settled);
    void settled.finally(() => this.inflight.delete(settled));
    return p;
  }

  /**
   * Runs a metadata step alone. A step that fails may have changed table entries without starting the
   * writes they point to, so any failure stops all further flushes.
   */
  private async locked<T>(fn: () => Promise<T>): Promise<T> {
    const previous = this.lock;
    let release!: () => void;
    this.lock = new Promise<void>((resolve) => (release = resolve));
    await previous;
    try {
      return await fn();
    } catch (err) {
      this.failed ??= err;
      throw err;
    } finally {
      release();
    }
  }

  private zeroBuffer(): Buffer {
    return (this.zero ??= Buffer.alloc(this.cs));
  }

  private l1Index(guest: number): number {
    return Math.floor(guest / this.l2Coverage);
  }

  private entryAt(guest: number): number {
    return Math.floor((guest % this.l2Coverage) / this.cs) * this.stride;
  }

  private nextL2Boundary(pos: number): number {
    return (this.l1Index(pos) + 1) * this.l2Coverage;
  }

  private corrupt(msg: string): CorruptImageError {
    return new CorruptImageError(`${msg}; run qemu-img check first`, { file: this.path, field: 'l2_entry' });
  }
}

/** Appends a cluster's data to the write runs, merging it with the previous run when the host clusters are adjacent. */
function appendRun(runs: HostRun[], host: number, buf: Buffer): void {
  const last = runs[runs.length - 1];
  if (last && last.host + last.length === host && last.buffers.length < MAX_IOVECS) {
    const prev = last.buffers[last.buffers.length - 1];
    if (prev.buffer === buf.buffer && prev.byteOffset + prev.length === buf.byteOffset && buf !== prev) {
      last.buffers[last.buffers.length - 1] = Buffer.from(prev.buffer, prev.byteOffset, prev.length + buf.length);
    } else last.buffers.push(buf);
    last.length += buf.length;
    return;
  }
  runs.push({ host, length: buf.length, buffers: [buf] });
}

/** [first, count] pairs of runs of consecutive integers in a sorted list. */
function* consecutiveRuns(sorted: number[]): Iterable<[number, number]> {
  for (let i = 0; i < sorted.length; ) {
    let j = i + 1;
    while (j < sorted.length && sorted[j] === sorted[j - 1] + 1) j++;
    yield [sorted[i], j - i];
    i = j;
  }
}

async function writeFully(handle: FileHandle, data: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) done += (await handle.write(data, done, data.length - done, position + done)).bytesWritten;
}

async function readL1(handle: FileHandle, h: Qcow2Header, fileSize: number, file: string): Promise<Buffer> {
  const l1 = Buffer.alloc(h.l1Size * 8);
  await readFully(handle, l1, 0, l1.length, h.l1TableOffset);
  for (let i = 0; i < h.l1Size; i++) {
    const offset = (l1.readUInt32BE(i * 8) & 0x00ffffff) * 2 ** 32 + (l1.readUInt32BE(i * 8 + 4) & 0xfffffe00);
    if (offset && (offset % h.clusterSize || offset + h.clusterSize > fileSize)) {
      throw new CorruptImageError(`L1 entry ${i}: L2 table at ${offset} is misaligned or past the end of the file`, { file, field: 'l1_entry' });
    }
  }
  return l1;
}

/**
 * When the target is larger than the source and the source ends inside a cluster, that cluster's bytes
 * past the source's end keep what the target showed there (its own data or its backing file's), read
 * before anything is written.
 */
async function readTail(path: string, h: Qcow2Header, sourceSize: number, allowExternal: boolean): Promise<TailCluster | undefined> {
  if (sourceSize % h.clusterSize === 0 || h.virtualSize === sourceSize) return undefined;
  const index = Math.floor(sourceSize / h.clusterSize);
  const start = index * h.clusterSize;
  const data = Buffer.alloc(Math.min(h.clusterSize, h.virtualSize - start));
  // Loaded here: open.ts reaches this module through the driver registry.
  const { openDisk } = await import('../../open.js');
  const disk = await openDisk(path, { format: 'qcow2', allowExternal });
  try {
    await disk.read(start, data.length, data);
  } finally {
    await disk.close();
  }
  return { index, data };
}
