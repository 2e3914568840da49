/**
 * The VHD on-disk layout (Microsoft's "Virtual Hard Disk Image Format Specification"): the 512-byte
 * footer, the 1024-byte dynamic disk header, CHS geometry, and the rules QEMU 7.2 (block/vpc.c) applies
 * to them, so that Ferry reads the same virtual size and refuses what QEMU refuses.
 * All fields are big-endian.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../../errors.js';

export const SECTOR = 512;
export const FOOTER_SIZE = 512;
export const HEADER_SIZE = 1024;
const FOOTER_COOKIE = 'conectix';
const HEADER_COOKIE = 'cxsparse';
/** Where qemu puts the dynamic header and the BAT; Ferry writes the same layout. */
export const HEADER_OFFSET = FOOTER_SIZE;
export const BAT_OFFSET = FOOTER_SIZE + HEADER_SIZE;
/** A BAT entry for a block with no storage. */
export const UNALLOCATED = 0xffffffff;
/** Fixed disks have no next structure: every bit of data_offset set (qemu, and what MS tools expect). */
export const NO_DATA_OFFSET = 0xffffffffffffffffn;
/** Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00:00 UTC. */
export const VHD_EPOCH = 946684800;

export enum DiskType {
  Fixed = 2,
  Dynamic = 3,
  Differencing = 4,
}

const MAX_CYLINDERS = 65535;
const MAX_HEADS = 16;
const MAX_SECTORS_PER_TRACK = 255;
/** The largest CHS geometry; an image with it is sized by current_size instead (qemu's VHD_MAX_GEOMETRY). */
const MAX_GEOMETRY_SECTORS = MAX_CYLINDERS * MAX_HEADS * MAX_SECTORS_PER_TRACK;
/** qemu's limit, 2040 GiB: VHD_MAX_SECTORS. */
const MAX_DISK_SECTORS = 0xff000000;
/** qemu refuses BATs whose byte size would overflow an int. */
export const MAX_TABLE_ENTRIES = Math.floor(0x7fffffff / 4);

/**
 * Creator applications whose images are sized by current_size; every other creator (Virtual PC "vpc ",
 * QEMU "qemu", and unknown ones) is sized by CHS geometry. This is QEMU 7.2's table: later QEMU versions
 * invert it (current_size unless "vpc " or "qemu"), which changes the size of e.g. Azure ("wa\0\0") images.
 */
const CURRENT_SIZE_CREATORS = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'];

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

const MAX_GEOMETRY: Geometry = { cylinders: MAX_CYLINDERS, heads: MAX_HEADS, sectorsPerTrack: MAX_SECTORS_PER_TRACK };

export interface Footer {
  features: number;
  version: number;
  dataOffset: bigint;
  timestamp: number;
  creatorApp: string;
  creatorVersion: number;
  creatorOs: string;
  originalSize: bigint;
  currentSize: bigint;
  geometry: Geometry;
  diskType: number;
  checksum: number;
  uuid: Buffer;
}

export interface ParentLocator {
  platform: string;
  dataSpace: number;
  dataLength: number;
  dataOffset: bigint;
}

export interface DynamicHeader {
  dataOffset: bigint;
  tableOffset: bigint;
  version: number;
  maxTableEntries: number;
  blockSize: number;
  checksum: number;
  parentUuid: Buffer;
  parentTimestamp: number;
  /** The parent's file name (UTF-16 big-endian in the header), without any path. */
  parentName: string;
  locators: ParentLocator[];
}

/** One's complement of the byte sum, skipping the 4-byte checksum field at `checksumAt`. */
export function vhdChecksum(buf: Buffer, checksumAt: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) if (i < checksumAt || i >= checksumAt + 4) sum += buf[i];
  return ~sum >>> 0;
}

export function hasFooterCookie(buf: Buffer): boolean {
  return buf.length >= 8 && buf.toString('latin1', 0, 8) === FOOTER_COOKIE;
}

/** Parses a footer whose cookie is known to be present; a wrong checksum is an error, as in QEMU. */
export function parseFooter(buf: Buffer, file: string, where: string): Footer {
  const checksum = buf.readUInt32BE(64);
  const computed = vhdChecksum(buf, 64);
  if (checksum !== computed) {
    throw new CorruptImageError(`footer ${where}: checksum 0x${hex(checksum)} does not match the computed 0x${hex(computed)}`, { file, field: 'checksum' });
  }
  return {
    features: buf.readUInt32BE(8),
    version: buf.readUInt32BE(12),
    dataOffset: buf.readBigUInt64BE(16),
    timestamp: buf.readUInt32BE(24),
    creatorApp: buf.toString('latin1', 28, 32),
    creatorVersion: buf.readUInt32BE(32),
    creatorOs: buf.toString('latin1', 36, 40),
    originalSize: buf.readBigUInt64BE(40),
    currentSize: buf.readBigUInt64BE(48),
    geometry: { cylinders: buf.readUInt16BE(56), heads: buf[58], sectorsPerTrack: buf[59] },
    diskType: buf.readUInt32BE(60),
    checksum,
    uuid: Buffer.from(buf.subarray(68, 84)),
  };
}

export function encodeFooter(f: Omit<Footer, 'checksum'>): Buffer {
  const buf = Buffer.alloc(FOOTER_SIZE);
  buf.write(FOOTER_COOKIE, 0, 'latin1');
  buf.writeUInt32BE(f.features, 8);
  buf.writeUInt32BE(f.version, 12);
  buf.writeBigUInt64BE(f.dataOffset, 16);
  buf.writeUInt32BE(f.timestamp, 24);
  buf.write(f.creatorApp, 28, 4, 'latin1');
  buf.writeUInt32BE(f.creatorVersion, 32);
  buf.write(f.creatorOs, 36, 4, 'latin1');
  buf.writeBigUInt64BE(f.originalSize, 40);
  buf.writeBigUInt64BE(f.currentSize, 48);
  buf.writeUInt16BE(f.geometry.cylinders, 56);
  buf[58] = f.geometry.heads;
  buf[59] = f.geometry.sectorsPerTrack;
  buf.writeUInt32BE(f.diskType, 60);
  f.uuid.copy(buf, 68, 0, 16);
  buf.writeUInt32BE(vhdChecksum(buf, 64), 64);
  return buf;
}

/**
 * The guest size QEMU 7.2 gives an image: CHS cylinders * heads * sectors, unless the creator is known to
 * size by current_size or the geometry is the maximum (the size would not fit it). Refuses what QEMU
 * refuses with EFBIG: more than 2040 GiB.
 */
export function virtualSizeOf(footer: Footer, file: string): number {
  const g = footer.geometry;
  const chsSectors = g.cylinders * g.heads * g.sectorsPerTrack;
  const useCurrentSize = CURRENT_SIZE_CREATORS.includes(footer.creatorApp) || chsSectors === MAX_GEOMETRY_SECTORS;
  const sectors = useCurrentSize ? footer.currentSize / BigInt(SECTOR) : BigInt(chsSectors);
  if (sectors > BigInt(MAX_DISK_SECTORS)) {
    const field = useCurrentSize ? 'current_size' : 'disk_geometry';
    throw new UnsupportedFeatureError(`virtual size of ${sectors} sectors exceeds the VHD maximum of 2040 GiB`, { file, field });
  }
  return Number(sectors) * SECTOR;
}

export function parseDynamicHeader(buf: Buffer, file: string): DynamicHeader {
  if (buf.toString('latin1', 0, 8) !== HEADER_COOKIE) {
    throw new CorruptImageError(`dynamic disk header has no '${HEADER_COOKIE}' cookie`, { file, field: 'header_cookie' });
  }
  const checksum = buf.readUInt32BE(36);
  const computed = vhdChecksum(buf, 36);
  if (checksum !== computed) {
    throw new CorruptImageError(`dynamic disk header checksum 0x${hex(checksum)} does not match the computed 0x${hex(computed)}`, {
      file,
      field: 'header_checksum',
    });
  }
  const locators: ParentLocator[] = [];
  for (let i = 0; i < 8; i++) {
    const at = 576 + i * 24;
    const code = buf.readUInt32BE(at);
    if (code === 0) continue;
    locators.push({
      platform: buf.toString('latin1', at, at + 4),
      dataSpace: buf.readUInt32BE(at + 4),
      dataLength: buf.readUInt32BE(at + 8),
      dataOffset: buf.readBigUInt64BE(at + 16),
    });
  }
  return {
    dataOffset: buf.readBigUInt64BE(8),
    tableOffset: buf.readBigUInt64BE(16),
    version: buf.readUInt32BE(24),
    maxTableEntries: buf.readUInt32BE(28),
    blockSize: buf.readUInt32BE(32),
    checksum,
    parentUuid: Buffer.from(buf.subarray(40, 56)),
    parentTimestamp: buf.readUInt32BE(56),
    parentName: decodeUtf16(buf.subarray(64, 576), 'be'),
    locators,
  };
}

/** The header Ferry (like qemu) writes for a dynamic disk: no parent, BAT right after the header. */
export function encodeDynamicHeader(maxTableEntries: number, blockSize: number): Buffer {
  const buf = Buffer.alloc(HEADER_SIZE);
  buf.write(HEADER_COOKIE, 0, 'latin1');
  buf.writeBigUInt64BE(NO_DATA_OFFSET, 8);
  buf.writeBigUInt64BE(BigInt(BAT_OFFSET), 16);
  buf.writeUInt32BE(0x00010000, 24);
  buf.writeUInt32BE(maxTableEntries, 28);
  buf.writeUInt32BE(blockSize, 32);
  buf.writeUInt32BE(vhdChecksum(buf, 36), 36);
  return buf;
}

/**
 * Bytes of sector bitmap before each block's data, computed as QEMU does: the bitmap rounded to whole
 * sectors, which is 0 for blocks under 4 KiB (the spec would say one sector; QEMU's reads are what
 * Ferry matches).
 */
export function bitmapBytes(blockSize: number): number {
  return Math.floor((Math.floor(blockSize / (8 * SECTOR)) + 511) / 512) * 512;
}

/**
 * CHS geometry for a sector count, by the algorithm in the VHD specification's appendix as QEMU implements
 * it (heads above 16 allowed only through the 255-sector branch). The geometry may cover fewer sectors.
 */
function calculateGeometry(totalSectors: number): Geometry {
  const sectors = Math.min(totalSectors, MAX_GEOMETRY_SECTORS);
  let sectorsPerTrack: number;
  let heads: number;
  let cylindersTimesHeads: number;
  if (sectors >= 65535 * 16 * 63) {
    sectorsPerTrack = 255;
    heads = 16;
    cylindersTimesHeads = Math.floor(sectors / sectorsPerTrack);
  } else {
    sectorsPerTrack = 17;
    cylindersTimesHeads = Math.floor(sectors / sectorsPerTrack);
    heads = Math.max(4, Math.ceil(cylindersTimesHeads / 1024));
    if (cylindersTimesHeads >= heads * 1024 || heads > 16) {
      sectorsPerTrack = 31;
      heads = 16;
      cylindersTimesHeads = Math.floor(sectors / sectorsPerTrack);
    }
    if (cylindersTimesHeads >= heads * 1024) {
      sectorsPerTrack = 63;
      heads = 16;
      cylindersTimesHeads = Math.floor(sectors / sectorsPerTrack);
    }
  }
  return { cylinders: Math.floor(cylindersTimesHeads / heads), heads, sectorsPerTrack };
}

function geometrySectors(g: Geometry): number {
  return g.cylinders * g.heads * g.sectorsPerTrack;
}

/** A new image's size and geometry: what qemu-img create/convert -O vpc produce for a requested size. */
export interface SizePlan {
  virtualSize: number;
  geometry: Geometry;
}

/**
 * QEMU's rounding: the size goes up to whole sectors, then (without force_size) up to the smallest CHS
 * geometry that holds it. With force_size, or past the largest geometry, the geometry is the maximum and
 * the size is kept; readers then use current_size. Returns undefined past 2040 GiB.
 */
export function planSize(requested: number, forceSize: boolean): SizePlan | undefined {
  const sectors = Math.ceil(requested / SECTOR);
  let geometry = MAX_GEOMETRY;
  if (!forceSize) {
    const wanted = Math.min(MAX_GEOMETRY_SECTORS, sectors);
    geometry = { cylinders: 0, heads: 0, sectorsPerTrack: 0 };
    for (let extra = 0; wanted > geometrySectors(geometry); extra++) geometry = calculateGeometry(wanted + extra);
  }
  const total = geometrySectors(geometry) === MAX_GEOMETRY_SECTORS ? sectors : geometrySectors(geometry);
  if (total > MAX_DISK_SECTORS) return undefined;
  return { virtualSize: total * SECTOR, geometry };
}

/**
 * Decodes a NUL-padded UTF-16 string. The spec says big-endian for the header's parent name and Windows
 * writes locators little-endian, but writers disagree (VirtualBox writes the name little-endian), so a
 * byte-order mark, or the zero byte of a leading ASCII character, overrides `expected`.
 */
export function decodeUtf16(bytes: Buffer, expected: 'le' | 'be'): string {
  let data = Buffer.from(bytes.subarray(0, bytes.length - (bytes.length % 2)));
  let order = expected;
  if (data.length >= 2) {
    if (data[0] === 0xfe && data[1] === 0xff) [order, data] = ['be', data.subarray(2)];
    else if (data[0] === 0xff && data[1] === 0xfe) [order, data] = ['le', data.subarray(2)];
    else if (data[0] === 0 && data[1] !== 0) order = 'be';
    else if (data[0] !== 0 && data[1] === 0) order = 'le';
  }
  if (order === 'be') data.swap16();
  return data.toString('utf16le').replace(/\0[\s\S]*$/, '');
}

function hex(v: number): string {
  return v.toString(16).padStart(8, '0');
}
