import { open, type FileHandle } from 'node:fs/promises';
import { CorruptImageError, UnsupportedFeatureError, safeNumber } from '../../../errors.js';
import type { Extent, ExtentKind, FileReference, FormatDetails, ImageLayer } from '../../disk.js';
import type { CheckReport, OpenContext } from '../../format.js';
import { readFully } from '../../output-file.js';
import {
  HEADER_OFFSETS,
  HEADER_SECTION_SIZE,
  HEADER_SIZE,
  FILE_SIGNATURE,
  METADATA_TABLE_SIZE,
  MiB,
  PARENT_LOCATOR_VHDX,
  PayloadState,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  SB_BLOCK_PRESENT,
  SECTOR_BITMAP_BLOCK_SIZE,
  batGeometry,
  bitmapEntryIndex,
  checkRegionTable,
  currentHeader,
  decodeEntry,
  guidText,
  overlaps,
  parseDiskParameters,
  parseMetadataTable,
  parseRegionTable,
  payloadEntryIndex,
  signatureAt,
  type BatGeometry,
  type DiskParameters,
  type NamedRegion,
  type Region,
} from './layout.js';
import { replayLog, type FileOverlay } from './log.js';

/** BAT pages are read on demand: a 64 TiB disk of 1 MiB blocks has a 512 MiB BAT. */
const BAT_PAGE_BYTES = MiB;
const BAT_PAGE_ENTRIES = BAT_PAGE_BYTES / 8;
const BAT_CACHE_PAGES = 16;
/** Sector bitmaps of partially present blocks kept in memory (differencing images). */
const BITMAP_CACHE_ENTRIES = 256;

interface BlockInfo {
  state: number;
  /** File offset of the payload block, for present blocks. */
  host: number;
}

/** The image file as the replayed log defines it: reads past the end are zeroes, the overlay on top. */
class ImageFile {
  constructor(
    readonly handle: FileHandle,
    readonly overlay: FileOverlay | undefined,
    readonly size: number,
  ) {}

  async read(position: number, length: number, into: Buffer = Buffer.allocUnsafe(length), at = 0): Promise<Buffer> {
    const got = await readFully(this.handle, into, at, length, position);
    if (got < length) into.fill(0, at + got, at + length);
    this.overlay?.apply(into.subarray(at, at + length), position);
    return into;
  }

  /** Whether the file range can be read directly, with nothing from the log over it. */
  isPlain(position: number, length: number): boolean {
    return !this.overlay?.intersects(position, length);
  }
}

export class VhdxLayer implements ImageLayer {
  readonly format = 'vhdx';
  readonly virtualSize: number;
  private readonly blockSize: number;
  private readonly sectorSize: number;
  private readonly batPages = new Map<number, Buffer>();
  private readonly batLoading = new Map<number, Promise<Buffer>>();
  private readonly bitmaps = new Map<number, Promise<Buffer>>();

  private constructor(
    readonly path: string,
    private readonly file: ImageFile,
    private readonly params: DiskParameters,
    private readonly geo: BatGeometry,
    private readonly bat: Region,
    readonly backing: FileReference | undefined,
  ) {
    this.virtualSize = params.virtualSize;
    this.blockSize = params.blockSize;
    this.sectorSize = params.logicalSectorSize;
  }

  static async open(path: string, ctx: OpenContext): Promise<VhdxLayer> {
    const handle = await open(path, 'r');
    try {
      return await VhdxLayer.parse(path, handle, ctx);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /**
   * qemu-img check: the structures must parse, as for open; BAT entries QEMU would refuse at open are
   * reported one by one instead.
   */
  static async check(path: string): Promise<CheckReport> {
    const handle = await open(path, 'r');
    try {
      const corruptions: string[] = [];
      await VhdxLayer.parse(path, handle, undefined, corruptions);
      return { corruptions, leaks: [], leakedClusters: 0 };
    } finally {
      await handle.close();
    }
  }

  /** `ctx` is given when the image is opened for reading: a differencing image's parent is then verified. */
  private static async parse(path: string, handle: FileHandle, ctx?: OpenContext, batProblems?: string[]): Promise<VhdxLayer> {
    const corrupt = (msg: string, field: string) => new CorruptImageError(msg, { file: path, field });
    const { size } = await handle.stat();
    if (size < HEADER_SECTION_SIZE) throw corrupt(`file is ${size} bytes, shorter than the 1 MiB VHDX header section`, 'header');
    const head = Buffer.alloc(HEADER_SECTION_SIZE);
    await readFully(handle, head, 0, head.length, 0);
    if (signatureAt(head, 0, 8) !== FILE_SIGNATURE) throw corrupt('not a VHDX image (no "vhdxfile" identifier)', 'signature');
    const header = currentHeader(HEADER_OFFSETS.map((o) => head.subarray(o, o + HEADER_SIZE)), path);
    // Everything past the headers is read as the log leaves it.
    const overlay = await replayLog(handle, size, header, path);
    const file = new ImageFile(handle, overlay, overlay?.size ?? size);

    const tables = await Promise.all(REGION_TABLE_OFFSETS.map((o) => file.read(o, REGION_TABLE_SIZE)));
    const problems = tables.map(checkRegionTable);
    // QEMU reads only the first copy; the second exists for redundancy, so a damaged first one is replaced by it.
    const tableIndex = problems.findIndex((p) => p === undefined);
    if (tableIndex < 0) throw corrupt(`both region tables are damaged (${problems.map((p, i) => `table ${i + 1}: ${p}`).join(', ')})`, 'region_table');
    const log: Region = { offset: safeNumber(header.logOffset, path, 'log_offset'), length: header.logLength };
    const regions = parseRegionTable(tables[tableIndex], log, file.size, path);

    if (regions.metadata.length < METADATA_TABLE_SIZE) {
      throw corrupt(`metadata region of ${regions.metadata.length} bytes cannot hold the 64 KiB metadata table`, 'region_entry');
    }
    const items = parseMetadataTable(await file.read(regions.metadata.offset, METADATA_TABLE_SIZE), regions.metadata, path);
    const item = (i: { offset: number; length: number }) => file.read(i.offset, i.length);
    const params = parseDiskParameters(
      await item(items.fileParameters),
      await item(items.virtualDiskSize),
      await item(items.logicalSectorSize),
      path,
    );
    let backing: FileReference | undefined;
    if (params.hasParent) {
      if (!items.parentLocator) throw corrupt('has_parent is set but the metadata has no parent locator', 'parent_locator');
      const locator = parseParentLocator(await item(items.parentLocator), path);
      if (ctx) await verifyParent(path, ctx, locator);
      backing = locator.parent;
    }
    const geo = batGeometry(params.virtualSize, params.blockSize, params.logicalSectorSize, params.hasParent);
    if (geo.entries * 8 > regions.bat.length) {
      throw corrupt(
        `BAT region of ${regions.bat.length} bytes is too small for virtual size ${params.virtualSize} (needs ${geo.entries} entries)`,
        'bat_length',
      );
    }
    const layer = new VhdxLayer(path, file, params, geo, regions.bat, backing);
    await layer.checkBat(regions.occupied, batProblems);
    return layer;
  }

  get dataFd(): number {
    return this.file.handle.fd;
  }

  details(): FormatDetails {
    // qemu-img reports the block size as the cluster size, and nothing format-specific for VHDX.
    return { clusterSize: this.blockSize };
  }

  /**
   * Checks every BAT entry once at open, as QEMU does, streaming the table page by page: present blocks
   * must lie inside the file, past the header section and clear of the log and regions; states must be
   * ones the image type allows. With `problems` (check), each bad entry is reported there instead of
   * refusing the image.
   */
  private async checkBat(occupied: NamedRegion[], problems?: string[]): Promise<void> {
    const problem = (index: number, why: string) => {
      const err = new CorruptImageError(`BAT entry ${index}: ${why}`, { file: this.path, field: 'bat_entry' });
      if (!problems) throw err;
      problems.push(err.message);
    };
    const { entries, chunkRatio, payloadBlocks } = this.geo;
    const hasParent = this.params.hasParent;
    const checkPlacement = (index: number, host: number, length: number) => {
      if (host < HEADER_SECTION_SIZE) return problem(index, `block offset ${host} lies inside the header section`);
      if (host >= this.file.size) return problem(index, `block offset ${host} points past the end of the file (${this.file.size} bytes)`);
      if (host + length > this.file.size) return problem(index, `block at ${host} ends past the end of the file (${this.file.size} bytes)`);
      const clash = occupied.find((r) => overlaps(r, { offset: host, length }));
      if (clash) problem(index, `block at ${host} overlaps ${clash.what}`);
    };
    let partialInChunk = -1;
    for (let first = 0; first < entries; first += BAT_PAGE_ENTRIES) {
      const count = Math.min(BAT_PAGE_ENTRIES, entries - first);
      const page = await this.file.read(this.bat.offset + first * 8, count * 8);
      for (let k = 0; k < count; k++) {
        const index = first + k;
        const { state, offset } = decodeEntry(page.readUInt32LE(k * 8), page.readUInt32LE(k * 8 + 4));
        if (index % (chunkRatio + 1) === chunkRatio) {
          // Sector bitmap entries matter only to differencing images; QEMU ignores them elsewhere.
          if (!hasParent) continue;
          if (state === SB_BLOCK_PRESENT) checkPlacement(index, offset, SECTOR_BITMAP_BLOCK_SIZE);
          else if (state !== 0) problem(index, `invalid sector bitmap state ${state}`);
          else if (partialInChunk >= 0) problem(partialInChunk, 'partially present block without a sector bitmap');
          partialInChunk = -1;
          continue;
        }
        const block = index - Math.floor(index / (chunkRatio + 1));
        if (block >= payloadBlocks) continue;
        const length = Math.min(this.blockSize, this.virtualSize - block * this.blockSize);
        switch (state) {
          case PayloadState.NotPresent:
          case PayloadState.Undefined:
          case PayloadState.Zero:
          case PayloadState.Unmapped:
          case PayloadState.UnmappedV095:
            break;
          case PayloadState.PartiallyPresent:
            if (!hasParent) {
              problem(index, 'block is partially present in an image without a parent');
              break;
            }
            if (partialInChunk < 0) partialInChunk = index;
            checkPlacement(index, offset, length);
            break;
          case PayloadState.FullyPresent:
            checkPlacement(index, offset, length);
            break;
          default:
            problem(index, `invalid payload block state ${state}`);
        }
      }
    }
    if (partialInChunk >= 0) problem(partialInChunk, 'partially present block without a sector bitmap');
  }

  private async batPage(page: number): Promise<Buffer> {
    const cached = this.batPages.get(page);
    if (cached) return cached;
    let loading = this.batLoading.get(page);
    if (!loading) {
      const first = page * BAT_PAGE_ENTRIES;
      const count = Math.min(BAT_PAGE_ENTRIES, this.geo.entries - first);
      loading = this.file.read(this.bat.offset + first * 8, count * 8).then((buf) => {
        this.batLoading.delete(page);
        this.batPages.set(page, buf);
        if (this.batPages.size > BAT_CACHE_PAGES) this.batPages.delete(this.batPages.keys().next().value as number);
        return buf;
      });
      this.batLoading.set(page, loading);
    }
    return loading;
  }

  /** The entry if its page is in memory: lets long scans of cached pages run without awaiting per block. */
  private entryNow(index: number): BlockInfo | undefined {
    const page = this.batPages.get(Math.floor(index / BAT_PAGE_ENTRIES));
    return page && decodeAt(page, index % BAT_PAGE_ENTRIES);
  }

  private async entry(index: number): Promise<BlockInfo> {
    return this.entryNow(index) ?? decodeAt(await this.batPage(Math.floor(index / BAT_PAGE_ENTRIES)), index % BAT_PAGE_ENTRIES);
  }

  private blockNow(block: number): BlockInfo | undefined {
    return this.entryNow(payloadEntryIndex(this.geo, block));
  }

  private block(block: number): Promise<BlockInfo> {
    return this.entry(payloadEntryIndex(this.geo, block));
  }

  /** The bits of a partially present block's sectors: 1 = stored here, 0 = read from the parent. */
  private sectorBitmap(block: number): Promise<Buffer> {
    let bitmap = this.bitmaps.get(block);
    if (!bitmap) {
      bitmap = (async () => {
        const sb = await this.entry(bitmapEntryIndex(this.geo, block));
        if (sb.state !== SB_BLOCK_PRESENT) {
          throw new CorruptImageError(`block ${block} is partially present but its sector bitmap is not`, { file: this.path, field: 'bat_entry' });
        }
        const bytesPerBlock = this.blockSize / this.sectorSize / 8;
        return this.file.read(sb.host + (block % this.geo.chunkRatio) * bytesPerBlock, bytesPerBlock);
      })();
      this.bitmaps.set(block, bitmap);
      if (this.bitmaps.size > BITMAP_CACHE_ENTRIES) this.bitmaps.delete(this.bitmaps.keys().next().value as number);
    }
    return bitmap;
  }

  /** What a block state means for reads: stored data, zeroes, or (differencing) the parent's data. */
  private kindOf(state: number): ExtentKind {
    switch (state) {
      case PayloadState.FullyPresent:
        return 'data';
      case PayloadState.Zero:
        return 'zero';
      case PayloadState.NotPresent:
        return 'unallocated';
      default:
        // UNDEFINED and UNMAPPED read as zeroes (QEMU's choice, which the specification allows); in a
        // differencing image that must hide the parent, so it is 'zero' there rather than 'unallocated'.
        return this.params.hasParent ? 'zero' : 'unallocated';
    }
  }

  async *blockStatus(offset: number, length: number): AsyncIterable<Extent> {
    const end = offset + length;
    const bs = this.blockSize;
    let pending: Extent | undefined;
    const add = (next: Extent): Extent | undefined => {
      if (pending && canMerge(pending, next)) {
        pending.length += next.length;
        return undefined;
      }
      const emit = pending;
      pending = next;
      return emit;
    };
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / bs);
      const blockStart = block * bs;
      const stop = Math.min(end, blockStart + bs);
      const info = this.blockNow(block) ?? (await this.block(block));
      if (info.state === PayloadState.PartiallyPresent) {
        const bitmap = await this.sectorBitmap(block);
        for (const run of sectorRuns(bitmap, this.sectorSize, pos - blockStart, stop - blockStart)) {
          const emit = add(this.extent(blockStart + run.from, run.to - run.from, run.present ? 'data' : 'unallocated', info.host + run.from));
          if (emit) yield emit;
        }
      } else {
        const emit = add(this.extent(pos, stop - pos, this.kindOf(info.state), info.host + (pos - blockStart)));
        if (emit) yield emit;
      }
      pos = stop;
    }
    if (pending) yield pending;
  }

  private extent(offset: number, length: number, kind: ExtentKind, host: number): Extent {
    const ext: Extent = { offset, length, kind, depth: 0 };
    // Data the log rewrote must come through readAllocated, never straight from the file.
    if (kind === 'data' && this.file.isPlain(host, length)) ext.hostOffset = host;
    return ext;
  }

  async readAllocated(offset: number, length: number, into: Buffer, intoOffset: number): Promise<void> {
    const bs = this.blockSize;
    const end = offset + length;
    const reads: Array<Promise<unknown>> = [];
    let run: { host: number; at: number; len: number } | undefined;
    const flush = () => {
      if (run) reads.push(this.file.read(run.host, run.len, into, run.at));
      run = undefined;
    };
    const stored = (host: number, at: number, len: number) => {
      if (run && run.host + run.len === host && run.at + run.len === at) run.len += len;
      else {
        flush();
        run = { host, at, len };
      }
    };
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / bs);
      const blockStart = block * bs;
      const stop = Math.min(end, blockStart + bs);
      const at = intoOffset + (pos - offset);
      const info = this.blockNow(block) ?? (await this.block(block));
      if (info.state === PayloadState.FullyPresent) stored(info.host + (pos - blockStart), at, stop - pos);
      else if (info.state === PayloadState.PartiallyPresent) {
        const bitmap = await this.sectorBitmap(block);
        for (const r of sectorRuns(bitmap, this.sectorSize, pos - blockStart, stop - blockStart)) {
          const runAt = at + (blockStart + r.from - pos);
          if (r.present) stored(info.host + r.from, runAt, r.to - r.from);
          else into.fill(0, runAt, runAt + (r.to - r.from));
        }
      } else into.fill(0, at, at + (stop - pos));
      pos = stop;
    }
    flush();
    await Promise.all(reads);
  }

  async close(): Promise<void> {
    await this.file.handle.close();
  }
}

/** Runs of present / absent sectors within [from, to) of a block, as byte offsets in the block. */
function* sectorRuns(bitmap: Buffer, sectorSize: number, from: number, to: number): Iterable<{ from: number; to: number; present: boolean }> {
  const bit = (byte: number) => {
    const sector = Math.floor(byte / sectorSize);
    return (bitmap[sector >> 3] >> (sector & 7)) & 1;
  };
  let pos = from;
  while (pos < to) {
    const present = bit(pos);
    let next = (Math.floor(pos / sectorSize) + 1) * sectorSize;
    while (next < to && bit(next) === present) next += sectorSize;
    next = Math.min(next, to);
    yield { from: pos, to: next, present: present === 1 };
    pos = next;
  }
}

function decodeAt(page: Buffer, slot: number): BlockInfo {
  const { state, offset } = decodeEntry(page.readUInt32LE(slot * 8), page.readUInt32LE(slot * 8 + 4));
  return { state, host: offset };
}

function canMerge(a: Extent, b: Extent): boolean {
  if (a.kind !== b.kind || a.offset + a.length !== b.offset) return false;
  if (a.hostOffset === undefined || b.hostOffset === undefined) return a.hostOffset === b.hostOffset;
  return a.hostOffset + a.length === b.hostOffset;
}

interface ParentLocator {
  parent: FileReference;
  /** The DataWriteGuid values (lower case, no braces) the parent may have. */
  linkage: string[];
}

/**
 * The parent of a differencing image, from the VHDX parent locator's relative_path. Windows absolute and
 * volume paths cannot name a file here; the chain resolves the relative path inside the image's folder.
 */
function parseParentLocator(item: Buffer, file: string): ParentLocator {
  const corrupt = (msg: string) => new CorruptImageError(msg, { file, field: 'parent_locator' });
  const type = item.subarray(0, 16);
  if (!type.equals(PARENT_LOCATOR_VHDX)) {
    throw new UnsupportedFeatureError(`parent locator type {${guidText(type)}} is not supported (only VHDX parents)`, { file, field: 'parent_locator' });
  }
  const count = item.readUInt16LE(18);
  if (20 + count * 12 > item.length) throw corrupt(`parent locator with ${count} entries does not fit its ${item.length}-byte item`);
  const entries = new Map<string, string>();
  const text = (offset: number, length: number, what: string) => {
    if (offset === 0 || length === 0 || length % 2 !== 0 || offset + length > item.length) {
      throw corrupt(`parent locator ${what} (${length} bytes at ${offset}) is malformed or outside the item`);
    }
    return item.toString('utf16le', offset, offset + length);
  };
  for (let i = 0; i < count; i++) {
    const at = 20 + i * 12;
    const key = text(item.readUInt32LE(at), item.readUInt16LE(at + 8), `key ${i}`);
    const value = text(item.readUInt32LE(at + 4), item.readUInt16LE(at + 10), `value ${i}`);
    if (entries.has(key)) throw corrupt(`parent locator lists '${key}' twice`);
    entries.set(key, value);
  }
  const linkage = ['parent_linkage', 'parent_linkage2'].flatMap((k) => {
    const v = entries.get(k);
    return v === undefined ? [] : [v.replace(/^\{|\}$/g, '').toLowerCase()];
  });
  if (!entries.has('parent_linkage')) throw corrupt('parent locator has no parent_linkage');
  const relative = entries.get('relative_path');
  if (!relative) {
    throw new UnsupportedFeatureError(
      `parent locator has no relative_path (keys: ${[...entries.keys()].join(', ')}); Ferry finds parents by relative path only`,
      { file, field: 'parent_locator' },
    );
  }
  return { parent: { name: relative.replace(/\\/g, '/'), format: 'vhdx' }, linkage };
}

/**
 * The specification requires the parent's DataWriteGuid to match the child's parent_linkage: otherwise the
 * parent changed after the child was made, and the chain would read as neither disk. A parent that cannot be
 * resolved is left to the chain, which reports it when (and only when) the parent is needed.
 */
async function verifyParent(path: string, ctx: OpenContext, locator: ParentLocator): Promise<void> {
  let parentPath: string;
  try {
    parentPath = await ctx.resolve(path, locator.parent.name, 'backing file');
  } catch {
    return;
  }
  const handle = await open(parentPath, 'r');
  try {
    const head = Buffer.alloc(REGION_TABLE_OFFSETS[0]);
    await readFully(handle, head, 0, head.length, 0);
    if (signatureAt(head, 0, 8) !== FILE_SIGNATURE) {
      throw new CorruptImageError(`parent ${parentPath} is not a VHDX image`, { file: path, field: 'parent_locator' });
    }
    const parentHeader = currentHeader(HEADER_OFFSETS.map((o) => head.subarray(o, o + HEADER_SIZE)), parentPath);
    const actual = guidText(parentHeader.dataWriteGuid);
    if (!locator.linkage.includes(actual)) {
      throw new CorruptImageError(
        `parent ${parentPath} has DataWriteGuid {${actual}}, not the {${locator.linkage.join('} or {')}} this image was made from: the parent changed`,
        { file: path, field: 'parent_linkage' },
      );
    }
  } finally {
    await handle.close();
  }
}
