import { open, rename, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { CorruptImageError } from '../errors.js';
import { native } from '../native.js';
import { HASH_SIZE, type ChunkHash } from './chunk-codec.js';

/** What a journal belongs to: a journal for another source, size or chunk grid is never applied. */
export interface JournalMeta {
  source: string;
  size: number;
  chunkSize: number;
}

const MAGIC = Buffer.from('FERRYJ01');
const RECORD_SIZE = 24;
const enum RecordState {
  Forgotten = 0,
  Known = 1,
}
const READ_BATCH = 16 * 1024 * 1024;
/** Rewrite the log on open once it holds this many times more records than live chunks. */
const COMPACT_FACTOR = 4;

/**
 * Resume bookkeeping for a capture: for each chunk of the disk, the hash of what the working image holds,
 * if Ferry knows it. An append-only log of 24-byte records (chunk index, state, hash, CRC-32C), so a
 * checkpoint costs one small append and one fdatasync whatever the disk size; a record torn by a crash
 * fails its CRC and is dropped with everything after it.
 *
 * Durability is the caller's half of the contract: `stage` records in memory, `append` writes what was
 * staged (surviving the process, not a crash of the machine), `commit` also fsyncs. Append records only
 * after their data was written; a record whose data a machine crash lost must be caught by rehashing the
 * data on open (the working image does), and records committed after the data was fsynced never claim
 * more than the disk holds.
 */
export class Journal {
  private readonly hashes: Buffer;
  private readonly known: Uint8Array;
  private staged: Buffer[] = [];
  private records = 0;

  private constructor(
    readonly path: string,
    private handle: FileHandle,
    readonly meta: JournalMeta,
    private end: number,
  ) {
    const count = Journal.chunkCount(meta);
    this.hashes = Buffer.alloc(count * HASH_SIZE);
    this.known = new Uint8Array(count);
  }

  static chunkCount(meta: JournalMeta): number {
    return Math.ceil(meta.size / meta.chunkSize);
  }

  get chunkCount(): number {
    return this.known.length;
  }

  /** Creates an empty journal, replacing any file at `path`. */
  static create(path: string, meta: JournalMeta): Promise<Journal> {
    return Journal.writeAtomically(path, meta, []);
  }

  /** Writes header and records under a temporary name and renames it over `path`: never half a journal. */
  private static async writeAtomically(path: string, meta: JournalMeta, records: Buffer[]): Promise<Journal> {
    if (Journal.chunkCount(meta) >= 2 ** 32) throw new RangeError('too many chunks for the journal');
    const tmp = `${path}.new`;
    const handle = await open(tmp, 'w+', 0o600);
    try {
      const data = Buffer.concat([encodeHeader(meta), ...records]);
      let done = 0;
      while (done < data.length) done += (await handle.write(data, done, data.length - done, done)).bytesWritten;
      await handle.datasync();
      await rename(tmp, path);
      await syncDirectory(path);
      const journal = new Journal(path, handle, meta, data.length);
      journal.records = records.length;
      return journal;
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** Opens an existing journal and replays it. Returns undefined when there is none. */
  static async load(path: string): Promise<Journal | undefined> {
    let handle: FileHandle;
    try {
      handle = await open(path, 'r+');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    try {
      const { meta, length } = await readHeader(handle, path);
      const journal = new Journal(path, handle, meta, length);
      await journal.replay();
      if (journal.records > COMPACT_FACTOR * journal.knownCount() + 1024) return await journal.compact();
      return journal;
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  has(index: number): boolean {
    return this.known[index] === 1;
  }

  /** The recorded hash of chunk `index` (a view: copy to keep). Only meaningful when `has(index)`. */
  hash(index: number): ChunkHash {
    return this.hashes.subarray(index * HASH_SIZE, (index + 1) * HASH_SIZE);
  }

  matches(index: number, hash: Buffer, at = 0): boolean {
    return this.known[index] === 1 && this.hashes.compare(hash, at, at + HASH_SIZE, index * HASH_SIZE, (index + 1) * HASH_SIZE) === 0;
  }

  knownCount(): number {
    let n = 0;
    for (const k of this.known) n += k;
    return n;
  }

  /** Records in memory that chunk `index` now holds data with `hash`; durable after the next commit. */
  stage(index: number, hash: ChunkHash): void {
    this.known[index] = 1;
    hash.copy(this.hashes, index * HASH_SIZE, 0, HASH_SIZE);
    this.staged.push(encodeRecord(index, RecordState.Known, hash));
  }

  /** Records that Ferry no longer knows what chunk `index` holds (it failed verification). */
  forget(index: number): void {
    this.known[index] = 0;
    this.staged.push(encodeRecord(index, RecordState.Forgotten, Buffer.alloc(HASH_SIZE)));
  }

  /** Records staged and not yet taken. */
  get stagedCount(): number {
    return this.staged.length;
  }

  /** Takes what was staged so far, for a commit once the data it describes is durable. */
  takeStaged(): Buffer[] {
    const out = this.staged;
    this.staged = [];
    return out;
  }

  /** Appends records (from takeStaged) to the file, without fsync. */
  async append(records: Buffer[]): Promise<void> {
    if (!records.length) return;
    const data = Buffer.concat(records);
    let done = 0;
    while (done < data.length) done += (await this.handle.write(data, done, data.length - done, this.end + done)).bytesWritten;
    this.end += data.length;
    this.records += records.length;
  }

  /** Appends records and makes everything appended so far durable. */
  async commit(records: Buffer[]): Promise<void> {
    await this.append(records);
    await this.handle.datasync();
  }

  async close(): Promise<void> {
    await this.handle.close();
  }

  private async replay(): Promise<void> {
    const { size } = await this.handle.stat();
    const buf = Buffer.allocUnsafe(READ_BATCH - (READ_BATCH % RECORD_SIZE));
    let pos = this.end;
    while (pos + RECORD_SIZE <= size) {
      const want = Math.min(buf.length, Math.floor((size - pos) / RECORD_SIZE) * RECORD_SIZE);
      const { bytesRead } = await this.handle.read(buf, 0, want, pos);
      for (let at = 0; at + RECORD_SIZE <= bytesRead; at += RECORD_SIZE) {
        const rec = buf.subarray(at, at + RECORD_SIZE);
        const index = rec.readUInt32LE(0);
        const state = rec.readUInt32LE(4);
        if (native.crc32c(rec.subarray(0, 16)) !== rec.readUInt32LE(16) || index >= this.known.length || state > RecordState.Known) {
          // A torn append from a crash: what follows was never committed. Cut it off so appends stay aligned.
          await this.handle.truncate(pos + at);
          this.end = pos + at;
          return;
        }
        this.known[index] = state;
        rec.copy(this.hashes, index * HASH_SIZE, 8, 16);
        this.records++;
      }
      pos += bytesRead;
      if (bytesRead < want) break;
    }
    this.end = pos;
    if (pos < size) await this.handle.truncate(pos);
  }

  /** Rewrites the log with one record per known chunk, atomically. */
  private async compact(): Promise<Journal> {
    const records: Buffer[] = [];
    for (let i = 0; i < this.known.length; i++) if (this.known[i]) records.push(encodeRecord(i, RecordState.Known, this.hash(i)));
    await this.handle.close();
    const fresh = await Journal.writeAtomically(this.path, this.meta, records);
    fresh.known.set(this.known);
    this.hashes.copy(fresh.hashes);
    return fresh;
  }
}

function encodeHeader(meta: JournalMeta): Buffer {
  const json = Buffer.from(JSON.stringify({ source: meta.source, size: meta.size, chunkSize: meta.chunkSize }));
  const b = Buffer.alloc(MAGIC.length + 8 + json.length);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(json.length, 8);
  json.copy(b, 12);
  b.writeUInt32LE(native.crc32c(json), 12 + json.length);
  return b;
}

async function readHeader(handle: FileHandle, path: string): Promise<{ meta: JournalMeta; length: number }> {
  const head = Buffer.alloc(12);
  const { bytesRead } = await handle.read(head, 0, 12, 0);
  const bad = (why: string) => new CorruptImageError(`not a usable capture journal (${why}); delete it to start the capture over`, { file: path });
  if (bytesRead < 12 || !head.subarray(0, 8).equals(MAGIC)) throw bad('bad magic');
  const jsonLength = head.readUInt32LE(8);
  if (jsonLength > 65536) throw bad('header too long');
  const rest = Buffer.alloc(jsonLength + 4);
  if ((await handle.read(rest, 0, rest.length, 12)).bytesRead < rest.length) throw bad('truncated header');
  const json = rest.subarray(0, jsonLength);
  if (native.crc32c(json) !== rest.readUInt32LE(jsonLength)) throw bad('header checksum');
  const meta = JSON.parse(json.toString('utf8')) as JournalMeta;
  if (typeof meta.source !== 'string' || !Number.isSafeInteger(meta.size) || !Number.isSafeInteger(meta.chunkSize) || meta.chunkSize <= 0) {
    throw bad('header fields');
  }
  return { meta, length: 12 + rest.length };
}

function encodeRecord(index: number, state: RecordState, hash: Buffer): Buffer {
  const r = Buffer.alloc(RECORD_SIZE);
  r.writeUInt32LE(index, 0);
  r.writeUInt32LE(state, 4);
  hash.copy(r, 8, 0, HASH_SIZE);
  r.writeUInt32LE(native.crc32c(r.subarray(0, 16)), 16);
  return r;
}

/** A rename is durable only once the directory holding it is synced. */
async function syncDirectory(path: string): Promise<void> {
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
