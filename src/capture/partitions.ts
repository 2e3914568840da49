/**
 * MBR and GPT partition tables, read through the source so that filesystems on a whole disk can be found.
 * Entries outside the disk or overlapping nonsense are dropped: the areas they would have named are then
 * simply copied whole.
 */
import type { ReadAt } from './ranges.js';

export interface Partition {
  /** 1-based, as the kernel numbers them (sda1). */
  number: number;
  start: number;
  length: number;
  /** MBR type byte as two hex digits, or the GPT type GUID. */
  type: string;
}

export interface PartitionTable {
  kind: 'gpt' | 'mbr' | 'none';
  partitions: Partition[];
}

const MBR_EXTENDED = new Set([0x05, 0x0f, 0x85]);
const MAX_LOGICAL = 128;
const MAX_GPT_ENTRIES = 1024;

export async function readPartitionTable(read: ReadAt, diskSize: number, sectorSize: number): Promise<PartitionTable> {
  if (diskSize < 2 * sectorSize) return { kind: 'none', partitions: [] };
  const mbr = await read(0, 512);
  if (mbr.readUInt16LE(510) !== 0xaa55) return { kind: 'none', partitions: [] };
  const entries = mbrEntries(mbr);
  if (entries === undefined) return { kind: 'none', partitions: [] };
  if (entries.some((e) => e.type === 0xee)) {
    const gpt = await readGpt(read, diskSize, sectorSize);
    if (gpt) return { kind: 'gpt', partitions: gpt };
  }
  const partitions: Partition[] = [];
  for (const [i, e] of entries.entries()) {
    if (e.type === 0 || e.sectors === 0) continue;
    const start = e.lba * sectorSize;
    const length = e.sectors * sectorSize;
    if (start + length > diskSize) continue;
    if (MBR_EXTENDED.has(e.type)) {
      partitions.push(...(await logicalPartitions(read, diskSize, sectorSize, e.lba)));
      continue;
    }
    partitions.push({ number: i + 1, start, length, type: e.type.toString(16).padStart(2, '0') });
  }
  return { kind: 'mbr', partitions };
}

interface MbrEntry {
  type: number;
  lba: number;
  sectors: number;
}

/** The four entries, or undefined when the sector is a boot sector without a table (bad boot flags). */
function mbrEntries(sector: Buffer): MbrEntry[] | undefined {
  const out: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const e = sector.subarray(446 + 16 * i, 462 + 16 * i);
    if (e[0] !== 0 && e[0] !== 0x80) return undefined;
    out.push({ type: e[4], lba: e.readUInt32LE(8), sectors: e.readUInt32LE(12) });
  }
  return out;
}

/** Walks the chain of extended boot records: each holds one logical partition and a link to the next. */
async function logicalPartitions(read: ReadAt, diskSize: number, sectorSize: number, extendedLba: number): Promise<Partition[]> {
  const out: Partition[] = [];
  let ebrLba = extendedLba;
  const seen = new Set<number>();
  while (out.length < MAX_LOGICAL && !seen.has(ebrLba) && (ebrLba + 1) * sectorSize <= diskSize) {
    seen.add(ebrLba);
    const ebr = await read(ebrLba * sectorSize, 512);
    if (ebr.readUInt16LE(510) !== 0xaa55) break;
    const entries = mbrEntries(ebr);
    if (!entries) break;
    const [logical, link] = entries;
    const start = (ebrLba + logical.lba) * sectorSize;
    const length = logical.sectors * sectorSize;
    if (logical.type !== 0 && length > 0 && start + length <= diskSize) {
      out.push({ number: 5 + out.length, start, length, type: logical.type.toString(16).padStart(2, '0') });
    }
    if (!MBR_EXTENDED.has(link.type) || link.lba === 0) break;
    ebrLba = extendedLba + link.lba;
  }
  return out;
}

async function readGpt(read: ReadAt, diskSize: number, sectorSize: number): Promise<Partition[] | undefined> {
  const header = await read(sectorSize, 512);
  if (header.toString('latin1', 0, 8) !== 'EFI PART') return undefined;
  const entriesLba = Number(header.readBigUInt64LE(72));
  const count = header.readUInt32LE(80);
  const entrySize = header.readUInt32LE(84);
  if (count > MAX_GPT_ENTRIES || entrySize < 128 || entrySize > 4096 || entrySize % 8 !== 0) return undefined;
  const tableBytes = count * entrySize;
  if (!Number.isSafeInteger(entriesLba) || entriesLba * sectorSize + tableBytes > diskSize) return undefined;
  const table = tableBytes ? await read(entriesLba * sectorSize, tableBytes) : Buffer.alloc(0);
  const out: Partition[] = [];
  for (let i = 0; i < count; i++) {
    const e = table.subarray(i * entrySize, (i + 1) * entrySize);
    const typeGuid = e.subarray(0, 16);
    if (typeGuid.every((b) => b === 0)) continue;
    const first = Number(e.readBigUInt64LE(32));
    const last = Number(e.readBigUInt64LE(40));
    if (!Number.isSafeInteger(last) || last < first || (last + 1) * sectorSize > diskSize) continue;
    out.push({ number: i + 1, start: first * sectorSize, length: (last - first + 1) * sectorSize, type: guidText(typeGuid) });
  }
  return out;
}

/** GPT GUIDs store their first three fields little-endian. */
function guidText(b: Buffer): string {
  const hex = (buf: Buffer) => buf.toString('hex');
  const le = (from: number, to: number) => hex(Buffer.from(b.subarray(from, to)).reverse());
  return `${le(0, 4)}-${le(4, 6)}-${le(6, 8)}-${hex(b.subarray(8, 10))}-${hex(b.subarray(10, 16))}`;
}
