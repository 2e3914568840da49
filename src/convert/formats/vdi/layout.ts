/**
 * The VirtualBox VDI layout (version 1.1), with the limits QEMU's vdi driver applies: a 512-byte header,
 * a block map of little-endian 32-bit entries, then the data blocks. Parsing validates every field against
 * the file size and those limits before anything is allocated, because images come from strangers.
 */
import { randomUUID } from '../../../util/random.js';
import { CorruptImageError, UnsupportedFeatureError } from '../../../errors.js';

/** Bytes QEMU reads and writes as the header: the 0x48-byte pre-header plus the version 1.1 header, padded. */
export const HEADER_BYTES = 512;
const VDI_SIGNATURE = 0xbeda107f;
const VERSION_1_1 = 0x00010001;
/** header_size of a version 1.1 header (VirtualBox's VDIHEADER1): what QEMU writes, and the least readers need. */
const HEADER_SIZE_V1_1 = 0x180;
export const SECTOR_SIZE = 512;
/** QEMU is built without support for other block sizes, so 1 MiB is the only one it reads or writes. */
export const BLOCK_SIZE = 1024 * 1024;

export const TYPE_DYNAMIC = 1;
export const TYPE_STATIC = 2;
export type ImageType = typeof TYPE_DYNAMIC | typeof TYPE_STATIC;

/** Block map entry of a block never written: QEMU reads it as zeroes. */
export const BLOCK_UNALLOCATED = 0xffffffff;
/** Block map entry of a discarded block: reads as zeroes. Entries below this index the data area. */
export const BLOCK_DISCARDED = 0xfffffffe;
export const BLOCK_ENTRY_BYTES = 4;

/**
 * QEMU's cap: the block map is read in one piece whose sector-rounded size must stay below 2 GiB, so
 * (2^31 - 512) / 4 entries, and disks up to that many 1 MiB blocks (just under 512 TiB).
 */
const MAX_BLOCKS_IN_IMAGE = (2 ** 31 - SECTOR_SIZE) / BLOCK_ENTRY_BYTES;
const MAX_DISK_SIZE = MAX_BLOCKS_IN_IMAGE * BLOCK_SIZE;

/** Where the fields sit in the header (all little-endian). */
const FIELD = {
  signature: 0x40,
  version: 0x44,
  headerSize: 0x48,
  imageType: 0x4c,
  imageFlags: 0x50,
  offsetBmap: 0x154,
  offsetData: 0x158,
  sectorSize: 0x168,
  diskSize: 0x170,
  blockSize: 0x178,
  blockExtra: 0x17c,
  blocksInImage: 0x180,
  blocksAllocated: 0x184,
  uuidImage: 0x188,
  uuidLastSnap: 0x198,
  uuidLink: 0x1a8,
  uuidParent: 0x1b8,
} as const;

/** The text VirtualBox itself writes before the signature; readers ignore it, but tools like file(1) show it. */
const PRE_HEADER_TEXT = '<<< Oracle VM VirtualBox Disk Image >>>\n';

export interface VdiHeader {
  imageType: ImageType;
  offsetBmap: number;
  offsetData: number;
  /** disk_size as stored; QEMU rounds it up to whole sectors for the virtual size. */
  diskSize: number;
  blockSize: number;
  blocksInImage: number;
  blocksAllocated: number;
}

export function probeVdi(head: Buffer): number {
  // As QEMU: a file shorter than the header is not VDI, whatever its first bytes say.
  return head.length >= HEADER_BYTES && head.readUInt32LE(FIELD.signature) === VDI_SIGNATURE ? 100 : 0;
}

/** The virtual size QEMU gives an image: disk_size rounded up to a whole sector. */
export function virtualSizeOf(h: VdiHeader): number {
  return Math.ceil(h.diskSize / SECTOR_SIZE) * SECTOR_SIZE;
}

export function parseHeader(buf: Buffer, fileSize: number, file: string): VdiHeader {
  const corrupt = (msg: string, field: string) => new CorruptImageError(msg, { file, field });
  const unsupported = (msg: string, field: string) => new UnsupportedFeatureError(msg, { file, field });
  if (buf.length < HEADER_BYTES) throw corrupt(`truncated VDI header (${buf.length} bytes, needs ${HEADER_BYTES})`, 'header');
  const signature = buf.readUInt32LE(FIELD.signature);
  if (signature !== VDI_SIGNATURE) throw corrupt(`not a VDI image (bad signature 0x${hex(signature)})`, 'signature');
  const version = buf.readUInt32LE(FIELD.version);
  if (version !== VERSION_1_1) throw unsupported(`VDI version ${version >>> 16}.${version & 0xffff} is not supported (only 1.1)`, 'version');
  const headerSize = buf.readUInt32LE(FIELD.headerSize);
  if (headerSize < HEADER_SIZE_V1_1) {
    throw corrupt(`header_size ${headerSize} is smaller than a version 1.1 header (${HEADER_SIZE_V1_1} bytes)`, 'header_size');
  }
  const imageType = buf.readUInt32LE(FIELD.imageType);
  if (imageType !== TYPE_DYNAMIC && imageType !== TYPE_STATIC) {
    throw unsupported(`VDI image type ${imageType} is not supported (1 dynamic and 2 static are; undo and differencing images are not)`, 'image_type');
  }
  const offsetBmap = buf.readUInt32LE(FIELD.offsetBmap);
  const offsetData = buf.readUInt32LE(FIELD.offsetData);
  if (offsetBmap % SECTOR_SIZE !== 0) throw unsupported(`block map offset 0x${hex(offsetBmap)} is not sector aligned`, 'offset_bmap');
  if (offsetData % SECTOR_SIZE !== 0) throw unsupported(`data offset 0x${hex(offsetData)} is not sector aligned`, 'offset_data');
  const sectorSize = buf.readUInt32LE(FIELD.sectorSize);
  if (sectorSize !== SECTOR_SIZE) throw unsupported(`sector_size ${sectorSize} is not ${SECTOR_SIZE}`, 'sector_size');

  const blockSize = buf.readUInt32LE(FIELD.blockSize);
  if (blockSize === 0 || (blockSize & (blockSize - 1)) !== 0) throw corrupt(`block_size ${blockSize} is not a power of two`, 'block_size');
  if (blockSize !== BLOCK_SIZE) throw unsupported(`block_size ${blockSize} is not supported (QEMU reads only ${BLOCK_SIZE}-byte blocks)`, 'block_size');
  const blockExtra = buf.readUInt32LE(FIELD.blockExtra);
  // VirtualBox would put these bytes before each block's data; QEMU ignores the field and would misread such an image.
  if (blockExtra !== 0) throw unsupported(`block_extra ${blockExtra} is not supported (only 0)`, 'block_extra');

  const storedDiskSize = buf.readBigUInt64LE(FIELD.diskSize);
  if (storedDiskSize > BigInt(MAX_DISK_SIZE)) {
    throw unsupported(`disk_size ${storedDiskSize} exceeds the largest VDI disk QEMU supports (${MAX_DISK_SIZE} bytes)`, 'disk_size');
  }
  const diskSize = Number(storedDiskSize);
  const blocksInImage = buf.readUInt32LE(FIELD.blocksInImage);
  if (blocksInImage > MAX_BLOCKS_IN_IMAGE) {
    throw unsupported(`blocks_in_image ${blocksInImage} exceeds the limit of ${MAX_BLOCKS_IN_IMAGE}`, 'blocks_in_image');
  }
  const blocksAllocated = buf.readUInt32LE(FIELD.blocksAllocated);
  if (blocksAllocated > blocksInImage) {
    throw corrupt(`blocks_allocated ${blocksAllocated} exceeds blocks_in_image ${blocksInImage}`, 'blocks_allocated');
  }
  const h: VdiHeader = { imageType, offsetBmap, offsetData, diskSize, blockSize, blocksInImage, blocksAllocated };
  const room = blocksInImage * blockSize;
  if (virtualSizeOf(h) > room) {
    throw corrupt(`disk_size ${diskSize} does not fit in blocks_in_image ${blocksInImage} blocks of ${blockSize} bytes`, 'disk_size');
  }
  if (!isNullUuid(buf, FIELD.uuidLink)) throw unsupported('differencing VDI images (non-null link UUID) are not supported', 'uuid_link');
  if (!isNullUuid(buf, FIELD.uuidParent)) throw unsupported('differencing VDI images (non-null parent UUID) are not supported', 'uuid_parent');

  const bmapBytes = blocksInImage * BLOCK_ENTRY_BYTES;
  if (offsetBmap + bmapBytes > fileSize) {
    throw corrupt(`block map of ${bmapBytes} bytes at offset_bmap ${offsetBmap} extends past the end of the file (${fileSize} bytes)`, 'offset_bmap');
  }
  return h;
}

/** Where each part of a new image goes, as QEMU lays it out: header, block map in whole sectors, data. */
export interface VdiGeometry {
  diskSize: number;
  blocks: number;
  offsetBmap: number;
  offsetData: number;
}

export function planGeometry(virtualSize: number): VdiGeometry {
  const diskSize = Math.ceil(virtualSize / SECTOR_SIZE) * SECTOR_SIZE;
  if (diskSize > MAX_DISK_SIZE) {
    throw new UnsupportedFeatureError(`a VDI disk holds at most ${MAX_DISK_SIZE} bytes; this one needs ${diskSize}`, { field: 'size' });
  }
  const blocks = Math.ceil(diskSize / BLOCK_SIZE);
  const offsetBmap = HEADER_BYTES;
  const offsetData = offsetBmap + Math.ceil((blocks * BLOCK_ENTRY_BYTES) / SECTOR_SIZE) * SECTOR_SIZE;
  return { diskSize, blocks, offsetBmap, offsetData };
}

export function encodeHeader(geo: VdiGeometry, imageType: ImageType, blocksAllocated: number): Buffer {
  const buf = Buffer.alloc(HEADER_BYTES);
  buf.write(PRE_HEADER_TEXT, 0, 'latin1');
  buf.writeUInt32LE(VDI_SIGNATURE, FIELD.signature);
  buf.writeUInt32LE(VERSION_1_1, FIELD.version);
  buf.writeUInt32LE(HEADER_SIZE_V1_1, FIELD.headerSize);
  buf.writeUInt32LE(imageType, FIELD.imageType);
  buf.writeUInt32LE(geo.offsetBmap, FIELD.offsetBmap);
  buf.writeUInt32LE(geo.offsetData, FIELD.offsetData);
  buf.writeUInt32LE(SECTOR_SIZE, FIELD.sectorSize);
  buf.writeBigUInt64LE(BigInt(geo.diskSize), FIELD.diskSize);
  buf.writeUInt32LE(BLOCK_SIZE, FIELD.blockSize);
  buf.writeUInt32LE(geo.blocks, FIELD.blocksInImage);
  buf.writeUInt32LE(blocksAllocated, FIELD.blocksAllocated);
  storedUuid().copy(buf, FIELD.uuidImage);
  storedUuid().copy(buf, FIELD.uuidLastSnap);
  return buf;
}

/** A random UUID as VDI stores it: the first three groups little-endian (Microsoft GUID byte order). */
function storedUuid(): Buffer {
  const bytes = Buffer.from(randomUUID().replace(/-/g, ''), 'hex');
  bytes.subarray(0, 4).reverse();
  bytes.subarray(4, 6).reverse();
  bytes.subarray(6, 8).reverse();
  return bytes;
}

function isNullUuid(buf: Buffer, at: number): boolean {
  return buf.subarray(at, at + 16).every((b) => b === 0);
}

function hex(n: number): string {
  return n.toString(16).padStart(8, '0');
}
