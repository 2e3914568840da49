/**
 * The qcow2 on-disk layout (qemu docs/interop/qcow2.txt): header, header extensions, table entry bits.
 * Parsing validates every field against the file size and QEMU's own limits before anything is allocated,
 * because images come from strangers.
 */
import type { FileHandle } from 'node:fs/promises';
import { CorruptImageError, UnsupportedFeatureError, safeNumber } from '../../../errors.js';
import { readFully } from '../../output-file.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 104;
/** v3 header length QEMU writes: with the compression_type byte and padding. */
export const V3_HEADER_LENGTH_WITH_COMPRESSION = 112;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU limits (block/qcow2.h): refusing larger tables keeps a hostile header from costing memory. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_BACKING_NAME = 1023;

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_ENCRYPTION = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

/** L1/L2 entry bits. Offsets live in bits 9-55. */
export const OFFSET_MASK = 0x00fffffffffffe00n;
export const COPIED = 1n << 63n;
export const COMPRESSED = 1n << 62n;
export const ZERO_FLAG = 1n;
export const SUBCLUSTERS = 32;

export type CompressionType = 'zlib' | 'zstd';

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  virtualSize: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: CompressionType;
  extendedL2: boolean;
}

export interface HeaderExtensions {
  backingFormat?: string;
  dataFile?: string;
  featureNames: Array<{ type: number; bit: number; name: string }>;
  bitmaps?: { count: number };
}

/** Entries per L2 table: halved with extended L2 (128-bit entries). */
export function l2Entries(h: Pick<Qcow2Header, 'clusterSize' | 'extendedL2'>): number {
  return h.clusterSize / (h.extendedL2 ? 16 : 8);
}

/** Bytes read from the start of an image for its header, extensions and backing name (all in cluster 0). */
const HEAD_BYTES = 2 * 1024 * 1024;

/** Reads and validates an open image's header and extensions; `head` is the first bytes of the file. */
export async function readHeader(handle: FileHandle, file: string): Promise<{ fileSize: number; head: Buffer; header: Qcow2Header; extensions: HeaderExtensions }> {
  const { size: fileSize } = await handle.stat();
  const head = Buffer.alloc(Math.min(fileSize, HEAD_BYTES));
  await readFully(handle, head, 0, head.length, 0);
  const header = parseHeader(head, fileSize, file);
  return { fileSize, head, header, extensions: parseExtensions(head.subarray(0, header.clusterSize), header, file) };
}

export function parseHeader(buf: Buffer, fileSize: number, file: string): Qcow2Header {
  const corrupt = (msg: string, field: string) => new CorruptImageError(msg, { file, field });
  if (buf.length < V2_HEADER_LENGTH) throw corrupt(`truncated qcow2 header (${buf.length} bytes)`, 'header');
  if (buf.readUInt32BE(0) !== QCOW2_MAGIC) throw corrupt('not a qcow2 image (bad magic)', 'magic');
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new UnsupportedFeatureError(`qcow2 version ${version} is not supported`, { file, field: 'version' });
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(`cluster_bits ${clusterBits} out of range ${MIN_CLUSTER_BITS}-${MAX_CLUSTER_BITS}`, 'cluster_bits');
  }
  const clusterSize = 2 ** clusterBits;
  const u64 = (at: number, field: string) => safeNumber(buf.readBigUInt64BE(at), file, field);

  let incompatible = 0n;
  let compatible = 0n;
  let autoclear = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  let compressionType: CompressionType = 'zlib';
  if (version === 3) {
    if (buf.length < V3_HEADER_LENGTH) throw corrupt(`truncated qcow2 v3 header (${buf.length} bytes)`, 'header');
    incompatible = buf.readBigUInt64BE(72);
    compatible = buf.readBigUInt64BE(80);
    autoclear = buf.readBigUInt64BE(88);
    refcountOrder = buf.readUInt32BE(96);
    headerLength = buf.readUInt32BE(100);
    if (headerLength < V3_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > clusterSize) {
      throw corrupt(`header_length ${headerLength} is invalid`, 'header_length');
    }
    if (refcountOrder > 6) throw corrupt(`refcount_order ${refcountOrder} out of range 0-6`, 'refcount_order');
    const unknown = incompatible & ~INCOMPAT_KNOWN;
    if (unknown) {
      throw new UnsupportedFeatureError(`unknown incompatible feature bits 0x${unknown.toString(16)}: refusing to read an image this version does not understand`, {
        file,
        field: 'incompatible_features',
      });
    }
    if (incompatible & INCOMPAT_CORRUPT) {
      throw corrupt('image is flagged corrupt by QEMU (incompatible bit 1); repair it with qemu-img check -r all first', 'incompatible_features');
    }
    if (headerLength > V3_HEADER_LENGTH) {
      if (buf.length < V3_HEADER_LENGTH + 1) throw corrupt('truncated header', 'header');
      const type = buf[104];
      if (type === 0) compressionType = 'zlib';
      else if (type === 1) compressionType = 'zstd';
      else throw new UnsupportedFeatureError(`unknown compression type ${type}`, { file, field: 'compression_type' });
      if (type !== 0 && !(incompatible & INCOMPAT_COMPRESSION)) {
        throw corrupt('compression_type is set but the compression-type incompatible bit is not', 'compression_type');
      }
    } else if (incompatible & INCOMPAT_COMPRESSION) {
      throw corrupt('compression-type bit set in a header too short to hold compression_type', 'compression_type');
    }
  }

  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(8, 'backing_file_offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    clusterSize,
    virtualSize: u64(24, 'size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: u64(40, 'l1_table_offset'),
    refcountTableOffset: u64(48, 'refcount_table_offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: u64(64, 'snapshots_offset'),
    incompatible,
    compatible,
    autoclear,
    refcountOrder,
    headerLength,
    compressionType,
    extendedL2: (incompatible & INCOMPAT_EXTL2) !== 0n,
  };

  if (h.cryptMethod !== 0) {
    throw new UnsupportedFeatureError(`encrypted qcow2 images (crypt_method ${h.cryptMethod}) are not supported`, { file, field: 'crypt_method' });
  }
  if (h.extendedL2 && clusterBits < 14) throw corrupt('extended L2 entries need clusters of at least 16 KiB', 'cluster_bits');
  // The largest guest offset an L2 entry can map is 2^56; QEMU caps the virtual size further via L1.
  const entries = l2Entries(h);
  const neededL1 = Math.ceil(h.virtualSize / clusterSize / entries);
  if (h.l1Size * 8 > MAX_L1_BYTES) throw corrupt(`l1_size ${h.l1Size} exceeds the 32 MiB limit`, 'l1_size');
  if (h.l1Size < neededL1) throw corrupt(`l1_size ${h.l1Size} too small for virtual size ${h.virtualSize} (needs ${neededL1})`, 'l1_size');
  if (h.l1Size > 0) checkTable(h.l1TableOffset, h.l1Size * 8, clusterSize, fileSize, 'l1_table_offset', file);
  if (h.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw corrupt(`refcount_table_clusters ${h.refcountTableClusters} exceeds the 8 MiB limit`, 'refcount_table_clusters');
  }
  checkTable(h.refcountTableOffset, h.refcountTableClusters * clusterSize, clusterSize, fileSize, 'refcount_table_offset', file);
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_NAME) throw corrupt(`backing file name length ${h.backingFileSize} exceeds ${MAX_BACKING_NAME}`, 'backing_file_size');
    if (h.backingFileOffset + h.backingFileSize > clusterSize) throw corrupt('backing file name lies outside the header cluster', 'backing_file_offset');
  }
  return h;
}

function checkTable(offset: number, bytes: number, clusterSize: number, fileSize: number, field: string, file: string): void {
  if (offset % clusterSize !== 0) throw new CorruptImageError(`${field} ${offset} is not cluster aligned`, { file, field });
  if (offset + bytes > fileSize) {
    throw new CorruptImageError(`${field}: table of ${bytes} bytes at ${offset} extends past the end of the file (${fileSize} bytes)`, { file, field });
  }
}

/** Header extensions sit between the header and the end of cluster 0 (or the backing file name). */
export function parseExtensions(buf: Buffer, h: Qcow2Header, file: string): HeaderExtensions {
  const out: HeaderExtensions = { featureNames: [] };
  if (h.version === 2 && h.headerLength === V2_HEADER_LENGTH && buf.length <= V2_HEADER_LENGTH) return out;
  const limit = h.backingFileOffset ? Math.min(h.backingFileOffset, buf.length) : Math.min(h.clusterSize, buf.length);
  let at = h.headerLength;
  while (at + 8 <= limit) {
    const type = buf.readUInt32BE(at);
    const len = buf.readUInt32BE(at + 4);
    at += 8;
    if (type === EXT_END) break;
    if (at + len > limit) throw new CorruptImageError(`header extension 0x${type.toString(16)} overruns the header cluster`, { file, field: 'header_extension' });
    const data = buf.subarray(at, at + len);
    switch (type) {
      case EXT_BACKING_FORMAT:
        out.backingFormat = data.toString('utf8');
        break;
      case EXT_DATA_FILE:
        out.dataFile = data.toString('utf8');
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= data.length; i += 48) {
          out.featureNames.push({ type: data[i], bit: data[i + 1], name: data.subarray(i + 2, i + 48).toString('utf8').replace(/\0+$/, '') });
        }
        break;
      case EXT_BITMAPS:
        if (data.length >= 4) out.bitmaps = { count: data.readUInt32BE(0) };
        break;
      case EXT_ENCRYPTION:
        throw new UnsupportedFeatureError('encrypted qcow2 images are not supported', { file, field: 'crypt_method' });
      default:
        break; // unknown extensions are optional by definition
    }
    at += Math.ceil(len / 8) * 8;
  }
  return out;
}

/** Where a compressed cluster's bytes are: its offset and the whole sectors its descriptor claims. */
export function compressedRange(entry: bigint, clusterBits: number): { offset: number; sectorStart: number; length: number } {
  const x = BigInt(62 - (clusterBits - 8));
  const offset = Number(entry & ((1n << x) - 1n));
  const extraSectors = Number((entry >> x) & ((1n << BigInt(clusterBits - 8)) - 1n));
  const sectorStart = offset - (offset % 512);
  const end = sectorStart + (extraSectors + 1) * 512;
  return { offset, sectorStart, length: end - offset };
}

export function compressedDescriptor(offset: number, length: number, clusterBits: number): bigint {
  const x = BigInt(62 - (clusterBits - 8));
  const extraSectors = Math.floor((offset + length - 1) / 512) - Math.floor(offset / 512);
  return COMPRESSED | (BigInt(extraSectors) << x) | BigInt(offset);
}

/** Entry `index` of a refcount block; sub-byte widths start at the least significant bit. */
export function readRefcount(block: Buffer, index: number, bits: number): number {
  switch (bits) {
    case 64:
      return Number(block.readBigUInt64BE(index * 8));
    case 32:
      return block.readUInt32BE(index * 4);
    case 16:
      return block.readUInt16BE(index * 2);
    case 8:
      return block[index];
    default: {
      const bitPos = index * bits;
      return (block[bitPos >> 3] >> (bitPos & 7)) & ((1 << bits) - 1);
    }
  }
}

/** Sets entry `index` of a refcount block, leaving its neighbours (sub-byte widths share bytes) as they are. */
export function writeRefcount(block: Buffer, index: number, bits: number, value: number): void {
  switch (bits) {
    case 64:
      block.writeBigUInt64BE(BigInt(value), index * 8);
      return;
    case 32:
      block.writeUInt32BE(value, index * 4);
      return;
    case 16:
      block.writeUInt16BE(value, index * 2);
      return;
    case 8:
      block[index] = value;
      return;
    default: {
      const bitPos = index * bits;
      const mask = ((1 << bits) - 1) << (bitPos & 7);
      block[bitPos >> 3] = (block[bitPos >> 3] & ~mask) | (value << (bitPos & 7));
    }
  }
}
