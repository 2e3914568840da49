import { availableParallelism } from 'node:os';
import { CancelledError } from '../errors.js';
import type { DiskReader, DiskWriter, Extent } from './disk.js';

export interface Progress {
  /** Guest bytes processed so far (copied, or skipped as zero). */
  done: number;
  total: number;
  /** Bytes read from the source and handed to the writer. */
  bytesRead: number;
  bytesWritten: number;
}

export interface PipelineOptions {
  /** Parallel copy workers (qemu-img -m); default: defaultWorkers(). */
  workers?: number;
  /** Bytes per unit of work; default 2 MiB, raised to the writer's granularity if larger. */
  chunkSize?: number;
  /** Zero detection granularity (qemu-img -S); 0 writes every byte, zeroes included. Default 4 KiB. */
  sparseSize?: number;
  /** The target already reads as zeroes (qemu-img --target-is-zero): zero ranges are skipped. */
  targetIsZero?: boolean;
  signal?: AbortSignal;
  onProgress?: (p: Progress) => void;
}

export interface PipelineStats extends Progress {
  zeroBytes: number;
  elapsedMs: number;
}

interface Chunk {
  offset: number;
  length: number;
  kind: Extent['kind'];
  seq: number;
}

const DEFAULT_CHUNK = 2 * 1024 * 1024;
const ZERO_WRITE_CHUNK = 16 * 1024 * 1024;
/** Zero work items are large: they cost nothing unless the target needs zeroes written. */
const ZERO_CHUNK = 1024 * 1024 * 1024;

/**
 * Copy workers when the caller does not say: two per core, at most 8 (qemu-img's default). Each holds a
 * mapping of the source chunk it copies until its writes are done; on 2 cores, 8 of them mapping,
 * populating and unmapping at once contend on the process's memory map and made a 4 GiB convert 2–3× slower
 * in one run out of two (measured: -m 4 steady at 0.47–0.53 s, -m 8 0.52–1.34 s).
 */
export function defaultWorkers(): number {
  return Math.min(8, 2 * availableParallelism());
}

/**
 * The one conversion pipeline: the source's allocation map -> chunks -> N workers that read and detect
 * zeroes in one native pass -> the writer. Memory is N chunk buffers, whatever the disk size; a writer
 * that must be filled in order gets its writes in order while reads still run ahead in parallel.
 */
export async function copyDisk(source: DiskReader, target: DiskWriter, opts: PipelineOptions = {}): Promise<PipelineStats> {
  const started = performance.now();
  const total = source.virtualSize;
  const sparseSize = opts.sparseSize ?? 4096;
  const granularity = sparseSize === 0 ? 0 : Math.max(sparseSize, target.granularity);
  const chunkSize = Math.ceil(Math.max(opts.chunkSize ?? DEFAULT_CHUNK, target.granularity) / target.granularity) * target.granularity;
  const workers = Math.max(1, opts.workers ?? defaultWorkers());
  const skipZeroes = sparseSize !== 0 && (target.zeroInitialized || opts.targetIsZero === true);
  const stats: PipelineStats = { done: 0, total, bytesRead: 0, bytesWritten: 0, zeroBytes: 0, elapsedMs: 0 };
  const report = () => opts.onProgress?.({ done: stats.done, total, bytesRead: stats.bytesRead, bytesWritten: stats.bytesWritten });
  const order = new InOrder(target.sequential);

  const chunks = chunkStream(source.extents(0, total), total, chunkSize, target.granularity);
  const next = (() => {
    const it = chunks[Symbol.asyncIterator]();
    return () => it.next();
  })();

  let zeroBuffer: Buffer | undefined;
  const writeZeroRange = async (offset: number, length: number) => {
    if (sparseSize !== 0) return target.writeZeroes(offset, length);
    // -S 0: the output is fully allocated, zeroes written as data.
    const zero = (zeroBuffer ??= Buffer.alloc(Math.min(ZERO_WRITE_CHUNK, chunkSize)));
    // All calls are made before awaiting any, so in-order writers see them in order.
    const writes: Array<Promise<void>> = [];
    for (let pos = offset; pos < offset + length; pos += zero.length) {
      writes.push(target.write(pos, zero.subarray(0, Math.min(zero.length, offset + length - pos))));
    }
    await Promise.all(writes);
  };

  const worker = async () => {
    const buffer = Buffer.allocUnsafe(chunkSize);
    for (;;) {
      if (opts.signal?.aborted) throw new CancelledError('conversion cancelled');
      const { value: chunk, done } = await next();
      if (done) return;
      if (chunk.kind !== 'data') {
        stats.zeroBytes += chunk.length;
        if (!skipZeroes) await order.run(chunk.seq, () => writeZeroRange(chunk.offset, chunk.length));
        else order.skip(chunk.seq);
      } else {
        const { data, runs, release } = await source.readScanned(chunk.offset, chunk.length, buffer, granularity);
        stats.bytesRead += chunk.length;
        try {
          await order.run(chunk.seq, () => writeRuns(chunk.offset, data, runs));
        } finally {
          release();
        }
      }
      stats.done += chunk.length;
      report();
    }
  };

  const writeRuns = async (offset: number, data: Buffer, runs: Uint32Array) => {
    let at = 0;
    const writes: Array<Promise<void>> = [];
    for (let i = 0; i < runs.length; i++) {
      const len = runs[i];
      if (len === 0) continue;
      if (i % 2 === 0) {
        writes.push(target.write(offset + at, data.subarray(at, at + len)));
        stats.bytesWritten += len;
      } else {
        stats.zeroBytes += len;
        if (!skipZeroes) writes.push(writeZeroRange(offset + at, len));
      }
      at += len;
    }
    // Every write must be over before the data can be released (it may be a mapping of the source).
    const settled = await Promise.allSettled(writes);
    const failure = settled.find((r) => r.status === 'rejected');
    if (failure) throw failure.reason;
  };

  await Promise.all(Array.from({ length: workers }, worker));
  stats.elapsedMs = performance.now() - started;
  report();
  return stats;
}

/**
 * Splits the allocation map into work. Data ranges are widened to the writer's granularity (a cluster
 * that holds any data is copied whole, its zero parts found by the scan) and cut at chunk-aligned
 * boundaries; the ranges between them are zero work, kept whole.
 */
async function* chunkStream(extents: AsyncIterable<Extent>, total: number, chunkSize: number, granularity: number): AsyncIterable<Chunk> {
  let seq = 0;
  let covered = 0;
  let zeroFrom = -1;
  const alignDown = (v: number) => v - (v % granularity);
  const alignUp = (v: number) => Math.min(total, Math.ceil(v / granularity) * granularity);
  function* zeroes(from: number, to: number): Iterable<Chunk> {
    for (let pos = from; pos < to; pos += ZERO_CHUNK) yield { offset: pos, length: Math.min(to - pos, ZERO_CHUNK), kind: 'zero', seq: seq++ };
  }
  for await (const ext of extents) {
    const end = ext.offset + ext.length;
    if (ext.kind !== 'data') {
      if (zeroFrom < 0) zeroFrom = Math.max(covered, ext.offset);
      continue;
    }
    const start = Math.max(covered, alignDown(ext.offset));
    if (zeroFrom >= 0) {
      yield* zeroes(zeroFrom, start);
      zeroFrom = -1;
    }
    const stop = Math.max(start, alignUp(end));
    for (let pos = start; pos < stop; ) {
      const next = Math.min(stop, (Math.floor(pos / chunkSize) + 1) * chunkSize);
      yield { offset: pos, length: next - pos, kind: 'data', seq: seq++ };
      pos = next;
    }
    covered = stop;
  }
  if (zeroFrom >= 0) yield* zeroes(zeroFrom, total);
  else if (covered < total) yield* zeroes(covered, total);
}

/**
 * Starts writes in sequence order when the writer needs it; otherwise immediately. The next write starts
 * as soon as the previous one has been *called*, not when it completes, so an in-order writer can still
 * compress several chunks in parallel and append the results in call order.
 */
class InOrder {
  private nextSeq = 0;
  private readonly waiting = new Map<number, () => void>();

  constructor(private readonly enabled: boolean) {}

  async run(seq: number, fn: () => Promise<void>): Promise<void> {
    if (!this.enabled) return fn();
    if (seq !== this.nextSeq) await new Promise<void>((resolve) => this.waiting.set(seq, resolve));
    let started: Promise<void>;
    try {
      started = fn();
    } finally {
      this.advance();
    }
    await started;
  }

  skip(seq: number): void {
    if (!this.enabled) return;
    void this.run(seq, async () => undefined);
  }

  private advance(): void {
    this.nextSeq++;
    const wake = this.waiting.get(this.nextSeq);
    if (wake) {
      this.waiting.delete(this.nextSeq);
      wake();
    }
  }
}
