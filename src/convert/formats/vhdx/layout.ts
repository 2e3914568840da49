/**
 * The VHDX on-disk layout ([MS-VHDX] section 2): header section, region table, metadata items, BAT entries.
 * All fields are little-endian. Parsing checks every field against the file size and the format's limits
 * before anything is allocated, because images come from strangers.
 */
import { CorruptImageError, UnsupportedFeatureError, safeNumber } from '../../../errors.js';
import { native } from '../../../native.js';

const KiB = 1024;
export const MiB = 1024 * 1024;

/** The header section: file identifier, two headers, two region tables, each in its own 64 KiB slot. */
export const HEADER_SECTION_SIZE = MiB;
export const HEADER_OFFSETS = [64 * KiB, 128 * KiB] as const;
export const REGION_TABLE_OFFSETS = [192 * KiB, 256 * KiB] as const;
/** A header's checksum covers 4 KiB, though its fields take 80 bytes. */
export const HEADER_SIZE = 4 * KiB;
const HEADER_FIELDS_SIZE = 80;
export const REGION_TABLE_SIZE = 64 * KiB;
const MAX_REGION_ENTRIES = 2047;
export const METADATA_TABLE_SIZE = 64 * KiB;
const MAX_METADATA_ENTRIES = 2047;
/** Metadata items live after the table, each at most 1 MiB. */
const METADATA_ITEM_MIN_OFFSET = 64 * KiB;
const METADATA_ITEM_MAX_LENGTH = MiB;

export const FILE_SIGNATURE = 'vhdxfile';
const HEADER_SIGNATURE = 'head';
const REGION_SIGNATURE = 'regi';
const METADATA_SIGNATURE = 'metadata';

const BLOCK_SIZE_MIN = MiB;
export const BLOCK_SIZE_MAX = 256 * MiB;
export const MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB;
/** Sectors one sector bitmap block describes: its 1 MiB holds one bit per sector. */
const SECTORS_PER_BITMAP_BLOCK = 2 ** 23;
export const SECTOR_BITMAP_BLOCK_SIZE = MiB;

/** Payload block states (section 2.5.1.1); 5 is the v0.95 spelling of UNMAPPED, which QEMU still accepts. */
export const enum PayloadState {
  NotPresent = 0,
  Undefined = 1,
  Zero = 2,
  Unmapped = 3,
  UnmappedV095 = 5,
  FullyPresent = 6,
  PartiallyPresent = 7,
}
/** Sector bitmap block states (section 2.5.1.2). */
export const SB_BLOCK_PRESENT = 6;

const REGION_REQUIRED = 1;
export const METADATA_IS_VIRTUAL_DISK = 2;
export const METADATA_IS_REQUIRED = 4;
export const PARAMS_LEAVE_BLOCKS_ALLOCATED = 1;
const PARAMS_HAS_PARENT = 2;

/** A GUID in its on-disk form: Data1-3 little-endian, Data4 as bytes. */
export function guidBytes(text: string): Buffer {
  const hex = text.replace(/-/g, '');
  const b = Buffer.from(hex, 'hex');
  if (b.length !== 16) throw new RangeError(`not a GUID: ${text}`);
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

/** The textual form of an on-disk GUID, lower case, for messages and parent linkage. */
export function guidText(b: Buffer): string {
  const hex = (from: number, to: number, reverse: boolean) => {
    const part = Buffer.from(b.subarray(from, to));
    return (reverse ? part.reverse() : part).toString('hex');
  };
  return `${hex(0, 4, true)}-${hex(4, 6, true)}-${hex(6, 8, true)}-${hex(8, 10, false)}-${hex(10, 16, false)}`;
}

export const REGION_BAT = guidBytes('2DC27766-F623-4200-9D64-115E9BFD4A08');
export const REGION_METADATA = guidBytes('8B7CA206-4790-4B9A-B8FE-575F050F886E');
export const ITEM_FILE_PARAMETERS = guidBytes('CAA16737-FA36-4D43-B3B6-33F0AA44E76B');
export const ITEM_VIRTUAL_DISK_SIZE = guidBytes('2FA54224-CD1B-4876-B211-5DBED83BF4B8');
export const ITEM_PAGE83 = guidBytes('BECA12AB-B2E6-4523-93EF-C309E000C746');
export const ITEM_LOGICAL_SECTOR_SIZE = guidBytes('8141BF1D-A96F-4709-BA47-F233A8FAAB5F');
export const ITEM_PHYSICAL_SECTOR_SIZE = guidBytes('CDA348C7-445D-4471-9CC9-E9885251C556');
const ITEM_PARENT_LOCATOR = guidBytes('A8D35F2D-B30B-454D-ABF7-D3D84834AB0C');
export const PARENT_LOCATOR_VHDX = guidBytes('B04AEFB7-D19E-4A81-B789-25B8E9445913');

/** The current header's fields that reading needs. */
export interface VhdxHeader {
  sequenceNumber: bigint;
  /** Changes with every change of the disk's contents; a child names its parent's in parent_linkage. */
  dataWriteGuid: Buffer;
  logGuid: Buffer;
  logVersion: number;
  logLength: number;
  /** Kept as read: only the current header's value is checked and used. */
  logOffset: bigint;
}

export interface Region {
  offset: number;
  length: number;
}

/** A region named for messages. */
export interface NamedRegion extends Region {
  what: string;
}

export interface MetadataItem {
  /** Offset of the item in the file. */
  offset: number;
  length: number;
}

/** The metadata items this driver understands, located in the file. */
export interface MetadataItems {
  fileParameters: MetadataItem;
  virtualDiskSize: MetadataItem;
  page83: MetadataItem;
  logicalSectorSize: MetadataItem;
  physicalSectorSize: MetadataItem;
  parentLocator?: MetadataItem;
}

export interface DiskParameters {
  blockSize: number;
  /** A differencing image: absent sectors come from the parent. (LeaveBlocksAllocated only guides writers.) */
  hasParent: boolean;
  virtualSize: number;
  logicalSectorSize: number;
}

/** How payload and sector bitmap entries interleave in the BAT. */
export interface BatGeometry {
  blockSize: number;
  payloadBlocks: number;
  /** Payload blocks per chunk: one sector bitmap entry follows every `chunkRatio` payload entries. */
  chunkRatio: number;
  /** Entries the BAT region must hold, as QEMU counts them. */
  entries: number;
}

/** CRC-32C of `buf` with the 4-byte checksum field at `at` taken as zero, as every VHDX checksum is defined. */
export function checksumWithField(buf: Buffer, at: number): number {
  const head = native.crc32c(buf.subarray(0, at));
  const zeroed = native.crc32c(Buffer.alloc(4), head);
  return native.crc32c(buf.subarray(at + 4), zeroed);
}

export function signatureAt(buf: Buffer, at: number, length: number): string {
  return buf.toString('latin1', at, at + length);
}

function u64(buf: Buffer, at: number, file: string, field: string): number {
  return safeNumber(buf.readBigUInt64LE(at), file, field);
}

/** A header slot's contents if its signature, version and checksum hold; why not otherwise. */
function parseHeader(buf: Buffer): VhdxHeader | string {
  if (signatureAt(buf, 0, 4) !== HEADER_SIGNATURE) return 'bad signature';
  if (buf.readUInt32LE(4) !== checksumWithField(buf.subarray(0, HEADER_SIZE), 4)) return 'bad CRC-32C';
  const version = buf.readUInt16LE(66);
  if (version !== 1) return `version ${version}`;
  return {
    sequenceNumber: buf.readBigUInt64LE(8),
    dataWriteGuid: Buffer.from(buf.subarray(32, 48)),
    logGuid: Buffer.from(buf.subarray(48, 64)),
    logVersion: buf.readUInt16LE(64),
    logLength: buf.readUInt32LE(68),
    logOffset: buf.readBigUInt64LE(72),
  };
}

/**
 * The current header: the valid one, or of two valid ones the higher sequence number. Equal sequence
 * numbers are accepted only for identical headers (Disk2VHD writes those), as QEMU does.
 */
export function currentHeader(slots: Buffer[], file: string): VhdxHeader {
  const parsed = slots.map((b) => parseHeader(b));
  const valid = parsed.filter((h): h is VhdxHeader => typeof h !== 'string');
  if (valid.length === 0) {
    const why = parsed.map((h, i) => `header ${i + 1}: ${h as string}`).join(', ');
    if (parsed.every((h) => typeof h === 'string' && h.startsWith('version'))) {
      throw new UnsupportedFeatureError(`unsupported VHDX version (${why})`, { file, field: 'version' });
    }
    throw new CorruptImageError(`no valid VHDX header (${why})`, { file, field: 'header' });
  }
  if (valid.length === 1) return valid[0];
  const [a, b] = valid;
  if (a.sequenceNumber !== b.sequenceNumber) return a.sequenceNumber > b.sequenceNumber ? a : b;
  if (slots[0].subarray(0, HEADER_FIELDS_SIZE).equals(slots[1].subarray(0, HEADER_FIELDS_SIZE))) return a;
  throw new CorruptImageError(`both headers have sequence number ${a.sequenceNumber} but differ`, { file, field: 'sequence_number' });
}

export interface RegionTable {
  bat: Region;
  metadata: Region;
  /** Every structure payload blocks must keep clear of: the log and all regions, known or not. */
  occupied: NamedRegion[];
}

/** A region table copy if its signature and checksum hold; why not otherwise. */
export function checkRegionTable(buf: Buffer): string | undefined {
  if (signatureAt(buf, 0, 4) !== REGION_SIGNATURE) return 'bad signature';
  if (buf.readUInt32LE(4) !== checksumWithField(buf.subarray(0, REGION_TABLE_SIZE), 4)) return 'bad CRC-32C';
  return undefined;
}

/**
 * The BAT and metadata regions of a region table that passed `checkRegionTable`. Every region must lie
 * after the header section, inside the file, and apart from the log and from each other.
 */
export function parseRegionTable(buf: Buffer, log: Region, fileSize: number, file: string): RegionTable {
  const corrupt = (msg: string, field: string) => new CorruptImageError(msg, { file, field });
  const count = buf.readUInt32LE(8);
  if (count > MAX_REGION_ENTRIES) throw corrupt(`region table entry count ${count} exceeds ${MAX_REGION_ENTRIES}`, 'region_entry_count');
  const taken: NamedRegion[] = [{ ...log, what: 'the log' }];
  let bat: Region | undefined;
  let metadata: Region | undefined;
  for (let i = 0; i < count; i++) {
    const at = 16 + i * 32;
    const guid = buf.subarray(at, at + 16);
    const region: Region = { offset: u64(buf, at + 16, file, 'region_offset'), length: buf.readUInt32LE(at + 24) };
    const required = (buf.readUInt32LE(at + 28) & REGION_REQUIRED) !== 0;
    const name = guid.equals(REGION_BAT) ? 'BAT' : guid.equals(REGION_METADATA) ? 'metadata' : `{${guidText(guid)}}`;
    if (region.offset < HEADER_SECTION_SIZE) throw corrupt(`${name} region at ${region.offset} lies inside the header section`, 'region_offset');
    if (region.offset + region.length > fileSize) {
      throw corrupt(`${name} region of ${region.length} bytes at ${region.offset} extends past the end of the file (${fileSize} bytes)`, 'region_offset');
    }
    const clash = taken.find((r) => overlaps(r, region));
    if (clash) throw corrupt(`${name} region at ${region.offset} overlaps ${clash.what}`, 'region_offset');
    taken.push({ ...region, what: `the ${name} region` });
    if (name === 'BAT') {
      if (bat) throw corrupt('region table lists the BAT twice', 'region_entry');
      bat = region;
    } else if (name === 'metadata') {
      if (metadata) throw corrupt('region table lists the metadata region twice', 'region_entry');
      metadata = region;
    } else if (required) {
      throw new UnsupportedFeatureError(`required region ${name} is not supported`, { file, field: 'region_entry' });
    }
  }
  if (!bat) throw corrupt('region table has no BAT region', 'region_entry');
  if (!metadata) throw corrupt('region table has no metadata region', 'region_entry');
  return { bat, metadata, occupied: taken };
}

export function overlaps(a: Region, b: Region): boolean {
  return a.offset < b.offset + b.length && b.offset < a.offset + a.length;
}

/**
 * Locates the known metadata items. Items must lie inside the metadata region after its table and must
 * not overlap; an unknown item marked required is refused, as the specification demands.
 */
export function parseMetadataTable(table: Buffer, region: Region, file: string): MetadataItems {
  const corrupt = (msg: string, field: string) => new CorruptImageError(msg, { file, field });
  if (signatureAt(table, 0, 8) !== METADATA_SIGNATURE) throw corrupt('metadata table has a bad signature', 'metadata_table');
  const count = table.readUInt16LE(10);
  if (count > MAX_METADATA_ENTRIES) throw corrupt(`metadata entry count ${count} exceeds ${MAX_METADATA_ENTRIES}`, 'metadata_entry_count');
  const known: Array<[Buffer, keyof MetadataItems, string, number]> = [
    [ITEM_FILE_PARAMETERS, 'fileParameters', 'file parameters', 8],
    [ITEM_VIRTUAL_DISK_SIZE, 'virtualDiskSize', 'virtual disk size', 8],
    [ITEM_PAGE83, 'page83', 'page 83 data', 16],
    [ITEM_LOGICAL_SECTOR_SIZE, 'logicalSectorSize', 'logical sector size', 4],
    [ITEM_PHYSICAL_SECTOR_SIZE, 'physicalSectorSize', 'physical sector size', 4],
    [ITEM_PARENT_LOCATOR, 'parentLocator', 'parent locator', 20],
  ];
  const found: Partial<MetadataItems> = {};
  const placed: NamedRegion[] = [];
  for (let i = 0; i < count; i++) {
    const at = 32 + i * 32;
    const guid = table.subarray(at, at + 16);
    const offset = table.readUInt32LE(at + 16);
    const length = table.readUInt32LE(at + 20);
    const flags = table.readUInt32LE(at + 24);
    const match = known.find(([g]) => g.equals(guid));
    const what = match ? match[2] : `metadata item {${guidText(guid)}}`;
    if (length > 0) {
      if (offset < METADATA_ITEM_MIN_OFFSET || length > METADATA_ITEM_MAX_LENGTH || offset + length > region.length) {
        throw corrupt(`${what} (${length} bytes at ${offset}) lies outside the metadata region (${region.length} bytes)`, 'metadata_entry');
      }
      const item = { offset, length };
      const clash = placed.find((p) => overlaps(p, item));
      if (clash) throw corrupt(`${what} overlaps ${clash.what} in the metadata region`, 'metadata_entry');
      placed.push({ ...item, what });
    }
    if (!match) {
      if (flags & METADATA_IS_REQUIRED) throw new UnsupportedFeatureError(`required ${what} is not supported`, { file, field: 'metadata_entry' });
      continue;
    }
    const [, key, name, minLength] = match;
    if (found[key]) throw corrupt(`metadata table lists the ${name} twice`, 'metadata_entry');
    if (length < minLength) throw corrupt(`${name} item is ${length} bytes, needs ${minLength}`, 'metadata_entry');
    found[key] = { offset: region.offset + offset, length };
  }
  for (const [, key, name] of known) {
    if (key !== 'parentLocator' && !found[key]) throw corrupt(`metadata has no ${name} item`, 'metadata_entry');
  }
  return found as MetadataItems;
}

/**
 * Reads and checks the disk parameters from the item contents (each at least its minimum length). The
 * physical sector size and page 83 data must be present but do not change how the disk reads.
 */
export function parseDiskParameters(fileParameters: Buffer, virtualDiskSize: Buffer, logicalSectorSize: Buffer, file: string): DiskParameters {
  const corrupt = (msg: string, field: string) => new CorruptImageError(msg, { file, field });
  const blockSize = fileParameters.readUInt32LE(0);
  const flags = fileParameters.readUInt32LE(4);
  if (blockSize < BLOCK_SIZE_MIN || blockSize > BLOCK_SIZE_MAX || (blockSize & (blockSize - 1)) !== 0) {
    throw corrupt(`block_size ${blockSize} is not a power of two between 1 MiB and 256 MiB`, 'block_size');
  }
  const logical = logicalSectorSize.readUInt32LE(0);
  if (logical !== 512 && logical !== 4096) throw corrupt(`logical_sector_size ${logical} is neither 512 nor 4096`, 'logical_sector_size');
  const rawSize = virtualDiskSize.readBigUInt64LE(0);
  if (rawSize > BigInt(MAX_VIRTUAL_SIZE)) {
    throw corrupt(`virtual_disk_size ${rawSize} exceeds the VHDX limit of 64 TiB`, 'virtual_disk_size');
  }
  const virtualSize = Number(rawSize);
  if (virtualSize % logical !== 0) {
    throw corrupt(`virtual_disk_size ${virtualSize} is not a multiple of the logical sector size ${logical}`, 'virtual_disk_size');
  }
  return {
    blockSize,
    hasParent: (flags & PARAMS_HAS_PARENT) !== 0,
    virtualSize,
    logicalSectorSize: logical,
  };
}

/**
 * BAT geometry. The entry count follows QEMU exactly, including its 32-bit arithmetic for an empty disk
 * (which makes QEMU want a 64 MiB BAT there): a BAT smaller than QEMU's count is one QEMU refuses.
 */
export function batGeometry(virtualSize: number, blockSize: number, logicalSectorSize: number, hasParent: boolean): BatGeometry {
  const chunkRatio = (SECTORS_PER_BITMAP_BLOCK * logicalSectorSize) / blockSize;
  const payloadBlocks = Math.ceil(virtualSize / blockSize);
  const bitmapBlocks = Math.ceil(payloadBlocks / chunkRatio);
  const entries = hasParent
    ? bitmapBlocks * (chunkRatio + 1)
    : payloadBlocks + Math.floor(((payloadBlocks - 1) >>> 0) / chunkRatio);
  return { blockSize, payloadBlocks, chunkRatio, entries };
}

/** BAT index of a payload block: one sector bitmap entry follows every chunk of payload entries. */
export function payloadEntryIndex(geo: BatGeometry, block: number): number {
  return block + Math.floor(block / geo.chunkRatio);
}

/** BAT index of the sector bitmap entry of the chunk holding `block`. */
export function bitmapEntryIndex(geo: BatGeometry, block: number): number {
  return Math.floor(block / geo.chunkRatio) * (geo.chunkRatio + 1) + geo.chunkRatio;
}

/** Splits a BAT entry read as two 32-bit halves: 3 state bits, the file offset in its top 44 bits. */
export function decodeEntry(lo: number, hi: number): { state: number; offset: number } {
  return { state: lo & 7, offset: hi * 2 ** 32 + ((lo & 0xfff00000) >>> 0) };
}

export function encodeEntry(buf: Buffer, at: number, offset: number, state: number): void {
  buf.writeUInt32LE(((offset % 2 ** 32) | state) >>> 0, at);
  buf.writeUInt32LE(Math.floor(offset / 2 ** 32), at + 4);
}
