import { randomBytes } from '../../../util/random.js';
import { unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { InvalidOptionError } from '../../../errors.js';
import type { DiskWriter } from '../../disk.js';
import { OutputFile } from '../../output-file.js';
import { flatExtentLine, renderDescriptor, sparseExtentLine, type AdapterType } from './descriptor.js';
import { SECTOR } from './layout.js';
import { GRAIN_SIZE, GrainTableBudget, SparseExtentWriter, checkSparseCapacity } from './sparse-writer.js';
import { StreamOptimizedWriter } from './stream-writer.js';

export const SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'] as const;
export type Subformat = (typeof SUBFORMATS)[number];

export interface VmdkCreateOptions {
  subformat: Subformat;
  adapterType: AdapterType;
  hwVersion: string;
  toolsVersion: string;
  zeroedGrain: boolean;
  durable: boolean;
}

/** The split size of twoGbMaxExtent images, fixed by the format. */
const SPLIT_SIZE = 0x80000000;

/** One extent file being written. */
interface ExtentSink {
  readonly out: OutputFile;
  /** Guest bytes, a multiple of 512. */
  readonly length: number;
  write(offset: number, data: Buffer): Promise<void>;
  /** Writes the extent's metadata; the file is committed by the caller. */
  finalize(): Promise<void>;
  /** Waits for background writes. */
  settle(): Promise<void>;
}

class FlatSink implements ExtentSink {
  constructor(
    readonly out: OutputFile,
    readonly length: number,
  ) {}

  write(offset: number, data: Buffer): Promise<void> {
    return this.out.writeAt(data, offset);
  }

  async finalize(): Promise<void> {
    // Created at full length; holes read as zeroes.
  }

  async settle(): Promise<void> {
    // Every write is awaited by its caller.
  }
}

/**
 * Writes the extent files of a VMDK and, for the split and flat subformats, its descriptor file. Every
 * file is written under a temporary name; on finish the extents are renamed into place first and the
 * descriptor last, and a failure removes whatever was already renamed.
 */
class VmdkWriter implements DiskWriter {
  readonly sequential = false;
  readonly zeroInitialized = true;
  private committed: string[] = [];

  constructor(
    readonly path: string,
    readonly virtualSize: number,
    readonly granularity: number,
    private readonly extents: Array<{ start: number; sink: ExtentSink }>,
    private readonly descriptor: { out: OutputFile; text: string } | undefined,
    private readonly durable: boolean,
  ) {}

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    const end = offset + data.length;
    // The last extent starting at or before `offset`: split images have thousands.
    let lo = 0;
    for (let hi = this.extents.length - 1; lo < hi; ) {
      const mid = (lo + hi + 1) >> 1;
      if (this.extents[mid].start <= offset) lo = mid;
      else hi = mid - 1;
    }
    const writes: Array<Promise<void>> = [];
    for (let i = lo; i < this.extents.length && this.extents[i].start < end; i++) {
      const { start, sink } = this.extents[i];
      const from = Math.max(offset, start);
      const to = Math.min(end, start + sink.length);
      if (from < to) writes.push(sink.write(from - start, data.subarray(from - offset, to - offset)));
    }
    await Promise.all(writes);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    // New extents read as zeroes: sparse ones have no grain there, flat ones a hole.
    this.checkRange(offset, length);
  }

  private checkRange(offset: number, length: number): void {
    const end = offset + length;
    if (offset % this.granularity !== 0 || (end % this.granularity !== 0 && end !== this.virtualSize) || end > this.virtualSize) {
      throw new RangeError(`vmdk writer: range ${offset}+${length} is not aligned to ${this.granularity} bytes or exceeds the disk`);
    }
  }

  async finish(): Promise<void> {
    try {
      await Promise.all(this.extents.map(({ sink }) => sink.finalize()));
      if (this.descriptor) await this.descriptor.out.writeAt(Buffer.from(this.descriptor.text), 0);
      for (const { sink } of this.extents) {
        await sink.out.commit(this.durable);
        this.committed.push(sink.out.finalPath);
      }
      if (this.descriptor) await this.descriptor.out.commit(this.durable);
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  async abort(): Promise<void> {
    await Promise.all(this.extents.map(({ sink }) => sink.settle()));
    const outs = this.extents.map(({ sink }) => sink.out);
    if (this.descriptor) outs.push(this.descriptor.out);
    await Promise.all(outs.map((o) => o.discard()));
    const committed = this.committed;
    this.committed = [];
    await Promise.all(committed.map((p) => unlink(p).catch(() => undefined)));
  }
}

/** Extent file names as qemu-img derives them: "disk.vmdk" -> "disk-flat.vmdk", "disk-s001.vmdk", ... */
function extentPath(descriptorPath: string, suffix: string): string {
  const base = basename(descriptorPath);
  const dot = base.lastIndexOf('.');
  const prefix = dot >= 0 ? base.slice(0, dot) : base;
  const postfix = dot >= 0 ? base.slice(dot) : '';
  return join(dirname(descriptorPath), `${prefix}-${suffix}${postfix}`);
}

/** Creates the files of a new VMDK of `virtualSize` bytes (rounded up to whole sectors, as QEMU does). */
export async function createVmdkWriter(path: string, virtualSize: number, opts: VmdkCreateOptions): Promise<DiskWriter> {
  const size = Math.ceil(virtualSize / SECTOR) * SECTOR;
  // QEMU cannot open what it writes for an empty disk (no extents, or a capacity 0 header that means "descriptor").
  if (size === 0) throw new InvalidOptionError('a VMDK disk must be at least one sector long', { field: 'size' });
  const describe = (extentLines: string[]) =>
    renderDescriptor({
      cid: randomBytes(4).readUInt32LE(0),
      createType: opts.subformat,
      extentLines,
      size,
      hwVersion: opts.hwVersion,
      adapterType: opts.adapterType,
      toolsVersion: opts.toolsVersion,
    });
  const sectors = size / SECTOR;

  if (opts.subformat === 'streamOptimized' || opts.subformat === 'monolithicSparse') {
    checkSparseCapacity(sectors, opts.subformat);
    const text = describe([sparseExtentLine(sectors, basename(path))]);
    const out = await OutputFile.create(path);
    try {
      if (opts.subformat === 'streamOptimized') return new StreamOptimizedWriter(out, virtualSize, text, opts.zeroedGrain, opts.durable);
      const sink = new SparseExtentWriter(out, size, opts.zeroedGrain, new GrainTableBudget(), 0, text);
      return new VmdkWriter(path, virtualSize, GRAIN_SIZE, [{ start: 0, sink }], undefined, opts.durable);
    } catch (err) {
      await out.discard();
      throw err;
    }
  }

  const flat = opts.subformat === 'monolithicFlat' || opts.subformat === 'twoGbMaxExtentFlat';
  const split = opts.subformat === 'twoGbMaxExtentSparse' || opts.subformat === 'twoGbMaxExtentFlat';
  const outs: OutputFile[] = [];
  try {
    const descriptorOut = await OutputFile.create(path);
    outs.push(descriptorOut);
    const extents: Array<{ start: number; sink: ExtentSink }> = [];
    const lines: string[] = [];
    const budget = new GrainTableBudget();
    const extentSize = split ? SPLIT_SIZE : size;
    for (let start = 0, index = 1; start < size; start += extentSize, index++) {
      const length = Math.min(extentSize, size - start);
      const name = extentPath(path, split ? `${flat ? 'f' : 's'}${String(index).padStart(3, '0')}` : 'flat');
      const out = await OutputFile.create(name);
      outs.push(out);
      if (flat) {
        await out.handle.truncate(length);
        extents.push({ start, sink: new FlatSink(out, length) });
        lines.push(flatExtentLine(length / SECTOR, basename(name)));
      } else {
        // Budget keys: the extent index above the table index.
        extents.push({ start, sink: new SparseExtentWriter(out, length, opts.zeroedGrain, budget, index * 2 ** 32) });
        lines.push(sparseExtentLine(length / SECTOR, basename(name)));
      }
    }
    return new VmdkWriter(path, virtualSize, flat ? SECTOR : GRAIN_SIZE, extents, { out: descriptorOut, text: describe(lines) }, opts.durable);
  } catch (err) {
    await Promise.all(outs.map((o) => o.discard()));
    throw err;
  }
}
