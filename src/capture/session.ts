import { open, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { Logger } from 'pino';
import { convertImage } from '../convert/convert.js';
import { openDisk } from '../convert/open.js';
import { findDriver } from '../convert/registry.js';
import { CancelledError } from '../errors.js';
import { hashChunks, HASH_SIZE, runHash } from '../transfer/chunk-codec.js';
import { chunksPerFrame } from '../transfer/protocol.js';
import { CaptureConsistencyError, VerificationError } from './errors.js';
import { planCapture, type CapturePlan, type FilesystemArea } from './plan.js';
import type { BlockSource, ReceivedRun } from './source.js';
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
  /** Read an LVM logical volume from a temporary snapshot when its volume group has room (capture.ts). */
  snapshot: boolean;
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
  /** The temporary LVM snapshot read instead of the volume, when one was taken. */
  snapshot?: { name: string; cowBytes: number };
  /** Bytes fetched again by the incremental passes. */
  changedBytes: number;
  filesystems: FilesystemArea[];
  bytesRead: number;
  bytesOnWire: number;
  bytesWritten: number;
  elapsedMs: number;
}

/** Bytes per READ request: large enough to keep the agent streaming, small enough to balance channels. */
const READ_RUN_BYTES = 16 * 1024 * 1024;
/** Bytes per HASH request of a sync pass. */
const HASH_RUN_BYTES = 64 * 1024 * 1024;
const VERIFY_BATCH = 16 * 1024 * 1024;
const VERIFY_READERS = 4;

/** DEST's format being written from the working image, possibly while a last pass checks the source. */
interface Conversion {
  /** Resolves with the written file, or undefined for raw (the working image is DEST). */
  result: Promise<string | undefined>;
  /** Stops the conversion and removes what it wrote. */
  cancel(): Promise<void>;
}

/**
 * Drives one disk's capture: a full first pass while the source runs, incremental passes that hash the
 * source and fetch what changed until the delta is small, a final pass with the filesystems frozen where
 * there are any, then DEST in its format and an end-to-end check of every captured chunk against the
 * source's hashes. All state lives in the working image and its journal, so any interruption resumes.
 */
export class CaptureSession {
  private image!: WorkingImage;
  /** The conversion's progress, reported while the phase is 'convert'. */
  private convertedBytes = 0;
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
    let conversion: Conversion | undefined;
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
        // ... and DEST is written while it runs: kept if the pass finds nothing changed (the usual outcome
        // once a source is quiet), redone otherwise. The pass mostly waits for the source meanwhile.
        if (!freezing) conversion = this.convert();
        changed = await this.syncPass(plan, 'sync', pass, false);
        this.changedBytes += changed;
        if (!freezing && changed === 0) break;
        await conversion?.cancel();
        conversion = undefined;
      }
      if (freezing) {
        pass++;
        plan = await this.frozenPass(mounts, pass);
      }
      // Recorded for a rerun should Ferry be stopped while DEST is written; made durable only if that fails.
      await this.image.flush();
      conversion ??= this.convert();
      await this.finishDestination(plan, conversion);
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
      await conversion?.cancel();
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
    const runs = [...chunkRuns(plan, want, this.chunksPer(READ_RUN_BYTES))];
    this.enter(phase, pass, runs.reduce((n, [first, count]) => n + this.runBytes(first, count), 0));
    let fetched = 0;
    await this.inParallel(runs, async ([first, count]) => {
      fetched += await this.fetch(first, count, undefined);
    });
    return fetched;
  }

  /**
   * Hashes the plan's chunks at the source and fetches those whose hash differs from the journal's. The
   * source hashes groups of chunks (a DATA frame's worth) first, and its chunks one by one only inside a group
   * that differs: a pass over a quiet disk costs 8 bytes per group on the wire. When frozen, a fetched chunk
   * must hash to what the source reported a moment before: the data cannot change.
   */
  private async syncPass(plan: CapturePlan, phase: CapturePhase, pass: number, frozen: boolean): Promise<number> {
    const C = this.settings.chunkSize;
    const group = chunksPerFrame(C);
    const runs = [...chunkRuns(plan, () => true, Math.max(group, this.chunksPer(HASH_RUN_BYTES)))];
    this.enter(phase, pass, plan.bytes);
    let changedBytes = 0;
    await this.inParallel(runs, async ([first, count]) => {
      const length = this.runBytes(first, count);
      const hashes = await this.source.hashes(first * C, length, C, group);
      this.advance(length);
      if (group === 1) {
        changedBytes += await this.fetchChanged(first, count, hashes, frozen);
        return;
      }
      for (let g = 0; g < count; g += group) {
        const n = Math.min(group, count - g);
        if (this.holdsRun(first + g, n, hashes, (g / group) * HASH_SIZE)) continue;
        changedBytes += await this.fetchChanged(first + g, n, await this.source.hashes((first + g) * C, this.runBytes(first + g, n), C), frozen);
      }
    });
    return changedBytes;
  }

  /** Fetches the chunks of [first, first+count) whose hash at the source (`hashes`, one per chunk) the image does not hold. */
  private async fetchChanged(first: number, count: number, hashes: Buffer, frozen: boolean): Promise<number> {
    const C = this.settings.chunkSize;
    const image = this.image;
    const perRead = this.chunksPer(READ_RUN_BYTES);
    let fetched = 0;
    for (let j = 0; j < count; ) {
      if (image.holds(first + j, hashes, j * HASH_SIZE)) {
        j++;
        continue;
      }
      let n = 1;
      while (j + n < count && n < perRead && !image.holds(first + j + n, hashes, (j + n) * HASH_SIZE)) n++;
      this.settings.log.debug({ offset: (first + j) * C, chunks: n }, 'changed at the source');
      const expected = frozen ? hashes.subarray(j * HASH_SIZE, (j + n) * HASH_SIZE) : undefined;
      fetched += await this.fetch(first + j, n, expected, false);
      j += n;
    }
    return fetched;
  }

  /** Whether chunks [first, first+count) hold what the source's run hash at hashes[at, at+8) stands for. */
  private holdsRun(first: number, count: number, hashes: Buffer, at: number): boolean {
    const known = Buffer.allocUnsafe(count * HASH_SIZE);
    for (let j = 0; j < count; j++) {
      const h = this.image.knownHash(first + j);
      if (!h) return false;
      h.copy(known, j * HASH_SIZE);
    }
    return runHash(known).compare(hashes, at, at + HASH_SIZE) === 0;
  }

  private async fetch(first: number, count: number, expected: Buffer | undefined, countProgress = true): Promise<number> {
    const C = this.settings.chunkSize;
    const length = this.runBytes(first, count);
    await this.source.read(first * C, length, C, async (run: ReceivedRun) => {
      const index = run.offset / C;
      if (expected && !run.hashes.equals(expected.subarray((index - first) * HASH_SIZE, (index - first) * HASH_SIZE + run.hashes.length))) {
        throw new CaptureConsistencyError(
          `${this.source.description}: data at ${run.offset} changed while the filesystems were frozen (something writes to the device directly)`,
        );
      }
      await this.image.store(index, run);
      if (countProgress) this.advance(run.length);
      else this.report();
    });
    return length;
  }

  /** Starts writing DEST's format from the working image into a staging file beside DEST. */
  private convert(): Conversion {
    const s = this.settings;
    const driver = findDriver(s.format);
    if (driver.name === 'raw') return { result: Promise.resolve(undefined), cancel: async () => undefined };
    const staging = join(dirname(s.dest), `${basename(workingPaths(s.dest).working, '.raw')}.${driver.name}`);
    const stop = new AbortController();
    if (s.signal?.aborted) stop.abort();
    else s.signal?.addEventListener('abort', () => stop.abort(), { once: true, signal: stop.signal });
    this.convertedBytes = 0;
    const result = (async () => {
      await rm(staging, { force: true });
      await convertImage({
        source: this.image.path,
        sourceFormat: 'raw',
        target: staging,
        targetFormat: driver.name,
        options: s.formatOptions,
        compress: s.compress,
        pipeline: {
          signal: stop.signal,
          onProgress: (p) => {
            this.convertedBytes = p.done;
            if (this.progress.phase === 'convert') this.update(p.done);
          },
        },
      });
      return staging;
    })();
    // Awaited (or cancelled) later; a failure meanwhile must not count as unhandled.
    result.catch(() => undefined);
    return {
      result,
      cancel: async () => {
        stop.abort();
        await result.catch(() => undefined);
        await rm(staging, { force: true });
      },
    };
  }

  /** Waits for DEST's conversion, makes it durable and verifies it, and only then puts it in place. */
  private async finishDestination(plan: CapturePlan, conversion: Conversion): Promise<void> {
    const s = this.settings;
    const format = findDriver(s.format).name;
    if (format !== 'raw') {
      this.enter('convert', this.progress.pass, this.source.size);
      this.update(this.convertedBytes);
    }
    const staging = await conversion.result;
    if (!staging) {
      // The working image already is the raw disk: make it durable and verify it (at once: the one waits
      // for the disk, the other for the CPU), then rename it into place.
      await Promise.all([this.image.syncData(), this.verify(this.image.path, 'raw', plan)]);
      await rename(this.image.path, s.dest);
      return;
    }
    try {
      // DEST must be durable before the working image goes; its fsync runs while it is read back.
      await Promise.all([syncFile(staging), this.verify(staging, format, plan)]);
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
            // Mapped from the page cache where the run is one stretch of the file, so it is hashed in place.
            const { data, release } = await disk.readScanned(first * C, length, buffer, C);
            let hashes: Buffer;
            try {
              hashes = await hashChunks(data, length, C);
            } finally {
              release();
            }
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

  /** How many chunks make `bytes` (at least one). */
  private chunksPer(bytes: number): number {
    return Math.max(1, Math.floor(bytes / this.settings.chunkSize));
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

async function syncFile(path: string): Promise<void> {
  const handle = await open(path, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
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
