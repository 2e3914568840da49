/**
 * The VHDX metadata log ([MS-VHDX] 2.3): a ring of 4 KiB sectors holding metadata updates that a crash may
 * have left unapplied. A non-empty log must be replayed before anything past the headers is read. Ferry
 * never writes a source image, so it replays the log into an in-memory overlay of the file instead.
 *
 * The search for the active sequence and the replay follow QEMU's vhdx-log.c step for step (including the
 * quirks that decide which files QEMU accepts), so the same log yields the same disk contents.
 */
import type { FileHandle } from 'node:fs/promises';
import { CorruptImageError, UnsupportedFeatureError, safeNumber } from '../../../errors.js';
import { native } from '../../../native.js';
import { readFully } from '../../output-file.js';
import { MiB, checksumWithField, signatureAt, type Region, type VhdxHeader } from './layout.js';

const LOG_SECTOR = 4096;
/** The largest log replayed in memory; QEMU and Hyper-V create 1 MiB logs. */
const MAX_REPLAYED_LOG = 32 * MiB;
const ENTRY_HEADER_SIZE = 64;
const DESCRIPTOR_SIZE = 32;

interface EntryHeader {
  checksum: number;
  entryLength: number;
  sequence: bigint;
  descriptorCount: number;
  logGuid: Buffer;
  flushedFileOffset: bigint;
  lastFileOffset: bigint;
}

/** A run of consecutive valid entries: [start, end) in ring positions. */
interface LogSequence {
  start: number;
  end: number;
  count: number;
  /** Sequence number of the run's first entry: QEMU ranks runs by it. */
  sequence: bigint;
}

/**
 * Bytes of the image file as the replayed log defines them, over the file itself. Zeroed ranges and
 * written sectors are kept separately; a sector written after a zeroing that covers it wins, because
 * zeroing drops the sectors written before it.
 */
export class FileOverlay {
  private readonly sectors = new Map<number, Buffer>();
  private readonly zeroed: Region[] = [];
  private sortedSectors: number[] = [];
  private sortedZeroes: Region[] = [];
  private touched: Region[] = [];

  /** The file size after replay: writes past the end extend the file, as replay on disk would. */
  constructor(public size: number) {}

  writeSector(offset: number, data: Buffer): void {
    this.sectors.set(offset, data);
    this.size = Math.max(this.size, offset + data.length);
  }

  writeZeroes(offset: number, length: number): void {
    if (length === 0) return;
    if (length / LOG_SECTOR < this.sectors.size) {
      for (let at = offset; at < offset + length; at += LOG_SECTOR) this.sectors.delete(at);
    } else {
      for (const at of this.sectors.keys()) if (at >= offset && at < offset + length) this.sectors.delete(at);
    }
    this.zeroed.push({ offset, length });
    this.size = Math.max(this.size, offset + length);
  }

  /** Prepares the lookups once replay is done. */
  seal(): void {
    this.sortedSectors = [...this.sectors.keys()].sort((a, b) => a - b);
    this.sortedZeroes = mergeRegions(this.zeroed);
    this.touched = mergeRegions([...this.sortedZeroes, ...this.sortedSectors.map((offset) => ({ offset, length: LOG_SECTOR }))]);
  }

  /** Whether any byte of [offset, offset+length) differs from the file. */
  intersects(offset: number, length: number): boolean {
    const i = firstEndingAfter(this.touched, offset);
    return i < this.touched.length && this.touched[i].offset < offset + length;
  }

  /** Patches `buf`, read from the file at `position`, with what the log put there. */
  apply(buf: Buffer, position: number): void {
    const end = position + buf.length;
    for (let i = firstEndingAfter(this.sortedZeroes, position); i < this.sortedZeroes.length && this.sortedZeroes[i].offset < end; i++) {
      const z = this.sortedZeroes[i];
      buf.fill(0, Math.max(0, z.offset - position), Math.min(buf.length, z.offset + z.length - position));
    }
    const keys = this.sortedSectors;
    let lo = 0;
    let hi = keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (keys[mid] + LOG_SECTOR <= position) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; i < keys.length && keys[i] < end; i++) {
      const from = Math.max(keys[i], position);
      const to = Math.min(keys[i] + LOG_SECTOR, end);
      this.sectors.get(keys[i])!.copy(buf, from - position, from - keys[i], to - keys[i]);
    }
  }
}

function mergeRegions(regions: Region[]): Region[] {
  const sorted = [...regions].sort((a, b) => a.offset - b.offset);
  const out: Region[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return out;
}

function firstEndingAfter(regions: Region[], position: number): number {
  let lo = 0;
  let hi = regions.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (regions[mid].offset + regions[mid].length <= position) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * Checks the current header's log fields and, when the log is non-empty, replays its active sequence.
 * Returns undefined when there is nothing to replay.
 */
export async function replayLog(handle: FileHandle, fileSize: number, header: VhdxHeader, file: string): Promise<FileOverlay | undefined> {
  const corrupt = (msg: string) => new CorruptImageError(msg, { file, field: 'log' });
  const logOffset = safeNumber(header.logOffset, file, 'log_offset');
  // QEMU checks the log's placement and version even when the log is empty.
  if (logOffset < MiB || logOffset % MiB !== 0) throw corrupt(`log_offset ${logOffset} is not a multiple of 1 MiB past the header section`);
  if (header.logVersion !== 0) throw new UnsupportedFeatureError(`log version ${header.logVersion} is not supported`, { file, field: 'log_version' });
  if (header.logGuid.every((b) => b === 0) || header.logLength === 0) return undefined;
  if (header.logLength % MiB !== 0) throw corrupt(`log_length ${header.logLength} is not a multiple of 1 MiB`);
  if (logOffset + header.logLength > fileSize) throw corrupt(`log of ${header.logLength} bytes at ${logOffset} extends past the end of the file (${fileSize} bytes)`);
  if (header.logLength > MAX_REPLAYED_LOG) {
    throw new UnsupportedFeatureError(
      `the image has a non-empty ${header.logLength}-byte log, larger than Ferry replays in memory (${MAX_REPLAYED_LOG} bytes); replay it first with qemu-img check -r all`,
      { file, field: 'log' },
    );
  }
  const ring = Buffer.alloc(header.logLength);
  await readFully(handle, ring, 0, ring.length, logOffset);
  const log = new LogRing(ring, header.logGuid, file);
  const sequence = log.findActiveSequence();
  // Like QEMU: a log GUID with no valid sequence behind it leaves nothing to replay.
  if (!sequence) return undefined;
  const overlay = new FileOverlay(fileSize);
  log.replay(sequence, overlay);
  overlay.seal();
  return overlay;
}

class LogRing {
  private readonly sectorCount: number;

  constructor(
    private readonly ring: Buffer,
    private readonly logGuid: Buffer,
    private readonly file: string,
  ) {
    this.sectorCount = ring.length / LOG_SECTOR;
  }

  private next(position: number): number {
    const n = position + LOG_SECTOR;
    return n >= this.ring.length ? 0 : n;
  }

  private sector(position: number): Buffer {
    return this.ring.subarray(position, position + LOG_SECTOR);
  }

  private corrupt(msg: string): CorruptImageError {
    return new CorruptImageError(msg, { file: this.file, field: 'log' });
  }

  private entryHeader(position: number): EntryHeader | undefined {
    const s = this.sector(position);
    const h: EntryHeader = {
      checksum: s.readUInt32LE(4),
      entryLength: s.readUInt32LE(8),
      sequence: s.readBigUInt64LE(16),
      descriptorCount: s.readUInt32LE(24),
      logGuid: s.subarray(32, 48),
      flushedFileOffset: s.readBigUInt64LE(48),
      lastFileOffset: s.readBigUInt64LE(56),
    };
    const valid =
      signatureAt(s, 0, 4) === 'loge' &&
      h.entryLength <= this.ring.length &&
      h.entryLength % LOG_SECTOR === 0 &&
      h.sequence !== 0n &&
      h.logGuid.equals(this.logGuid) &&
      h.descriptorCount * DESCRIPTOR_SIZE <= h.entryLength;
    return valid ? h : undefined;
  }

  /** Sectors holding the header and descriptors: the first sector has room for 126 descriptors, others 128. */
  private static descriptorSectors(count: number): number {
    return Math.ceil((count + 2) / 128);
  }

  /** The descriptor sectors of the entry at `position`, following the ring, stopping at `limit` if given. */
  private descriptorPositions(position: number, h: EntryHeader, limit?: number): { positions: number[]; next: number } {
    const positions: number[] = [];
    let p = position;
    for (let k = 0; k < LogRing.descriptorSectors(h.descriptorCount); k++) {
      if (p === limit) throw this.corrupt(`log entry ${h.sequence} runs past the end of its sequence`);
      positions.push(p);
      p = this.next(p);
    }
    return { positions, next: p };
  }

  private descriptor(positions: number[], index: number): Buffer {
    const byte = ENTRY_HEADER_SIZE + index * DESCRIPTOR_SIZE;
    const at = byte % LOG_SECTOR;
    return this.sector(positions[Math.floor(byte / LOG_SECTOR)]).subarray(at, at + DESCRIPTOR_SIZE);
  }

  /** QEMU refuses the whole image when an entry with a valid header carries a malformed descriptor. */
  private checkDescriptors(positions: number[], h: EntryHeader): void {
    for (let i = 0; i < h.descriptorCount; i++) {
      const d = this.descriptor(positions, i);
      const kind = signatureAt(d, 0, 4);
      const fileOffset = d.readBigUInt64LE(16);
      const ok =
        d.readBigUInt64LE(24) === h.sequence &&
        fileOffset % BigInt(LOG_SECTOR) === 0n &&
        (kind === 'desc' || (kind === 'zero' && d.readBigUInt64LE(8) % BigInt(LOG_SECTOR) === 0n));
      if (!ok) throw this.corrupt(`log entry ${h.sequence}: descriptor ${i} is malformed`);
    }
  }

  /** Validates the entry at `position`; `previous` > 0 demands the next sequence number. */
  private validate(position: number, previous: bigint): { header?: EntryHeader; next: number } {
    const h = this.entryHeader(position);
    if (!h || (previous > 0n && h.sequence !== previous + 1n)) return { next: this.next(position) };
    const { positions, next: afterDescriptors } = this.descriptorPositions(position, h);
    this.checkDescriptors(positions, h);
    let crc = checksumWithField(this.sector(positions[0]), 4);
    for (const p of positions.slice(1)) crc = native.crc32c(this.sector(p), crc);
    let p = afterDescriptors;
    for (let k = positions.length; k < h.entryLength / LOG_SECTOR; k++) {
      crc = native.crc32c(this.sector(p), crc);
      p = this.next(p);
    }
    return { header: crc === h.checksum ? h : undefined, next: p };
  }

  /**
   * Scans the whole ring for runs of valid entries and picks the run whose first entry has the highest
   * sequence number. As in QEMU, the second entry of a run is not held to the sequence rule.
   */
  findActiveSequence(): LogSequence | undefined {
    let candidate: LogSequence | undefined;
    let read = 0;
    // Every step moves at least one sector; a consistent ring is scanned in a few laps.
    let budget = 4 * this.sectorCount + 16;
    const step = (position: number, previous: bigint) => {
      if (--budget < 0) throw this.corrupt('log scan does not terminate');
      return this.validate(position, previous);
    };
    for (;;) {
      const tail = read;
      const first = step(read, 0n);
      read = first.next;
      if (first.header) {
        const current: LogSequence = { start: tail, end: read, count: 1, sequence: first.header.sequence };
        let previous = 0n;
        for (;;) {
          const more = step(read, previous);
          read = more.next;
          if (!more.header) break;
          current.end = read;
          current.count++;
          previous = more.header.sequence;
        }
        if (!candidate || current.sequence > candidate.sequence) candidate = current;
      }
      if (read < tail) return candidate;
    }
  }

  /** Applies every descriptor of the sequence's entries, in order, to the overlay. */
  replay(sequence: LogSequence, overlay: FileOverlay): void {
    let read = sequence.start;
    for (let n = 0; n < sequence.count; n++) {
      if (read === sequence.end) throw this.corrupt('log sequence ends before its last entry');
      const h = this.entryHeader(read);
      if (!h) throw this.corrupt(`log entry at ${read} is no longer valid`);
      if (h.flushedFileOffset > BigInt(overlay.size)) {
        throw this.corrupt(`log entry ${h.sequence} needs a file of at least ${h.flushedFileOffset} bytes, but it has ${overlay.size}: it was truncated`);
      }
      const { positions, next } = this.descriptorPositions(read, h, sequence.end);
      read = next;
      this.checkDescriptors(positions, h);
      for (let i = 0; i < h.descriptorCount; i++) {
        const d = this.descriptor(positions, i);
        const fileOffset = safeNumber(d.readBigUInt64LE(16), this.file, 'log_descriptor_offset');
        if (signatureAt(d, 0, 4) === 'zero') {
          const length = safeNumber(d.readBigUInt64LE(8), this.file, 'log_zero_length');
          if (fileOffset + length > Number.MAX_SAFE_INTEGER) throw this.corrupt(`log entry ${h.sequence}: zero range at ${fileOffset} is out of range`);
          overlay.writeZeroes(fileOffset, length);
          continue;
        }
        if (read === sequence.end) throw this.corrupt(`log entry ${h.sequence} lacks the data sector of descriptor ${i}`);
        const data = this.sector(read);
        read = this.next(read);
        const sequenceOfData = (BigInt(data.readUInt32LE(4)) << 32n) | BigInt(data.readUInt32LE(4092));
        if (sequenceOfData !== h.sequence) throw this.corrupt(`log entry ${h.sequence}: data sector of descriptor ${i} belongs to entry ${sequenceOfData}`);
        // The sector's first 8 and last 4 bytes travel in the descriptor, where the data sector keeps its framing.
        const sector = Buffer.allocUnsafe(LOG_SECTOR);
        d.copy(sector, 0, 8, 16);
        data.copy(sector, 8, 8, LOG_SECTOR - 4);
        d.copy(sector, LOG_SECTOR - 4, 4, 8);
        overlay.writeSector(fileOffset, sector);
      }
      // The file must reach the entry's last file offset; QEMU extends it only when that is not MiB-aligned.
      const last = h.lastFileOffset;
      if (BigInt(overlay.size) < last && last % BigInt(MiB) !== 0n) {
        overlay.size = Math.max(overlay.size, safeNumber(((last >> 20n) + 1n) << 20n, this.file, 'last_file_offset'));
      }
    }
  }
}
