/**
 * The binary side of VMDK (VMware "Virtual Disk Format 5.0"): the hosted sparse extent header ("KDMV"),
 * the older ESX sparse header ("COWD"), stream-optimized markers and the footer. Every field is checked
 * against the file size and against limits that bound memory before anything is allocated from it.
 */
import { CorruptImageError, UnsupportedFeatureError, safeNumber } from '../../../errors.js';

export const SECTOR = 512;
/** "KDMV" as the first four bytes, read big-endian. */
export const SPARSE_MAGIC = 0x4b444d56;
/** "COWD": ESX Server sparse extents (vmfsSparse). */
export const COWD_MAGIC = 0x434f5744;

export const FLAG_NEWLINE_TEST = 1 << 0;
export const FLAG_REDUNDANT_GD = 1 << 1;
export const FLAG_ZEROED_GRAIN = 1 << 2;
export const FLAG_COMPRESSED = 1 << 16;
export const FLAG_MARKERS = 1 << 17;
export const COMPRESSION_DEFLATE = 1;
/** gdOffset in a stream-optimized header: the real value is in the footer. */
export const GD_AT_END = 0xffffffffffffffffn;
/** A grain table entry of 1 in a version 2 extent with FLAG_ZEROED_GRAIN: the grain reads as zeroes. */
export const GTE_ZEROED = 1;

export const MARKER_END_OF_STREAM = 0;
export const MARKER_GRAIN_TABLE = 1;
export const MARKER_GRAIN_DIRECTORY = 2;
export const MARKER_FOOTER = 3;
/** lba (u64) and size (u32) in front of every compressed grain. */
export const GRAIN_MARKER_BYTES = 12;

/** Grains above 2 MiB exist nowhere in practice; refusing them bounds every grain buffer. */
export const MAX_GRAIN_SECTORS = 4096;
/** QEMU refuses larger grain tables; VMware always writes 512 entries. */
export const MAX_GTES_PER_GT = 512;
/** ESX sparse (COWD) extents have a fixed grain table size. */
export const COWD_GTES_PER_GT = 4096;
/** Grain directories kept in memory, summed over all extents of an image: enough for 2 TiB of 512-byte grains. */
export const MAX_GD_BYTES = 32 * 1024 * 1024;
/** Grain table entries hold 32-bit sector numbers, so no sparse extent can map more than 2 TiB. */
export const MAX_SPARSE_SECTORS = 2 ** 32;
/** Magic plus the packed header fields, up to compressAlgorithm. */
const HEADER_BYTES = 79;
const FOOTER_AREA = 3 * SECTOR;

/** A hosted sparse extent header (or footer), in sectors as stored. */
export interface SparseHeader {
  version: number;
  flags: number;
  capacity: number;
  grainSectors: number;
  descriptorOffset: number;
  descriptorSectors: number;
  gtesPerGt: number;
  rgdOffset: number;
  /** Sector of the grain directory; GD_AT_END is resolved through the footer before this is filled in. */
  gdOffset: number;
  grainOffset: number;
  compressAlgorithm: number;
}

/** What a reader needs of any sparse extent, in bytes. */
export interface SparseGeometry {
  capacity: number;
  grainSize: number;
  gtesPerGt: number;
  gdOffset: number;
  gdEntries: number;
  compressed: boolean;
  markers: boolean;
  zeroedGrain: boolean;
  /** The embedded descriptor, if any: [offset, length) in bytes. */
  descriptor?: { offset: number; length: number };
}

function corrupt(file: string, field: string, msg: string): CorruptImageError {
  return new CorruptImageError(msg, { file, field });
}

/**
 * Reads the header fields without judging them. `gdAtEnd` reports a stream-optimized header whose grain
 * directory location is only in the footer.
 */
export function readSparseHeader(buf: Buffer, file: string, what = 'header'): { header: SparseHeader; gdAtEnd: boolean } {
  if (buf.length < HEADER_BYTES) throw corrupt(file, what, `truncated VMDK sparse ${what} (${buf.length} bytes, needs ${HEADER_BYTES})`);
  if (buf.readUInt32BE(0) !== SPARSE_MAGIC) throw corrupt(file, 'magic', `VMDK sparse ${what} has a bad magic number`);
  const u64 = (at: number, field: string) => safeNumber(buf.readBigUInt64LE(at), file, field);
  const gdRaw = buf.readBigUInt64LE(56);
  const gdAtEnd = gdRaw === GD_AT_END;
  return {
    gdAtEnd,
    header: {
      version: buf.readUInt32LE(4),
      flags: buf.readUInt32LE(8),
      capacity: u64(12, 'capacity'),
      grainSectors: u64(20, 'grainSize'),
      descriptorOffset: u64(28, 'descriptorOffset'),
      descriptorSectors: u64(36, 'descriptorSize'),
      gtesPerGt: buf.readUInt32LE(44),
      rgdOffset: u64(48, 'rgdOffset'),
      gdOffset: gdAtEnd ? 0 : safeNumber(gdRaw, file, 'gdOffset'),
      grainOffset: u64(64, 'overHead'),
      compressAlgorithm: buf.readUInt16LE(77),
    },
  };
}

/**
 * The footer of a stream-optimized extent: a footer marker, a copy of the header with the real gdOffset,
 * and the end-of-stream marker, in the last three sectors (QEMU reads them there).
 */
export function readFooter(area: Buffer, fileSize: number, file: string): SparseHeader {
  if (fileSize < FOOTER_AREA + SECTOR || area.length < FOOTER_AREA) {
    throw corrupt(file, 'footer', `truncated stream-optimized VMDK: no room for the footer in ${fileSize} bytes`);
  }
  const marker = area.subarray(0, SECTOR);
  const eos = area.subarray(2 * SECTOR, 3 * SECTOR);
  if (marker.readUInt32LE(8) !== 0 || marker.readUInt32LE(12) !== MARKER_FOOTER) {
    throw corrupt(file, 'footer', 'stream-optimized VMDK has no footer marker 1536 bytes before its end (truncated file?)');
  }
  if (eos.readBigUInt64LE(0) !== 0n || eos.readUInt32LE(8) !== 0 || eos.readUInt32LE(12) !== MARKER_END_OF_STREAM) {
    throw corrupt(file, 'footer', 'stream-optimized VMDK does not end with an end-of-stream marker (truncated file?)');
  }
  const { header, gdAtEnd } = readSparseHeader(area.subarray(SECTOR, 2 * SECTOR), file, 'footer');
  if (gdAtEnd) throw corrupt(file, 'gdOffset', 'the footer of a stream-optimized VMDK must give the grain directory offset');
  return header;
}

/** Validates a KDMV header against the file and QEMU's limits, and derives the reading geometry. */
export function sparseGeometry(h: SparseHeader, fileSize: number, file: string): SparseGeometry {
  if (h.version > 3) throw new UnsupportedFeatureError(`VMDK sparse extent version ${h.version} is not supported`, { file, field: 'version' });
  const compressed = h.compressAlgorithm === COMPRESSION_DEFLATE;
  if (h.compressAlgorithm !== 0 && !compressed) {
    throw new UnsupportedFeatureError(`unknown VMDK compression algorithm ${h.compressAlgorithm}`, { file, field: 'compressAlgorithm' });
  }
  checkGrainSectors(h.grainSectors, file, 'grainSize');
  if (h.gtesPerGt === 0 || h.gtesPerGt > MAX_GTES_PER_GT) {
    throw corrupt(file, 'numGTEsPerGT', `numGTEsPerGT ${h.gtesPerGt} out of range 1-${MAX_GTES_PER_GT}`);
  }
  if (h.grainOffset * SECTOR > fileSize) {
    throw corrupt(file, 'overHead', `file truncated: the header puts the first grain at ${h.grainOffset * SECTOR}, past the end (${fileSize} bytes)`);
  }
  const geo = tableGeometry(h.capacity, h.grainSectors, h.gtesPerGt, h.gdOffset, fileSize, file, 'gdOffset');
  const descriptor =
    h.descriptorOffset && h.descriptorSectors ? { offset: h.descriptorOffset * SECTOR, length: h.descriptorSectors * SECTOR } : undefined;
  return {
    ...geo,
    compressed,
    markers: (h.flags & FLAG_MARKERS) !== 0,
    zeroedGrain: (h.flags & FLAG_ZEROED_GRAIN) !== 0,
    descriptor,
  };
}

/** Reads and validates a COWD (ESX Server sparse) header. */
export function cowdGeometry(buf: Buffer, fileSize: number, file: string): SparseGeometry {
  if (buf.length < 44) throw corrupt(file, 'header', `truncated VMDK COWD header (${buf.length} bytes)`);
  const version = buf.readUInt32LE(4);
  if (version !== 1) throw new UnsupportedFeatureError(`VMDK COWD extent version ${version} is not supported`, { file, field: 'version' });
  const capacity = buf.readUInt32LE(12);
  const grainSectors = buf.readUInt32LE(16);
  const gdOffset = buf.readUInt32LE(20);
  const gdEntries = buf.readUInt32LE(24);
  checkGrainSectors(grainSectors, file, 'granularity');
  const geo = tableGeometry(capacity, grainSectors, COWD_GTES_PER_GT, gdOffset, fileSize, file, 'gdOffset');
  if (gdEntries < geo.gdEntries) {
    throw corrupt(file, 'numGDEntries', `numGDEntries ${gdEntries} is too small for a capacity of ${capacity} sectors (needs ${geo.gdEntries})`);
  }
  return { ...geo, compressed: false, markers: false, zeroedGrain: false };
}

function checkGrainSectors(grainSectors: number, file: string, field: string): void {
  if (grainSectors === 0 || grainSectors > MAX_GRAIN_SECTORS || (grainSectors & (grainSectors - 1)) !== 0) {
    throw corrupt(file, field, `grain size of ${grainSectors} sectors must be a power of two from 1 to ${MAX_GRAIN_SECTORS}`);
  }
}

function tableGeometry(
  capacitySectors: number,
  grainSectors: number,
  gtesPerGt: number,
  gdSector: number,
  fileSize: number,
  file: string,
  gdField: string,
): Pick<SparseGeometry, 'capacity' | 'grainSize' | 'gtesPerGt' | 'gdOffset' | 'gdEntries'> {
  if (capacitySectors >= MAX_SPARSE_SECTORS) {
    throw corrupt(file, 'capacity', `capacity of ${capacitySectors} sectors exceeds the 2 TiB a sparse extent can address`);
  }
  const gdEntries = Math.ceil(capacitySectors / (grainSectors * gtesPerGt));
  if (gdEntries * 4 > MAX_GD_BYTES) {
    throw corrupt(file, 'capacity', `capacity of ${capacitySectors} sectors needs a grain directory of ${gdEntries} entries, over the 32 MiB limit`);
  }
  const gdOffset = gdSector * SECTOR;
  if (gdEntries > 0 && (gdSector === 0 || gdOffset + gdEntries * 4 > fileSize)) {
    throw corrupt(file, gdField, `grain directory of ${gdEntries * 4} bytes at ${gdOffset} lies outside the file (${fileSize} bytes)`);
  }
  return { capacity: capacitySectors * SECTOR, grainSize: grainSectors * SECTOR, gtesPerGt, gdOffset, gdEntries };
}

/** The fields a writer puts in a new hosted sparse header (QEMU's layout). */
export interface NewSparseHeader {
  version: number;
  flags: number;
  capacity: number;
  grainSectors: number;
  descriptorOffset: number;
  descriptorSectors: number;
  gtesPerGt: number;
  rgdOffset: number;
  gdOffset: bigint;
  grainOffset: number;
  compressAlgorithm: number;
}

/** One sector holding the header, with the newline-detection bytes VMware checks for text-mode corruption. */
export function encodeSparseHeader(h: NewSparseHeader): Buffer {
  const buf = Buffer.alloc(SECTOR);
  buf.writeUInt32BE(SPARSE_MAGIC, 0);
  buf.writeUInt32LE(h.version, 4);
  buf.writeUInt32LE(h.flags >>> 0, 8);
  buf.writeBigUInt64LE(BigInt(h.capacity), 12);
  buf.writeBigUInt64LE(BigInt(h.grainSectors), 20);
  buf.writeBigUInt64LE(BigInt(h.descriptorOffset), 28);
  buf.writeBigUInt64LE(BigInt(h.descriptorSectors), 36);
  buf.writeUInt32LE(h.gtesPerGt, 44);
  buf.writeBigUInt64LE(BigInt(h.rgdOffset), 48);
  buf.writeBigUInt64LE(h.gdOffset, 56);
  buf.writeBigUInt64LE(BigInt(h.grainOffset), 64);
  buf[72] = 0; // uncleanShutdown
  buf[73] = 0x0a;
  buf[74] = 0x20;
  buf[75] = 0x0d;
  buf[76] = 0x0a;
  buf.writeUInt16LE(h.compressAlgorithm, 77);
  return buf;
}

/** A metadata marker sector: `sectors` of metadata of `type` follow it. */
export function encodeMarker(sectors: number, type: number): Buffer {
  const buf = Buffer.alloc(SECTOR);
  buf.writeBigUInt64LE(BigInt(sectors), 0);
  buf.writeUInt32LE(0, 8);
  buf.writeUInt32LE(type, 12);
  return buf;
}
