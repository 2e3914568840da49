/**
 * Free space of an NTFS volume, read from the cluster bitmap ($Bitmap, MFT record 6) as partclone does, so
 * a capture skips clusters no file uses. The source is hostile input: a bad update sequence, a field out
 * of range, a run outside the volume or system-file clusters the bitmap calls free make the volume
 * "unknown" (copied whole), never a crash or a wrong skip.
 */
import type { ExtUsage } from './ext.js';
import { type ByteRange, type ReadAt, inParallel } from './ranges.js';

/** Same role and fields as ExtUsage; `needsRecovery` means the volume is dirty or its $LogFile has open clients. */
export interface NtfsUsage extends Omit<ExtUsage, 'type'> {
  type: 'ntfs';
}

const OEM_ID = 'NTFS    ';
/** Update sequence arrays protect every 512 bytes of a record, whatever the sector size. */
const STRIDE = 512;
const MAX_CLUSTER_BYTES = 2 * 1024 * 1024;
const MIN_RECORD_BYTES = 512;
const MAX_RECORD_BYTES = 4096;

const FILE_MAGIC = 0x454c4946; // FILE
const RSTR_MAGIC = 0x52545352; // RSTR
const EMPTY_MAGIC = 0xffffffff;
const RECORD_IN_USE = 0x0001;
const MFT_RECORD_MFT = 0;
const MFT_RECORD_LOGFILE = 2;
const MFT_RECORD_VOLUME = 3;
const MFT_RECORD_BITMAP = 6;

const ATTR_END = 0xffffffff;
const ATTR_VOLUME_INFORMATION = 0x70;
const ATTR_DATA = 0x80;
/** Compressed (any compression format), encrypted, sparse: none is valid on the system files read here. */
const ATTR_FLAGS_UNSUPPORTED = 0x00ff | 0x4000 | 0x8000;
const RESIDENT_HEADER = 0x18;
const NON_RESIDENT_HEADER = 0x40;

const VOLUME_IS_DIRTY = 0x0001;
const LOGFILE_NO_CLIENT = 0xffff;
const RESTART_VOLUME_IS_CLEAN = 0x0002;
const MAX_LOG_PAGE_BYTES = 64 * 1024;

/** Metadata reads are batched up to this size (one agent request each). */
const READ_BATCH = 1024 * 1024;
/** The bitmap of an 8 TiB volume of 4 KiB clusters; larger bitmaps are not read (the volume is copied whole). */
const MAX_BITMAP_BYTES = 256 * 1024 * 1024;
/** Free ranges kept in memory; a bitmap fragmented beyond this is treated as unknown. */
const MAX_FREE_RANGES = 1 << 22;

interface Geometry {
  clusterSize: number;
  clusters: number;
  /** Bytes from the boot sector to the backup boot sector's end (when the area holds it). */
  size: number;
  mftCluster: number;
  mftMirrCluster: number;
  recordSize: number;
}

/** A run of a non-resident attribute: `clusters` clusters from `lcn`, or a sparse run (lcn undefined). */
interface Run {
  lcn: number | undefined;
  clusters: number;
}

interface NonResident {
  runs: Run[];
  dataSize: number;
  initializedSize: number;
}

type LogState = 'clean' | 'dirty';

export async function ntfsUsage(read: ReadAt, start: number, length: number, parallelism: number): Promise<NtfsUsage | undefined> {
  if (length < STRIDE) return undefined;
  const geo = parseBootSector(await read(start, STRIDE), length);
  if (!geo) return undefined;
  /** Bytes [offset, offset + bytes) of a non-resident attribute; undefined where it is sparse or unmapped. */
  const readAttribute = async (runs: Run[], offset: number, bytes: number): Promise<Buffer | undefined> => {
    const pieces = mapThroughRuns(runs, geo.clusterSize, offset, bytes);
    if (!pieces) return undefined;
    const parts = await Promise.all(pieces.map(([at, n]) => read(start + at, n)));
    return Buffer.concat(parts);
  };

  // Record 0 describes the MFT itself; the other system records are found through its runs.
  const mftHead = await read(start + geo.mftCluster * geo.clusterSize, geo.recordSize);
  const mftRecord = fileRecord(mftHead, MFT_RECORD_MFT, geo.recordSize);
  const mft = mftRecord && nonResidentData(mftRecord, geo, false);
  if (!mft || mft.runs[0].lcn !== geo.mftCluster) return undefined;
  const recordAt = async (n: number): Promise<Buffer | undefined> => {
    if ((n + 1) * geo.recordSize > mft.initializedSize) return undefined;
    const raw = await readAttribute(mft.runs, n * geo.recordSize, geo.recordSize);
    return raw && fileRecord(raw, n, geo.recordSize);
  };
  const [logRecord, volumeRecord, bitmapRecord] = await Promise.all([MFT_RECORD_LOGFILE, MFT_RECORD_VOLUME, MFT_RECORD_BITMAP].map(recordAt));
  if (!logRecord || !volumeRecord || !bitmapRecord) return undefined;
  const bitmap = nonResidentData(bitmapRecord, geo, true);
  const log = nonResidentData(logRecord, geo, true);
  const volumeFlags = volumeInformationFlags(volumeRecord);
  if (!bitmap || !log || volumeFlags === undefined) return undefined;

  const bitmapBytes = Math.ceil(geo.clusters / 8);
  if (bitmapBytes > bitmap.initializedSize || bitmapBytes > MAX_BITMAP_BYTES) return undefined;
  const pieces = mapThroughRuns(bitmap.runs, geo.clusterSize, 0, bitmapBytes);
  if (!pieces) return undefined;
  const bits = Buffer.alloc(bitmapBytes);
  const batches = batchPieces(pieces);
  await inParallel(batches, parallelism, async (batch) => {
    const data = await read(start + batch.at, batch.bytes);
    data.copy(bits, batch.into);
  });

  // Clusters the system files occupy must all be in use: a bitmap that frees any of them is not to be trusted.
  const busy: Array<[number, number]> = [
    [0, 1],
    [geo.mftMirrCluster, 1],
  ];
  for (const runs of [mft.runs, bitmap.runs, log.runs]) for (const r of runs) if (r.lcn !== undefined) busy.push([r.lcn, r.clusters]);
  const free = freeRanges(bits, geo.clusters);
  if (!free) return undefined;
  for (const [from, count] of busy) {
    if (overlaps(free.clusters, from, from + count)) return undefined;
  }

  const logState = await readLogState((offset, bytes) => readAttribute(log.runs, offset, bytes), log.dataSize);
  return {
    type: 'ntfs',
    size: geo.size,
    usedBytes: geo.size - free.count * geo.clusterSize,
    free: free.clusters.map(([from, to]) => [start + from * geo.clusterSize, start + to * geo.clusterSize] as ByteRange),
    needsRecovery: (volumeFlags & VOLUME_IS_DIRTY) !== 0 || logState === 'dirty',
  };
}

function parseBootSector(boot: Buffer, length: number): Geometry | undefined {
  if (boot.toString('latin1', 3, 11) !== OEM_ID || boot.readUInt16LE(510) !== 0xaa55) return undefined;
  const bytesPerSector = boot.readUInt16LE(0x0b);
  const spcField = boot[0x0d];
  // Above 128 sectors the field holds a negative power of two (0xf8: 2^8 sectors).
  const sectorsPerCluster = spcField <= 0x80 ? spcField : spcField >= 0xf4 ? 2 ** (256 - spcField) : 0;
  const clusterSize = bytesPerSector * sectorsPerCluster;
  const totalSectors = u64(boot, 0x28);
  const mftCluster = u64(boot, 0x30);
  const mftMirrCluster = u64(boot, 0x38);
  const recordField = boot.readInt8(0x40);
  const recordSize = recordField > 0 ? recordField * clusterSize : recordField < 0 ? 2 ** -recordField : 0;
  if (
    !isPowerOfTwo(bytesPerSector) ||
    bytesPerSector < 512 ||
    bytesPerSector > 4096 ||
    !isPowerOfTwo(sectorsPerCluster) ||
    clusterSize > MAX_CLUSTER_BYTES ||
    !isPowerOfTwo(recordSize) ||
    recordSize < MIN_RECORD_BYTES ||
    recordSize > MAX_RECORD_BYTES ||
    totalSectors === undefined ||
    mftCluster === undefined ||
    mftMirrCluster === undefined ||
    totalSectors * bytesPerSector > length
  ) {
    return undefined;
  }
  const clusters = Math.floor(totalSectors / sectorsPerCluster);
  // The MFT's first records ($MFT through $Bitmap and beyond) must fit in the volume.
  if (mftCluster === 0 || mftMirrCluster === 0 || mftMirrCluster >= clusters || mftCluster * clusterSize + 16 * recordSize > clusters * clusterSize) return undefined;
  // The backup boot sector follows the last sector the boot sector counts: outside every cluster, so never skipped.
  const size = Math.min(length, (totalSectors + 1) * bytesPerSector);
  return { clusterSize, clusters, size, mftCluster, mftMirrCluster, recordSize };
}

/** A FILE record with its update sequence checked and undone, or undefined when it is not base record `n` in use. */
function fileRecord(raw: Buffer, n: number, recordSize: number): Buffer | undefined {
  if (raw.length !== recordSize || raw.readUInt32LE(0) !== FILE_MAGIC) return undefined;
  const rec = unprotect(raw);
  if (!rec) return undefined;
  const usaEnd = rec.readUInt16LE(4) + 2 * rec.readUInt16LE(6);
  const firstAttribute = rec.readUInt16LE(0x14);
  const flags = rec.readUInt16LE(0x16);
  const bytesInUse = rec.readUInt32LE(0x18);
  const bytesAllocated = rec.readUInt32LE(0x1c);
  if (
    !(flags & RECORD_IN_USE) ||
    bytesAllocated !== recordSize ||
    bytesInUse > recordSize ||
    firstAttribute % 8 !== 0 ||
    firstAttribute < usaEnd ||
    firstAttribute + 4 > bytesInUse ||
    rec.readBigUInt64LE(0x20) !== 0n
  ) {
    return undefined;
  }
  // NTFS 3.1 records carry their own number after the header (the update sequence then starts at 0x30).
  if (rec.readUInt16LE(4) >= 0x30 && rec.readUInt32LE(0x2c) !== n) return undefined;
  return rec.subarray(0, bytesInUse);
}

/**
 * Checks the update sequence number at the end of every 512-byte stride (a torn write leaves a stale one)
 * and puts back the bytes it replaced. Returns a copy; undefined on any mismatch.
 */
function unprotect(raw: Buffer): Buffer | undefined {
  const usaOffset = raw.readUInt16LE(4);
  const usaCount = raw.readUInt16LE(6);
  const strides = raw.length / STRIDE;
  if (usaOffset % 2 !== 0 || usaCount !== strides + 1 || usaOffset + 2 * usaCount > STRIDE - 2) return undefined;
  const rec = Buffer.from(raw);
  const usn = rec.readUInt16LE(usaOffset);
  for (let i = 1; i <= strides; i++) {
    const at = i * STRIDE - 2;
    if (rec.readUInt16LE(at) !== usn) return undefined;
    rec.writeUInt16LE(rec.readUInt16LE(usaOffset + 2 * i), at);
  }
  return rec;
}

interface Attribute {
  type: number;
  body: Buffer;
}

/** The record's attributes in order, or undefined when any header leaves the record or the order is broken. */
function attributes(rec: Buffer): Attribute[] | undefined {
  const list: Attribute[] = [];
  let at = rec.readUInt16LE(0x14);
  let lastType = 0;
  for (;;) {
    if (at + 4 > rec.length) return undefined;
    const type = rec.readUInt32LE(at);
    if (type === ATTR_END) return list;
    if (at + RESIDENT_HEADER > rec.length) return undefined;
    const length = rec.readUInt32LE(at + 4);
    if (length < RESIDENT_HEADER || length % 8 !== 0 || at + length > rec.length || type < lastType) return undefined;
    const body = rec.subarray(at, at + length);
    const nameLength = body[9];
    const nameOffset = body.readUInt16LE(10);
    if (nameLength > 0 && nameOffset + 2 * nameLength > length) return undefined;
    list.push({ type, body });
    lastType = type;
    at += length;
  }
}

/**
 * The unnamed $DATA attribute of a system file: non-resident, uncompressed, its runs inside the volume.
 * `complete`: the runs must map the whole allocation (a fragmented $MFT may continue in extension records;
 * its base record still maps the first records).
 */
function nonResidentData(rec: Buffer, geo: Geometry, complete: boolean): NonResident | undefined {
  const attrs = attributes(rec);
  const data = attrs?.filter((a) => a.type === ATTR_DATA && a.body[9] === 0);
  if (!data || data.length !== 1) return undefined;
  const a = data[0].body;
  if (a[8] !== 1 || a.length < NON_RESIDENT_HEADER || a.readUInt16LE(0x0c) & ATTR_FLAGS_UNSUPPORTED) return undefined;
  const lowestVcn = u64(a, 0x10);
  const highestVcn = u64(a, 0x18);
  const pairsOffset = a.readUInt16LE(0x20);
  const allocatedSize = u64(a, 0x28);
  const dataSize = u64(a, 0x30);
  const initializedSize = u64(a, 0x38);
  if (
    lowestVcn !== 0 ||
    highestVcn === undefined ||
    allocatedSize === undefined ||
    dataSize === undefined ||
    initializedSize === undefined ||
    pairsOffset < NON_RESIDENT_HEADER ||
    pairsOffset >= a.length ||
    allocatedSize % geo.clusterSize !== 0 ||
    dataSize > allocatedSize ||
    initializedSize > dataSize
  ) {
    return undefined;
  }
  const runs = decodeRuns(a.subarray(pairsOffset), geo.clusters);
  if (!runs || runs.length === 0) return undefined;
  const mapped = runs.reduce((n, r) => n + r.clusters, 0);
  if (mapped !== highestVcn + 1 || mapped * geo.clusterSize > allocatedSize) return undefined;
  if (complete && mapped * geo.clusterSize !== allocatedSize) return undefined;
  const mappedBytes = mapped * geo.clusterSize;
  return { runs, dataSize: Math.min(dataSize, mappedBytes), initializedSize: Math.min(initializedSize, mappedBytes) };
}

/**
 * Mapping pairs: a header byte whose low nibble is the byte count of the run length and high nibble that of
 * the signed LCN delta from the previous run (none: a sparse run); a zero header ends the list.
 */
function decodeRuns(pairs: Buffer, clusters: number): Run[] | undefined {
  const runs: Run[] = [];
  let at = 0;
  let lcn = 0;
  for (;;) {
    if (at >= pairs.length) return undefined;
    const header = pairs[at++];
    if (header === 0) return runs;
    const lengthBytes = header & 0xf;
    const deltaBytes = header >> 4;
    if (lengthBytes === 0 || lengthBytes > 8 || deltaBytes > 8 || at + lengthBytes + deltaBytes > pairs.length) return undefined;
    const count = signedLE(pairs, at, lengthBytes);
    at += lengthBytes;
    if (count === undefined || count <= 0) return undefined;
    if (deltaBytes === 0) {
      runs.push({ lcn: undefined, clusters: count });
      continue;
    }
    const delta = signedLE(pairs, at, deltaBytes);
    at += deltaBytes;
    if (delta === undefined) return undefined;
    lcn += delta;
    if (lcn < 0 || lcn + count > clusters) return undefined;
    runs.push({ lcn, clusters: count });
  }
}

/** Volume byte ranges holding [offset, offset + bytes) of an attribute; undefined when any part is sparse or unmapped. */
function mapThroughRuns(runs: Run[], clusterSize: number, offset: number, bytes: number): Array<[number, number]> | undefined {
  const pieces: Array<[number, number]> = [];
  let runStart = 0;
  const end = offset + bytes;
  for (const run of runs) {
    const runEnd = runStart + run.clusters * clusterSize;
    if (runEnd > offset && runStart < end) {
      if (run.lcn === undefined) return undefined;
      const from = Math.max(offset, runStart);
      const to = Math.min(end, runEnd);
      pieces.push([run.lcn * clusterSize + (from - runStart), to - from]);
    }
    runStart = runEnd;
    if (runStart >= end) return pieces;
  }
  return undefined;
}

/** Splits pieces into reads of at most READ_BATCH bytes, each with its place in the attribute. */
function batchPieces(pieces: Array<[number, number]>): Array<{ at: number; bytes: number; into: number }> {
  const batches: Array<{ at: number; bytes: number; into: number }> = [];
  let into = 0;
  for (const [at, bytes] of pieces) {
    for (let done = 0; done < bytes; done += READ_BATCH) {
      const n = Math.min(READ_BATCH, bytes - done);
      batches.push({ at: at + done, bytes: n, into: into + done });
    }
    into += bytes;
  }
  return batches;
}

/** Clear bits of the first `clusters` bits as ascending [from, to) cluster ranges, and how many there are. */
function freeRanges(bits: Buffer, clusters: number): { clusters: Array<[number, number]>; count: number } | undefined {
  const ranges: Array<[number, number]> = [];
  let count = 0;
  let runStart = -1;
  const close = (end: number): boolean => {
    count += end - runStart;
    ranges.push([runStart, end]);
    runStart = -1;
    return ranges.length <= MAX_FREE_RANGES;
  };
  for (let lcn = 0; lcn < clusters; ) {
    const byte = bits[lcn >> 3];
    if ((lcn & 7) === 0 && lcn + 8 <= clusters && (byte === 0 || byte === 0xff)) {
      if (byte === 0 && runStart < 0) runStart = lcn;
      else if (byte === 0xff && runStart >= 0 && !close(lcn)) return undefined;
      lcn += 8;
      continue;
    }
    const used = (byte >> (lcn & 7)) & 1;
    if (!used && runStart < 0) runStart = lcn;
    else if (used && runStart >= 0 && !close(lcn)) return undefined;
    lcn++;
  }
  if (runStart >= 0 && !close(clusters)) return undefined;
  return { clusters: ranges, count };
}

/** The flags of the resident $VOLUME_INFORMATION attribute ($Volume, record 3). */
function volumeInformationFlags(rec: Buffer): number | undefined {
  const info = attributes(rec)?.find((a) => a.type === ATTR_VOLUME_INFORMATION);
  if (!info || info.body[8] !== 0) return undefined;
  const valueLength = info.body.readUInt32LE(0x10);
  const valueOffset = info.body.readUInt16LE(0x14);
  if (valueLength < 12 || valueOffset < RESIDENT_HEADER || valueOffset + valueLength > info.body.length) return undefined;
  return info.body.readUInt16LE(valueOffset + 0x0a);
}

/**
 * Whether the $LogFile says the volume was left consistent, as the Linux NTFS drivers judge it from the two
 * restart pages: emptied (all 0xff, as ntfs-3g and mkntfs leave it) or the newest restart area having no
 * client in use or the clean flag is clean; anything else, including a page that does not parse, is dirty.
 */
async function readLogState(readLog: (offset: number, bytes: number) => Promise<Buffer | undefined>, logSize: number): Promise<LogState> {
  if (logSize < 2 * STRIDE) return 'dirty';
  const first = await readLog(0, STRIDE);
  if (!first) return 'dirty';
  if (first.readUInt32LE(0) === EMPTY_MAGIC) return 'clean';
  const pageSize = first.readUInt32LE(0x10);
  if (!isPowerOfTwo(pageSize) || pageSize < STRIDE || pageSize > MAX_LOG_PAGE_BYTES || 2 * pageSize > logSize) return 'dirty';
  let newest: { lsn: bigint; clean: boolean } | undefined;
  for (const offset of [0, pageSize]) {
    const page = await readLog(offset, pageSize);
    const area = page && restartArea(page);
    if (area && (!newest || area.lsn > newest.lsn)) newest = area;
  }
  return newest?.clean ? 'clean' : 'dirty';
}

function restartArea(raw: Buffer): { lsn: bigint; clean: boolean } | undefined {
  if (raw.readUInt32LE(0) !== RSTR_MAGIC) return undefined;
  const page = unprotect(raw);
  if (!page) return undefined;
  const areaOffset = page.readUInt16LE(0x18);
  if (areaOffset % 8 !== 0 || areaOffset < page.readUInt16LE(4) + 2 * page.readUInt16LE(6) || areaOffset + 0x30 > page.length) return undefined;
  const lsn = page.readBigInt64LE(areaOffset);
  const clientInUse = page.readUInt16LE(areaOffset + 0x0c);
  const flags = page.readUInt16LE(areaOffset + 0x0e);
  return { lsn, clean: clientInUse === LOGFILE_NO_CLIENT || (flags & RESTART_VOLUME_IS_CLEAN) !== 0 };
}

/** True when [from, to) meets any of the ascending, disjoint ranges. */
function overlaps(ranges: Array<[number, number]>, from: number, to: number): boolean {
  let lo = 0;
  let hi = ranges.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (ranges[mid][1] <= from) lo = mid + 1;
    else hi = mid;
  }
  return lo < ranges.length && ranges[lo][0] < to;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && Number.isInteger(Math.log2(n));
}

function u64(buf: Buffer, at: number): number | undefined {
  const value = buf.readBigUInt64LE(at);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(value);
}

/** A little-endian two's-complement integer of 1 to 8 bytes, undefined beyond 2^53. */
function signedLE(buf: Buffer, at: number, bytes: number): number | undefined {
  let value = 0n;
  for (let i = bytes - 1; i >= 0; i--) value = (value << 8n) | BigInt(buf[at + i]);
  if (buf[at + bytes - 1] & 0x80) value -= 1n << BigInt(8 * bytes);
  const max = BigInt(Number.MAX_SAFE_INTEGER);
  return value > max || value < -max ? undefined : Number(value);
}
