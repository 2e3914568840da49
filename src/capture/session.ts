import { rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { Logger } from 'pino';
import { convertImage } from '../convert/convert.js';
import { openDisk } from '../convert/open.js';
import { findDriver } from '../convert/registry.js';
import { CancelledError } from '../errors.js';
import { hashChunks, HASH_SIZE } from '../transfer/chunk-codec.js';
import { CaptureConsistencyError, VerificationError } from './errors.js';
import { planCapture, type CapturePlan, type FilesystemArea } from './plan.js';
import type { BlockSource, ReceivedChunk } from './source.js';
import { WorkingImage, workingPaths } from './working-image.js';

export interface CaptureSettings {
  dest: string;
  /** Output format (any Ferry writes) and its -o options. */
  format: string;
  formatOptions?: Record<string, string>;
  compress?: boolean;
  chunkSize: number;
  /** Bring an existing DEST up to date with one more incremental pass (a cutover long after the first copy). */
  sync: boolean;
  /** Freeze the device's mounted filesystems for the final pass. */
  freeze: boolean;
  freezeTimeoutMs: number;
  /** Live passes, the first full copy included; a frozen final pass comes on top. */
  maxPasses: number;
  /** With freezing: stop the live passes once one changes no more than this, then freeze for the last one. */
  convergeBytes: number;
  /** Skip free blocks of filesystems Ferry understands. */
  usedBlocksOnly: boolean;
  signal?: AbortSignal;
  onProgress?: (p: CaptureProgress) => void;
  log: Logger;
}

/** plan: reading the source's layout; copy: the first full pass; sync: a live incremental pass;
 *  frozen: the final pass with filesystems frozen; convert: writing DEST's format; verify: checking DEST. */
export type CapturePhase = 'plan' | 'copy' | 'sync' | 'frozen' | 'convert' | 'verify';

export interface CaptureProgress {
  phase: CapturePhase;
  pass: number;
  /** Bytes of this phase processed, of `total`. */
  done: number;
  total: number;
  /** Source bytes the agent read (data and hashes), since the start of this run. */
  bytesRead: number;
  /** Bytes received over the network. */
  bytesOnWire: number;
  /** Bytes written into the working image. */
  bytesWritten: number;
}

export interface CaptureResult {
  source: string;
  dest: string;
  format: string;
  size: number;
  /** Bytes of the source the image covers (allocated and in use). */
  capturedBytes: number;
  start: 'fresh' | 'resumed' | 'seeded';
  /** Bytes the journal already vouched for at the start (not fetched again unless they changed). */
  resumedBytes: number;
  passes: number;
  /** Mount points frozen for the final pass; empty when none was frozen. */
  frozen: string[];
  /** Bytes fetched again by the incremental passes. */
  changedBytes: number;
  filesystems: FilesystemArea[];
  bytesRead: number;
  bytesOnWire: number;
  bytesWritten: number;
  elapsedMs: number;
}

/** Chunks per READ request: large enough to keep the agent streaming, small enough to balance channels. */
const READ_RUN_CHUNKS = 64;
const HASH_RUN_CHUNKS = 256;
const VERIFY_BATCH = 16 * 1024 * 1024;
const VERIFY_READERS = 4;

/**
 * Drives one disk's capture: a full first pass while the source runs, incremental passes that hash the
 * source and fetch what changed until the delta is small, a final pass with the filesystems frozen where
 * there are any, then DEST in its format and an end-to-end check of every captured chunk against the
 * source's hashes. All state lives in the working image and its journal, so any interruption resumes.
 */
export class CaptureSession {
  private image!: WorkingImage;
  private progress: CaptureProgress = { phase: 'plan', pass: 0, done: 0, total: 0, bytesRead: 0, bytesOnWire: 0, bytesWritten: 0 };
  private changedBytes = 0;

  constructor(
    private readonly source: BlockSource,
    private readonly settings: CaptureSettings,
  ) {}

  async run(): Promise<CaptureResult> {
    const started = performance.now();
    const s = this.settings;
    const chunkSize = s.chunkSize;
    const opened = await WorkingImage.open(s.dest, { source: this.source.description, size: this.source.size, chunkSize }, { sync: s.sync, log: s.log });
    this.image = opened.image;
    s.log.info({ source: this.source.description, dest: s.dest, start: opened.start, knownBytes: opened.knownBytes }, 'capture starting');
    try {
      this.enter('plan', 0, 0);
      const mounts = s.freeze ? await this.source.mountPoints() : [];
      const freezing = mounts.length > 0;
      let plan = await this.plan(false, opened.start !== 'fresh');

      // Pass 1: everything the journal does not know yet.
      let pass = 1;
      let changed = await this.copy(plan, (i) => !this.image.journal.has(i), 'copy', pass);
      for (;;) {
        if (freezing && changed <= s.convergeBytes && pass > 1) break;
        if (pass >= s.maxPasses) {
          if (freezing) break;
          throw new CaptureConsistencyError(
            `${this.source.description} kept changing: ${pass} passes without one that found nothing new (the last fetched ${changed} bytes). ` +
              'Stop the writers or capture a device with mounted filesystems so Ferry can freeze them; the copy so far is kept for the next run',
          );
        }
        pass++;
        // Without a freeze every pass may be the last, so its plan must be exact.
        plan = await this.plan(!freezing, true);
        changed = await this.syncPass(plan, 'sync', pass, false);
        this.changedBytes += changed;
        if (!freezing && changed === 0) break;
      }
      if (freezing) {
        pass++;
        plan = await this.frozenPass(mounts, pass);
      }
      await this.image.checkpoint();
      await this.produceDestination(plan);
      await this.image.remove();
      const counters = this.source.counters;
      return {
        source: this.source.description,
        dest: s.dest,
        format: findDriver(s.format).name,
        size: this.source.size,
        capturedBytes: plan.bytes,
        start: opened.start,
        resumedBytes: opened.knownBytes,
        passes: pass,
        frozen: freezing ? mounts : [],
        changedBytes: this.changedBytes,
        filesystems: plan.filesystems,
        bytesRead: counters.bytesRead,
        bytesOnWire: counters.bytesOnWire,
        bytesWritten: this.image.bytesWritten,
        elapsedMs: performance.now() - started,
      };
    } catch (err) {
      // Keep everything already written for the next run: make it durable before giving up.
      await this.image.checkpoint().catch(() => undefined);
      await this.image.close();
      throw err;
    }
  }

  private async frozenPass(mounts: string[], pass: number): Promise<CapturePlan> {
    const s = this.settings;
    this.enter('frozen', pass, 0);
    s.log.info({ mounts, timeoutMs: s.freezeTimeoutMs }, 'freezing for the final pass');
    await this.source.freeze(mounts, s.freezeTimeoutMs);
    let plan: CapturePlan;
    let held = false;
    try {
      // Frozen filesystems have flushed their journals: their bitmaps are exact now.
      plan = await this.plan(true, true);
      this.changedBytes += await this.syncPass(plan, 'frozen', pass, true);
    } finally {
      held = (await this.source.thaw()).heldUntilThaw;
    }
    if (!held) {
      throw new CaptureConsistencyError(
        `the final pass outlasted --freeze-timeout (${s.freezeTimeoutMs / 1000} s) and the source thawed itself, so the image is not one point in time. ` +
          'Run the same command again (only the changes are fetched) with a longer --freeze-timeout',
      );
    }
    return plan;
  }

  /** Plans a pass and empties the working image's chunks outside it. */
  private async plan(exact: boolean, mayHoldStaleData: boolean): Promise<CapturePlan> {
    const plan = await planCapture(this.source, this.settings.chunkSize, { usedBlocksOnly: this.settings.usedBlocksOnly, exact });
    this.settings.log.info({ bytes: plan.bytes, table: plan.table.kind, filesystems: plan.filesystems }, 'capture plan');
    // A chunk that left the plan (now a hole, or free space) must not keep an older pass's data.
    const journal = this.image.journal;
    const outside = (i: number) => !plan.chunks[i] && (mayHoldStaleData || journal.has(i));
    for (let i = 0; i < plan.chunks.length; ) {
      if (!outside(i)) {
        i++;
        continue;
      }
      let n = 1;
      while (i + n < plan.chunks.length && outside(i + n)) n++;
      await this.image.clear(i, n);
      i += n;
    }
    return plan;
  }

  /** Fetches the plan's chunks selected by `want`; returns the bytes fetched. */
  private async copy(plan: CapturePlan, want: (index: number) => boolean, phase: CapturePhase, pass: number): Promise<number> {
    const runs = [...chunkRuns(plan, want, READ_RUN_CHUNKS)];
    this.enter(phase, pass, runs.reduce((n, [first, count]) => n + this.runBytes(first, count), 0));
    let fetched = 0;
    await this.inParallel(runs, async ([first, count]) => {
      fetched += await this.fetch(first, count, undefined);
    });
    return fetched;
  }

  /**
   * Hashes the plan's chunks at the source and fetches those whose hash differs from the journal's. When
   * frozen, a fetched chunk must hash to what the source reported a moment before: the data cannot change.
   */
  private async syncPass(plan: CapturePlan, phase: CapturePhase, pass: number, frozen: boolean): Promise<number> {
    const runs = [...chunkRuns(plan, () => true, HASH_RUN_CHUNKS)];
    this.enter(phase, pass, plan.bytes);
    const image = this.image;
    const C = this.settings.chunkSize;
    let changedBytes = 0;
    await this.inParallel(runs, async ([first, count]) => {
      const length = this.runBytes(first, count);
      const hashes = await this.source.hashes(first * C, length, C);
      this.advance(length);
      for (let j = 0; j < count; ) {
        if (image.holds(first + j, hashes, j * HASH_SIZE)) {
          j++;
          continue;
        }
        let n = 1;
        while (j + n < count && n < READ_RUN_CHUNKS && !image.holds(first + j + n, hashes, (j + n) * HASH_SIZE)) n++;
        this.settings.log.debug({ offset: (first + j) * C, chunks: n }, 'changed at the source');
        const expected = frozen ? hashes.subarray(j * HASH_SIZE, (j + n) * HASH_SIZE) : undefined;
        changedBytes += await this.fetch(first + j, n, expected, false);
        j += n;
      }
    });
    return changedBytes;
  }

  private async fetch(first: number, count: number, expected: Buffer | undefined, countProgress = true): Promise<number> {
    const C = this.settings.chunkSize;
    const length = this.runBytes(first, count);
    await this.source.read(first * C, length, C, async (chunk: ReceivedChunk) => {
      const index = chunk.offset / C;
      if (expected && !chunk.hash.equals(expected.subarray((index - first) * HASH_SIZE, (index - first + 1) * HASH_SIZE))) {
        throw new CaptureConsistencyError(
          `${this.source.description}: the chunk at ${chunk.offset} changed while the filesystems were frozen (something writes to the device directly)`,
        );
      }
      await this.image.store(index, chunk);
      if (countProgress) this.advance(chunk.length);
      else this.report();
    });
    return length;
  }

  /** Writes DEST in its format from the working image, verifies it, and only then puts it in place. */
  private async produceDestination(plan: CapturePlan): Promise<void> {
    const s = this.settings;
    const driver = findDriver(s.format);
    if (driver.name === 'raw') {
      // The working image already is the raw disk: verify it and rename it into place.
      await this.verify(this.image.path, 'raw', plan);
      await rename(this.image.path, s.dest);
      return;
    }
    const staging = join(dirname(s.dest), `${basename(workingPaths(s.dest).working, '.raw')}.${driver.name}`);
    await rm(staging, { force: true });
    this.enter('convert', this.progress.pass, this.source.size);
    await convertImage({
      source: this.image.path,
      sourceFormat: 'raw',
      target: staging,
      targetFormat: driver.name,
      options: s.formatOptions,
      compress: s.compress,
      durable: true,
      pipeline: { signal: s.signal, onProgress: (p) => this.update(p.done) },
    });
    try {
      await this.verify(staging, driver.name, plan);
      await rename(staging, s.dest);
    } catch (err) {
      await rm(staging, { force: true });
      throw err;
    }
  }

  /** Reads every captured chunk back from `path` and compares its hash with the source's. */
  private async verify(path: string, format: string, plan: CapturePlan): Promise<void> {
    this.enter('verify', this.progress.pass, plan.bytes);
    const C = this.settings.chunkSize;
    const perRead = Math.max(1, Math.floor(VERIFY_BATCH / C));
    const runs = [...chunkRuns(plan, () => true, perRead)];
    const disk = await openDisk(path, { format });
    let mismatches = 0;
    let firstBad = Infinity;
    try {
      // A few readers at once: reading an image back is decoding (qcow2 tables, decompression), not just I/O.
      let next = 0;
      await Promise.all(
        Array.from({ length: Math.min(VERIFY_READERS, runs.length) }, async () => {
          const buffer = Buffer.allocUnsafe(perRead * C);
          while (next < runs.length) {
            this.throwIfCancelled();
            const [first, count] = runs[next++];
            const length = this.runBytes(first, count);
            await disk.read(first * C, length, buffer);
            const hashes = await hashChunks(buffer, length, C);
            for (let j = 0; j < count; j++) {
              if (this.image.holds(first + j, hashes, j * HASH_SIZE)) continue;
              mismatches++;
              firstBad = Math.min(firstBad, (first + j) * C);
            }
            this.advance(length);
          }
        }),
      );
    } finally {
      await disk.close();
    }
    this.settings.log.info({ path, chunks: runs.length, mismatches }, 'destination verified against the source hashes');
    if (mismatches) {
      throw new VerificationError(`${mismatches} chunk(s) differ from the source, the first at byte ${firstBad}; the destination was not written`, { file: path });
    }
  }

  /**
   * Runs `fn` over items with as many requests in flight as keep every channel busy (two each, pipelined).
   * After a failure no new item starts, and the call settles only when the items in flight have.
   */
  private async inParallel<T>(items: T[], fn: (item: T) => Promise<void>): Promise<void> {
    let next = 0;
    let failure: { error: unknown } | undefined;
    const worker = async () => {
      while (next < items.length && !failure) {
        try {
          this.throwIfCancelled();
          await fn(items[next++]);
        } catch (error) {
          failure ??= { error };
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(items.length, this.source.parallelism * 2) }, worker));
    if (failure) throw failure.error;
  }

  private throwIfCancelled(): void {
    if (this.settings.signal?.aborted) throw new CancelledError('capture cancelled');
  }

  private runBytes(first: number, count: number): number {
    const C = this.settings.chunkSize;
    return Math.min((first + count) * C, this.source.size) - first * C;
  }

  private enter(phase: CapturePhase, pass: number, total: number): void {
    this.progress = { ...this.progress, phase, pass, done: 0, total };
    this.report();
  }

  private advance(bytes: number): void {
    this.progress.done += bytes;
    this.report();
  }

  private update(done: number): void {
    this.progress.done = done;
    this.report();
  }

  private report(): void {
    const c = this.source.counters;
    this.progress.bytesRead = c.bytesRead;
    this.progress.bytesOnWire = c.bytesOnWire;
    this.progress.bytesWritten = this.image.bytesWritten;
    this.settings.onProgress?.({ ...this.progress });
  }
}

/** Runs of consecutive planned chunks selected by `want`, at most `max` chunks each: [first, count]. */
function* chunkRuns(plan: CapturePlan, want: (index: number) => boolean, max: number): Iterable<[number, number]> {
  const { chunks } = plan;
  for (let i = 0; i < chunks.length; ) {
    if (!chunks[i] || !want(i)) {
      i++;
      continue;
    }
    let n = 1;
    while (n < max && i + n < chunks.length && chunks[i + n] && want(i + n)) n++;
    yield [i, n];
    i += n;
  }
}
