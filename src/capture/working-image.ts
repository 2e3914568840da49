import { open, rm, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { Logger } from 'pino';
import { convertImage } from '../convert/convert.js';
import { InvalidOptionError } from '../errors.js';
import { native, type WriteLane } from '../native.js';
import { hashChunks, HASH_SIZE, zeroChunkHash } from '../transfer/chunk-codec.js';
import { Journal, type JournalMeta } from '../transfer/journal.js';
import type { ReceivedRun } from './source.js';

/** Journal records reach the file (without fsync) this often: a killed Ferry or a lost connection re-sends at most this much. */
const JOURNAL_FLUSH_MS = 250;
/**
 * Data and journal are fsynced together this often: what a crash of this machine can cost. The kernel writes
 * dirty pages back after 30 s by default (vm.dirty_expire_centisecs), so syncing as often adds little disk
 * work, while a capture that ends sooner never forces its working image to disk.
 */
const DURABLE_INTERVAL_MS = 30_000;
const ZERO_SCAN = 4096;
const VERIFY_BATCH = 16 * 1024 * 1024;
const ZERO_WRITE_PIECE = 4 * 1024 * 1024;

/** The files a capture keeps beside DEST while it runs: removed once DEST is complete and verified. */
export function workingPaths(dest: string): { working: string; journal: string } {
  const base = join(dirname(dest), `.${basename(dest)}.ferry-capture`);
  return { working: `${base}.raw`, journal: `${base}.journal` };
}

export interface OpenedWorkingImage {
  image: WorkingImage;
  /** How the capture starts: from nothing, continuing an interrupted run, or from an existing DEST (--sync). */
  start: 'fresh' | 'resumed' | 'seeded';
  /** Bytes of chunks whose content the journal vouches for. */
  knownBytes: number;
}

/**
 * A capture's random-access, resumable copy of the source: a sparse raw file plus a journal of what it holds.
 * Capturing into raw first (rather than straight into the target format) is what makes resume and later
 * incremental passes possible for every format: a streamOptimized VMDK can only be written once, in order,
 * and even qcow2 would need rewrites of compressed clusters. The final format is made from it at the end
 * by the ordinary conversion pipeline.
 *
 * Invariant: a chunk the journal knows has exactly its recorded hash in the working file, unless this
 * machine crashed before the data reached the disk. Records are appended only after their data was written,
 * and every open rehashes the chunks the journal knows (verifyAgainstJournal), so a record the crash made
 * untrue costs a refetch, never a wrong image. A checkpoint fsyncs the data before the journal: what it
 * made durable is never fetched again.
 */
export class WorkingImage {
  private lastFlush = performance.now();
  private lastDurable = performance.now();
  /** Records were appended (or data written) since the last fsync. */
  private unsynced = false;
  private checkpointing: Promise<void> = Promise.resolve();
  private checkpointRunning = false;
  /** A background checkpoint failed: the next store reports it. */
  private checkpointFailure: { error: unknown } | undefined;
  /**
   * Chunks the journal does not know but that are certainly zero in the working file: all of a new file,
   * and whatever `clear` emptied. Kept in memory only (a resumed file may hold unjournaled writes), it
   * spares the journal a record per empty chunk and lets a chunk that joins the plan as zero be left alone.
   */
  private readonly knownZero: Uint8Array;
  /** The output lane (native openWriteLane, as output-file.ts): writes in order on a thread of their own. */
  private readonly lane: WriteLane;
  bytesWritten = 0;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    readonly journal: Journal,
    newFile: boolean,
  ) {
    this.knownZero = new Uint8Array(journal.chunkCount).fill(newFile ? 1 : 0);
    this.lane = native.openWriteLane(handle.fd);
  }

  get chunkSize(): number {
    return this.journal.meta.chunkSize;
  }

  get size(): number {
    return this.journal.meta.size;
  }

  static async open(dest: string, meta: JournalMeta, opts: { sync: boolean; log: Logger }): Promise<OpenedWorkingImage> {
    const paths = workingPaths(dest);
    const journal = await Journal.load(paths.journal);
    if (journal) {
      const m = journal.meta;
      if (m.source !== meta.source || m.size !== meta.size || m.chunkSize !== meta.chunkSize) {
        await journal.close();
        throw new InvalidOptionError(
          `${paths.journal} belongs to an interrupted capture of ${m.source} (${m.size} bytes); finish that one, or delete ${paths.journal} and ${paths.working} to start over`,
          { file: dest },
        );
      }
      const size = await stat(paths.working).then((s) => s.size).catch(() => -1);
      if (size === meta.size) {
        const handle = await open(paths.working, 'r+');
        const image = new WorkingImage(paths.working, handle, journal, false);
        const knownBytes = await image.verifyAgainstJournal(opts.log);
        return { image, start: 'resumed', knownBytes };
      }
      opts.log.warn({ working: paths.working }, 'journal without its working image: starting over');
      await journal.close();
    }
    const destExists = await stat(dest).then(() => true).catch(() => false);
    if (destExists && !opts.sync) {
      throw new InvalidOptionError(`${dest} exists: use --sync to bring it up to date, or choose another destination`, { file: dest });
    }
    if (!destExists && opts.sync) throw new InvalidOptionError(`--sync needs an existing ${dest} from an earlier capture`, { file: dest });
    if (destExists) {
      // Start from DEST's content, so the incremental pass only fetches what changed since.
      await rm(paths.working, { force: true });
      await convertImage({ source: dest, target: paths.working, targetFormat: 'raw', durable: true });
      if ((await stat(paths.working)).size !== meta.size) {
        await rm(paths.working, { force: true });
        throw new InvalidOptionError(`${dest} is not the size of the source (${meta.size} bytes): --sync cannot update it`, { file: dest });
      }
    } else {
      const h = await open(paths.working, 'w', 0o600);
      await h.truncate(meta.size);
      await h.close();
    }
    const fresh = await Journal.create(paths.journal, meta);
    const handle = await open(paths.working, 'r+');
    const image = new WorkingImage(paths.working, handle, fresh, !destExists);
    let knownBytes = 0;
    if (destExists) {
      knownBytes = await image.recordExistingContent();
      await image.checkpoint();
    }
    return { image, start: destExists ? 'seeded' : 'fresh', knownBytes };
  }

  /**
   * Stores a received run of chunks starting at chunk `first`: data written, zero ranges punched out (they
   * may hold an older pass's data) unless every chunk of the run is known to be zero already.
   */
  async store(first: number, run: ReceivedRun): Promise<void> {
    if (this.checkpointFailure) throw this.checkpointFailure.error;
    const count = run.hashes.length / HASH_SIZE;
    let mayHoldData = false;
    for (let i = first; i < first + count && !mayHoldData; i++) mayHoldData = !this.knownZero[i];
    if (!run.data) {
      if (mayHoldData) await this.zero(run.offset, run.length);
    } else {
      const { runs } = await native.scanZeroes(run.data, run.length, ZERO_SCAN);
      const writes: Array<Promise<void>> = [];
      let at = 0;
      for (let i = 0; i < runs.length; i++) {
        const len = runs[i];
        if (len === 0) continue;
        if (i % 2 === 0) writes.push(this.writeAll(run.data.subarray(at, at + len), run.offset + at));
        else if (mayHoldData) writes.push(this.zero(run.offset + at, len));
        at += len;
      }
      await Promise.all(writes);
    }
    this.bytesWritten += run.length;
    this.unsynced = true;
    for (let j = 0; j < count; j++) {
      this.knownZero[first + j] = run.data ? 0 : 1;
      this.journal.stage(first + j, run.hashes.subarray(j * HASH_SIZE, (j + 1) * HASH_SIZE));
    }
    this.maybeCheckpoint();
  }

  /** Empties chunks the capture no longer covers (holes or free space now), so the image matches its plan. */
  async clear(first: number, count: number): Promise<void> {
    const offset = first * this.chunkSize;
    await this.zero(offset, Math.min((first + count) * this.chunkSize, this.size) - offset);
    this.unsynced = true;
    for (let i = first; i < first + count; i++) {
      if (this.journal.has(i)) this.journal.stage(i, zeroChunkHash(this.chunkLength(i)));
      this.knownZero[i] = 1;
    }
  }

  /** The hash of what chunk `index` holds, when Ferry knows it. */
  knownHash(index: number): Buffer | undefined {
    if (this.journal.has(index)) return this.journal.hash(index);
    return this.knownZero[index] ? zeroChunkHash(this.chunkLength(index)) : undefined;
  }

  /** Whether chunk `index` holds the data whose hash is hashes[at, at+8). */
  holds(index: number, hashes: Buffer, at = 0): boolean {
    const known = this.knownHash(index);
    return known !== undefined && known.compare(hashes, at, at + HASH_SIZE) === 0;
  }

  /**
   * Starts a journal flush or a checkpoint in the background when one is due. Writes go on meanwhile: the
   * fsync waits for the disk, the transfer need not.
   */
  private maybeCheckpoint(): void {
    if (this.checkpointRunning) return;
    const now = performance.now();
    const due = now - this.lastDurable >= DURABLE_INTERVAL_MS ? this.checkpoint() : now - this.lastFlush >= JOURNAL_FLUSH_MS ? this.flush() : undefined;
    due?.catch((error: unknown) => (this.checkpointFailure ??= { error }));
  }

  /** Appends the records staged so far to the journal without fsync: enough for a rerun after Ferry or the connection died. */
  async flush(): Promise<void> {
    if (this.checkpointFailure) throw this.checkpointFailure.error;
    if (!this.journal.stagedCount) return;
    return this.serialized(async () => {
      this.lastFlush = performance.now();
      await this.journal.append(this.journal.takeStaged());
    });
  }

  /** Makes everything stored so far durable: fsync the data, then append the journal records for it and fsync them. */
  checkpoint(): Promise<void> {
    return this.serialized(async () => {
      this.lastFlush = this.lastDurable = performance.now();
      const records = this.journal.takeStaged();
      if (!records.length && !this.unsynced) return;
      this.unsynced = false;
      await this.handle.datasync();
      await this.journal.commit(records);
    });
  }

  /** Makes the working file itself durable (it becomes a raw DEST); the journal is about to go. */
  async syncData(): Promise<void> {
    await this.handle.datasync();
  }

  private serialized(step: () => Promise<void>): Promise<void> {
    const run = this.checkpointing.then(async () => {
      this.checkpointRunning = true;
      try {
        await step();
      } finally {
        this.checkpointRunning = false;
      }
    });
    this.checkpointing = run.catch(() => undefined);
    return run;
  }

  /** Closes the files, keeping them for a later resume. */
  async close(): Promise<void> {
    await this.checkpointing;
    native.closeWriteLane(this.lane);
    await this.handle.close().catch(() => undefined);
    await this.journal.close().catch(() => undefined);
  }

  /** Removes the working image and its journal (after DEST is complete, or when the working file became DEST). */
  async remove(): Promise<void> {
    await this.close();
    await rm(this.path, { force: true });
    await rm(this.journal.path, { force: true });
  }

  /**
   * Rehashes every chunk the journal knows from the working file, and forgets those that differ (somebody
   * touched the file, or the disk lost a write the journal trusted). Returns the bytes still known.
   */
  private async verifyAgainstJournal(log: Logger): Promise<number> {
    let knownBytes = 0;
    let forgotten = 0;
    await this.forEachRun((i) => this.journal.has(i), async (first, hashes) => {
      for (let j = 0; j < hashes.length / HASH_SIZE; j++) {
        if (this.journal.matches(first + j, hashes, j * HASH_SIZE)) knownBytes += this.chunkLength(first + j);
        else {
          this.journal.forget(first + j);
          forgotten++;
        }
      }
    });
    if (forgotten) {
      log.warn({ working: this.path, chunks: forgotten }, 'working image chunks differ from the journal: they will be fetched again');
      await this.journal.commit(this.journal.takeStaged());
    }
    return knownBytes;
  }

  /** Records the hash of every chunk of a working image seeded from an existing DEST. */
  private async recordExistingContent(): Promise<number> {
    let bytes = 0;
    await this.forEachRun(() => true, async (first, hashes) => {
      for (let j = 0; j < hashes.length / HASH_SIZE; j++) {
        this.journal.stage(first + j, hashes.subarray(j * HASH_SIZE, (j + 1) * HASH_SIZE));
        bytes += this.chunkLength(first + j);
      }
    });
    return bytes;
  }

  /** Reads runs of consecutive chunks selected by `want` and hands over their hashes, batch by batch. */
  private async forEachRun(want: (index: number) => boolean, onHashes: (first: number, hashes: Buffer) => Promise<void>): Promise<void> {
    const perBatch = Math.max(1, Math.floor(VERIFY_BATCH / this.chunkSize));
    const buffer = Buffer.allocUnsafe(perBatch * this.chunkSize);
    const count = this.journal.chunkCount;
    for (let i = 0; i < count; ) {
      if (!want(i)) {
        i++;
        continue;
      }
      let n = 1;
      while (n < perBatch && i + n < count && want(i + n)) n++;
      const offset = i * this.chunkSize;
      const length = Math.min(n * this.chunkSize, this.size - offset);
      await this.readAll(buffer.subarray(0, length), offset);
      await onHashes(i, await hashChunks(buffer, length, this.chunkSize));
      i += n;
    }
  }

  private chunkLength(index: number): number {
    return Math.min(this.chunkSize, this.size - index * this.chunkSize);
  }

  private async zero(offset: number, length: number): Promise<void> {
    if (native.punchHole(this.handle.fd, offset, length)) return;
    // No hole punching here (an odd filesystem): write zeroes, a bounded piece at a time.
    const zeroes = Buffer.alloc(Math.min(length, ZERO_WRITE_PIECE));
    for (let at = 0; at < length; at += zeroes.length) await this.writeAll(zeroes.subarray(0, Math.min(zeroes.length, length - at)), offset + at);
  }

  /** All of `data` at `position`, into a range allocated just before (cheaper for the filesystem, output-file.ts). */
  private async writeAll(data: Buffer, position: number): Promise<void> {
    if (data.length) await native.laneWrite(this.lane, [data], position);
  }

  private async readAll(into: Buffer, position: number): Promise<void> {
    let done = 0;
    while (done < into.length) {
      const { bytesRead } = await this.handle.read(into, done, into.length - done, position + done);
      if (bytesRead === 0) {
        into.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }
}
