import { open, stat, type FileHandle } from 'node:fs/promises';
import { CorruptImageError, UnsupportedFeatureError } from '../../../errors.js';
import { fileRuns } from '../../sparse-file.js';
import type { Extent, FileReference, FormatDetails, ImageLayer } from '../../disk.js';
import type { OpenContext } from '../../format.js';
import { readFully } from '../../output-file.js';
import { MAX_DESCRIPTOR_BYTES, parseDescriptor, type Descriptor, type ExtentLine } from './descriptor.js';
import {
  COWD_MAGIC,
  MAX_GD_BYTES,
  SECTOR,
  SPARSE_MAGIC,
  cowdGeometry,
  readFooter,
  readSparseHeader,
  sparseGeometry,
  type SparseGeometry,
  type SparseHeader,
} from './layout.js';
import { GrainTableCache, SparseExtent } from './sparse.js';

/** createType values of descriptor files QEMU opens; the sparse ones name their type in the header instead. */
const DESCRIPTOR_TYPES = new Set(['monolithicFlat', 'vmfs', 'vmfsSparse', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']);
/** One extent of the disk, addressed relative to its own start. */
interface LayerExtent {
  readonly length: number;
  status(offset: number, length: number): AsyncIterable<Extent>;
  read(offset: number, length: number, into: Buffer, at: number): Promise<void>;
  info(): Record<string, unknown>;
  /** Grain size and compression, for sparse extents. */
  readonly sparse?: SparseGeometry;
}

/** FLAT and VMFS extents: the disk's bytes stored plainly at an offset of a file. */
class FlatExtent implements LayerExtent {
  constructor(
    readonly length: number,
    private readonly path: string,
    private readonly handle: FileHandle,
    private readonly dataOffset: number,
    private readonly type: string,
  ) {}

  /** Holes in the extent file read as zeroes: found with SEEK_DATA/SEEK_HOLE, as QEMU recurses into the file. */
  async *status(offset: number, length: number): AsyncIterable<Extent> {
    const base = this.dataOffset;
    const end = base + offset + length;
    let pos = base + offset;
    const at = (hostPos: number, hostEnd: number, kind: 'data' | 'zero'): Extent => ({
      offset: hostPos - base,
      length: hostEnd - hostPos,
      kind,
      depth: 0,
      hostOffset: hostPos,
      hostFd: this.handle.fd,
      hostFile: this.path,
    });
    for (const run of fileRuns(this.handle.fd, pos, end)) yield at(run.start, run.end, run.data ? 'data' : 'zero');
  }

  async read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    const got = await readFully(this.handle, into, at, length, this.dataOffset + offset);
    if (got < length) into.fill(0, at + got, at + length);
  }

  info(): Record<string, unknown> {
    return { 'virtual-size': this.length, filename: this.path, format: this.type };
  }
}

/** ZERO extents: no file, reads as zeroes (VMware's spec; QEMU skips these lines). */
class ZeroExtent implements LayerExtent {
  constructor(readonly length: number) {}

  async *status(offset: number, length: number): AsyncIterable<Extent> {
    yield { offset, length, kind: 'zero', depth: 0 };
  }

  async read(_offset: number, length: number, into: Buffer, at: number): Promise<void> {
    into.fill(0, at, at + length);
  }

  info(): Record<string, unknown> {
    return { 'virtual-size': this.length, format: 'ZERO' };
  }
}

/** SPARSE and VMFSSPARSE extents, and the single extent of a monolithic sparse or stream-optimized file. */
class SparseLayerExtent implements LayerExtent {
  constructor(
    private readonly extent: SparseExtent,
    /** The extent's file when it is not the image file itself. */
    private readonly host: { fd: number; file: string } | undefined,
    private readonly type: string,
  ) {}

  get length(): number {
    return this.extent.length;
  }

  get sparse(): SparseGeometry {
    return this.extent.geometry;
  }

  async *status(offset: number, length: number): AsyncIterable<Extent> {
    for await (const ext of this.extent.status(offset, length)) {
      if (this.host && ext.hostOffset !== undefined) {
        ext.hostFd = this.host.fd;
        ext.hostFile = this.host.file;
      }
      yield ext;
    }
  }

  read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    return this.extent.read(offset, length, into, at);
  }

  info(): Record<string, unknown> {
    const g = this.extent.geometry;
    const out: Record<string, unknown> = {};
    if (g.compressed) out.compressed = true;
    out['virtual-size'] = g.capacity;
    out.filename = this.extent.path;
    out['cluster-size'] = g.grainSize;
    out.format = this.type;
    return out;
  }
}

interface PlacedExtent {
  start: number;
  extent: LayerExtent;
}

interface DescriptorFacts {
  cid?: number;
  parentCid?: number;
  createType: string;
  parentFileNameHint?: string;
}

interface OpenedFile {
  handle: FileHandle;
  size: number;
  regular: boolean;
}

/** The files of one image, each opened once however many extents name it, and closed together. */
class FileSet {
  private readonly files = new Map<string, Promise<OpenedFile>>();

  /** Opens `path`, named by the image `referrer` (itself, or a descriptor naming an extent). */
  open(path: string, referrer = path): Promise<OpenedFile> {
    let file = this.files.get(path);
    if (!file) {
      file = (async () => {
        // Opening a FIFO would block for ever: only files and block devices hold disk data.
        const kind = await stat(path);
        if (!kind.isFile() && !kind.isBlockDevice()) {
          const what = referrer === path ? 'not a regular file or block device' : `extent ${path} is not a regular file or block device`;
          throw new UnsupportedFeatureError(what, { file: referrer, field: 'extent' });
        }
        const handle = await open(path, 'r');
        const st = await handle.stat().catch(async (err) => {
          await handle.close();
          throw err;
        });
        return { handle, size: st.size, regular: st.isFile() };
      })();
      this.files.set(path, file);
    }
    return file;
  }

  async closeAll(): Promise<void> {
    const opened = await Promise.allSettled(this.files.values());
    this.files.clear();
    await Promise.all(opened.map((o) => (o.status === 'fulfilled' ? o.value.handle.close().catch(() => undefined) : undefined)));
  }
}

/**
 * A VMDK image: a sparse file with its descriptor embedded (monolithicSparse, streamOptimized), or a text
 * descriptor naming extent files (monolithicFlat, twoGbMaxExtent*, vmfs*). Extent files and the parent are
 * found only through the open context, which confines them to the image's folder.
 */
export class VmdkLayer implements ImageLayer {
  readonly format = 'vmdk';
  readonly virtualSize: number;
  readonly backing?: FileReference;

  private constructor(
    readonly path: string,
    private readonly extents: PlacedExtent[],
    private readonly facts: DescriptorFacts,
    private readonly files: FileSet,
    readonly dataFd: number | undefined,
  ) {
    const last = extents[extents.length - 1];
    this.virtualSize = last ? last.start + last.extent.length : 0;
    if (facts.parentFileNameHint) this.backing = { name: facts.parentFileNameHint, format: 'vmdk' };
  }

  static async open(path: string, ctx: OpenContext): Promise<VmdkLayer> {
    const files = new FileSet();
    try {
      const { handle, size } = await files.open(path);
      // QEMU's own lower bound: anything shorter cannot even hold the magic.
      if (size < 4) throw new CorruptImageError(`file of ${size} bytes is too small to be a VMDK image`, { file: path, field: 'header' });
      const head = Buffer.alloc(Math.min(size, SECTOR));
      await readFully(handle, head, 0, head.length, 0);
      const magic = head.readUInt32BE(0);
      const cache = new GrainTableCache();
      // A descriptor holds no data: every extent names its own file.
      const fromDescriptor = async (text: string) => {
        const { extents, facts } = await openDescriptor(path, parseDescriptor(text, path), ctx, files, cache);
        await checkParentCid(path, facts, ctx);
        return new VmdkLayer(path, extents, facts, files, undefined);
      };
      if (magic !== SPARSE_MAGIC && magic !== COWD_MAGIC) {
        if (size > MAX_DESCRIPTOR_BYTES) {
          throw new CorruptImageError(`descriptor file of ${size} bytes exceeds the ${MAX_DESCRIPTOR_BYTES}-byte limit`, { file: path, field: 'descriptor' });
        }
        return await fromDescriptor(await readDescriptorText(handle, 0, size));
      }
      const geometry = magic === COWD_MAGIC ? cowdGeometry(head, size, path) : await sparseHeaderGeometry(handle, head, size, path);
      // A sparse file whose header only points at a full descriptor (capacity 0): the descriptor rules.
      if ('embeddedDescriptor' in geometry) return await fromDescriptor(await embeddedDescriptorText(handle, geometry.embeddedDescriptor, size, path));
      const sparse = await SparseExtent.open(path, handle, size, geometry, cache, 0);
      let desc: Descriptor = { extents: [] };
      if (geometry.descriptor) desc = parseDescriptor(await embeddedDescriptorText(handle, geometry.descriptor, size, path), path);
      const facts: DescriptorFacts = {
        cid: desc.cid,
        parentCid: desc.parentCid,
        // QEMU names the type of KDMV files by their compression and leaves it empty for COWD ones.
        createType: magic === COWD_MAGIC ? '' : geometry.compressed ? 'streamOptimized' : 'monolithicSparse',
        parentFileNameHint: desc.parentFileNameHint,
      };
      await checkParentCid(path, facts, ctx);
      return new VmdkLayer(path, [{ start: 0, extent: new SparseLayerExtent(sparse, undefined, '') }], facts, files, handle.fd);
    } catch (err) {
      await files.closeAll();
      throw err;
    }
  }

  async *blockStatus(offset: number, length: number): AsyncIterable<Extent> {
    let pending: Extent | undefined;
    for (const { start, extent, from, to } of this.overlapping(offset, length)) {
      for await (const ext of extent.status(from, to - from)) {
        const shifted: Extent = { ...ext, offset: ext.offset + start };
        if (pending && mergeable(pending, shifted)) pending.length += shifted.length;
        else {
          if (pending) yield pending;
          pending = shifted;
        }
      }
    }
    if (pending) yield pending;
  }

  async readAllocated(offset: number, length: number, into: Buffer, intoOffset: number): Promise<void> {
    const reads: Array<Promise<void>> = [];
    for (const { start, extent, from, to } of this.overlapping(offset, length)) {
      reads.push(extent.read(from, to - from, into, intoOffset + (start + from - offset)));
    }
    await Promise.all(reads);
  }

  /** The extents meeting [offset, offset+length), with the part of each that is wanted. */
  private *overlapping(offset: number, length: number): Iterable<PlacedExtent & { from: number; to: number }> {
    const end = offset + length;
    let lo = 0;
    let hi = this.extents.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.extents[mid].start <= offset) lo = mid;
      else hi = mid - 1;
    }
    for (let i = lo; i < this.extents.length && this.extents[i].start < end; i++) {
      const { start, extent } = this.extents[i];
      const from = Math.max(offset, start) - start;
      const to = Math.min(end, start + extent.length) - start;
      if (to > from) yield { start, extent, from, to };
    }
  }

  details(): FormatDetails {
    const data: Record<string, unknown> = {};
    if (this.facts.cid !== undefined) data.cid = this.facts.cid;
    if (this.facts.parentCid !== undefined) data['parent-cid'] = this.facts.parentCid;
    data['create-type'] = this.facts.createType;
    data.extents = this.extents.map((e) => e.extent.info());
    return { clusterSize: this.commonGrainSize(), specific: { type: 'vmdk', data } };
  }

  /** Like QEMU: a cluster size only when every extent is sparse with the same grain size and compression. */
  private commonGrainSize(): number | undefined {
    const withData = this.extents.map((e) => e.extent).filter((e) => !(e instanceof ZeroExtent));
    const first = withData[0]?.sparse;
    if (!first) return undefined;
    const same = withData.every((e) => e.sparse && e.sparse.grainSize === first.grainSize && e.sparse.compressed === first.compressed);
    return same ? first.grainSize : undefined;
  }

  async close(): Promise<void> {
    await this.files.closeAll();
  }
}

/**
 * QEMU refuses to read through a parent whose CID differs from the parentCID the child recorded: the parent
 * changed after the child was made, so the two no longer form the disk they did.
 */
async function checkParentCid(path: string, facts: DescriptorFacts, ctx: OpenContext): Promise<void> {
  if (!facts.parentFileNameHint || facts.parentCid === undefined) return;
  // A parent that cannot be resolved is reported by the chain, which resolves it again.
  const parentPath = await ctx.resolve(path, facts.parentFileNameHint, 'backing file').catch(() => undefined);
  if (!parentPath) return;
  const cid = await readCid(parentPath);
  if (cid !== undefined && cid !== facts.parentCid) {
    const mismatch = `parentCID ${facts.parentCid.toString(16)} does not match CID ${cid.toString(16)} of parent ${facts.parentFileNameHint}`;
    throw new CorruptImageError(`${mismatch}: the parent changed after this image was created`, { file: path, field: 'parentCID' });
  }
}

/** The CID in a VMDK's descriptor, embedded or standalone, without opening its extents. */
async function readCid(path: string): Promise<number | undefined> {
  const kind = await stat(path);
  // Not a disk (a FIFO would block the open): the chain refuses it when it opens the parent.
  if (!kind.isFile() && !kind.isBlockDevice()) return undefined;
  const handle = await open(path, 'r');
  try {
    const { size } = await handle.stat();
    const head = Buffer.alloc(Math.min(size, SECTOR));
    await readFully(handle, head, 0, head.length, 0);
    if (head.length >= 4 && head.readUInt32BE(0) === COWD_MAGIC) return undefined;
    if (head.length >= 4 && head.readUInt32BE(0) === SPARSE_MAGIC) {
      const { header } = readSparseHeader(head, path);
      if (!header.descriptorOffset || !header.descriptorSectors) return undefined;
      const area = { offset: header.descriptorOffset * SECTOR, length: header.descriptorSectors * SECTOR };
      return parseDescriptor(await embeddedDescriptorText(handle, area, size, path), path).cid;
    }
    return size <= MAX_DESCRIPTOR_BYTES ? parseDescriptor(await readDescriptorText(handle, 0, size), path).cid : undefined;
  } finally {
    await handle.close();
  }
}

/** Reads the KDMV header, or the footer when the header defers to it; capacity 0 marks a descriptor-only file. */
async function sparseHeaderGeometry(
  handle: FileHandle,
  head: Buffer,
  size: number,
  path: string,
): Promise<SparseGeometry | { embeddedDescriptor: { offset: number; length: number } }> {
  let { header, gdAtEnd } = readSparseHeader(head, path);
  if (header.capacity === 0 && header.descriptorOffset !== 0) {
    return { embeddedDescriptor: { offset: header.descriptorOffset * SECTOR, length: header.descriptorSectors * SECTOR } };
  }
  if (gdAtEnd) header = await footerHeader(handle, size, path);
  return sparseGeometry(header, size, path);
}

async function footerHeader(handle: FileHandle, size: number, path: string): Promise<SparseHeader> {
  const area = Buffer.alloc(3 * SECTOR);
  const got = size >= area.length ? await readFully(handle, area, 0, area.length, size - area.length) : 0;
  return readFooter(area.subarray(0, got), size, path);
}

/** Descriptor text from [offset, offset+length): up to the first NUL, as C readers see it. */
async function readDescriptorText(handle: FileHandle, offset: number, length: number): Promise<string> {
  const buf = Buffer.alloc(length);
  const got = await readFully(handle, buf, 0, length, offset);
  const nul = buf.subarray(0, got).indexOf(0);
  return buf.toString('utf8', 0, nul >= 0 ? nul : got);
}

/** An embedded descriptor area is mostly padding: read it up to the 1 MiB limit and the end of the file. */
function embeddedDescriptorText(handle: FileHandle, area: { offset: number; length: number }, fileSize: number, path: string): Promise<string> {
  if (area.offset >= fileSize) throw new CorruptImageError(`descriptor at ${area.offset} lies past the end of the file`, { file: path, field: 'descriptorOffset' });
  return readDescriptorText(handle, area.offset, Math.min(area.length, MAX_DESCRIPTOR_BYTES, fileSize - area.offset));
}

/** Opens every extent a descriptor lists, in order, checking that their sizes add up. */
async function openDescriptor(
  path: string,
  desc: Descriptor,
  ctx: OpenContext,
  files: FileSet,
  cache: GrainTableCache,
): Promise<{ extents: PlacedExtent[]; facts: DescriptorFacts }> {
  const createType = desc.createType;
  if (!createType) throw new CorruptImageError('invalid VMDK descriptor: no createType', { file: path, field: 'createType' });
  if (!DESCRIPTOR_TYPES.has(createType)) {
    throw new UnsupportedFeatureError(`VMDK image type '${createType}' is not supported`, { file: path, field: 'createType' });
  }
  if (desc.extents.length === 0) throw new CorruptImageError('VMDK descriptor lists no extents', { file: path, field: 'extent' });
  const extents: PlacedExtent[] = [];
  let start = 0;
  let gdBudget = MAX_GD_BYTES;
  for (const line of desc.extents) {
    const extent = await openExtent(path, line, ctx, files, cache, extents.length, gdBudget);
    if (extent.sparse) gdBudget -= extent.sparse.gdEntries * 4;
    extents.push({ start, extent });
    start += extent.length;
    if (start > Number.MAX_SAFE_INTEGER) throw new CorruptImageError('extent sizes add up to more than 2^53 bytes', { file: path, field: 'extent' });
  }
  return {
    extents,
    facts: { cid: desc.cid, parentCid: desc.parentCid, createType, parentFileNameHint: desc.parentFileNameHint },
  };
}

async function openExtent(
  path: string,
  line: ExtentLine,
  ctx: OpenContext,
  files: FileSet,
  cache: GrainTableCache,
  index: number,
  gdBudget: number,
): Promise<LayerExtent> {
  const field = 'extent';
  const length = line.sectors * SECTOR;
  const where = `extent ${index + 1} (line ${line.line})`;
  if (line.access === 'NOACCESS') throw new UnsupportedFeatureError(`${where} is NOACCESS`, { file: path, field });
  if (line.type === 'ZERO') return new ZeroExtent(length);
  const isFlat = line.type === 'FLAT' || line.type === 'VMFS';
  if (!isFlat && line.type !== 'SPARSE' && line.type !== 'VMFSSPARSE') {
    throw new UnsupportedFeatureError(`${where}: extent type ${line.type} is not supported`, { file: path, field });
  }
  const extentPath = await ctx.resolve(path, line.file!, 'extent');
  const { handle, size, regular } = await files.open(extentPath, path);
  if (isFlat) {
    const dataOffset = line.offset * SECTOR;
    // A device's size is not in stat; for files a short extent means the descriptor and file disagree.
    if (regular && dataOffset + length > size) {
      throw new CorruptImageError(`${where}: ${line.type} extent needs ${dataOffset + length} bytes of ${extentPath}, which has ${size}`, {
        file: path,
        field,
      });
    }
    return new FlatExtent(length, extentPath, handle, dataOffset, line.type);
  }
  const head = Buffer.alloc(Math.min(size, SECTOR));
  await readFully(handle, head, 0, head.length, 0);
  const magic = head.length >= 4 ? head.readUInt32BE(0) : 0;
  if (magic !== SPARSE_MAGIC && magic !== COWD_MAGIC) {
    throw new CorruptImageError(`${where}: ${extentPath} is not a VMDK sparse extent (bad magic)`, { file: path, field });
  }
  const geometry = magic === COWD_MAGIC ? cowdGeometry(head, size, extentPath) : await sparseHeaderGeometry(handle, head, size, extentPath);
  if ('embeddedDescriptor' in geometry) {
    throw new CorruptImageError(`${where}: ${extentPath} has capacity 0 (a descriptor, not an extent)`, { file: path, field });
  }
  if (geometry.capacity !== length) {
    throw new CorruptImageError(`${where}: the descriptor gives ${line.sectors} sectors but ${extentPath} has a capacity of ${geometry.capacity / SECTOR}`, {
      file: path,
      field,
    });
  }
  if (geometry.gdEntries * 4 > gdBudget) {
    throw new CorruptImageError(`${where}: the grain directories of all extents exceed ${MAX_GD_BYTES} bytes`, { file: path, field });
  }
  // Cache keys: the extent index above the 32-bit sector number of a table.
  const sparse = await SparseExtent.open(extentPath, handle, size, geometry, cache, (index + 1) * 2 ** 32);
  return new SparseLayerExtent(sparse, { fd: handle.fd, file: extentPath }, line.type);
}

function mergeable(a: Extent, b: Extent): boolean {
  if (a.kind !== b.kind || a.offset + a.length !== b.offset || a.hostFd !== b.hostFd) return false;
  if (a.hostOffset === undefined || b.hostOffset === undefined) return a.hostOffset === b.hostOffset;
  return a.hostOffset + a.length === b.hostOffset;
}
