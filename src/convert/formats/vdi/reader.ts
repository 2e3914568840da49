import { open, type FileHandle } from 'node:fs/promises';
import { CorruptImageError } from '../../../errors.js';
import { fileRuns } from '../../sparse-file.js';
import type { Extent, FormatDetails, ImageLayer } from '../../disk.js';
import { readFully } from '../../output-file.js';
import { PAGE_ENTRIES, dataOffset, firstUnreadableEntry, readPage, unreadableReason } from './block-map.js';
import { BLOCK_DISCARDED, HEADER_BYTES, TYPE_STATIC, parseHeader, virtualSizeOf, type VdiHeader } from './layout.js';

/** Block map pages kept in memory: 32 x 256 KiB, enough to walk 2 TiB without rereading. */
const PAGE_CACHE_LIMIT = 32;
export class VdiLayer implements ImageLayer {
  readonly format = 'vdi';
  readonly virtualSize: number;
  private readonly pages = new Map<number, Uint32Array>();
  private readonly pagesLoading = new Map<number, Promise<Uint32Array>>();

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    private readonly fileSize: number,
    readonly header: VdiHeader,
  ) {
    this.virtualSize = virtualSizeOf(header);
  }

  static async open(path: string): Promise<VdiLayer> {
    const handle = await open(path, 'r');
    try {
      const { size } = await handle.stat();
      const head = Buffer.alloc(Math.min(size, HEADER_BYTES));
      await readFully(handle, head, 0, head.length, 0);
      return new VdiLayer(path, handle, size, parseHeader(head, size, path));
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  get dataFd(): number {
    return this.handle.fd;
  }

  /** qemu-img reports the block size as the cluster size and has nothing format-specific for VDI. */
  details(): FormatDetails {
    return { clusterSize: this.header.blockSize };
  }

  /**
   * Allocated blocks are data; unallocated and discarded blocks are zeroes that QEMU reports as present
   * (VDI has no backing file to fall through to). Static images are preallocated, so like QEMU the file's
   * own holes are asked for, and reported as zeroes.
   */
  async *blockStatus(offset: number, length: number): AsyncIterable<Extent> {
    const bs = this.header.blockSize;
    const end = offset + length;
    let pending: Extent | undefined;
    for (let pos = offset; pos < end; ) {
      const pageIndex = Math.floor(pos / bs / PAGE_ENTRIES);
      const page = await this.page(pageIndex);
      const pageStart = pageIndex * PAGE_ENTRIES;
      const pageEnd = Math.min(end, (pageStart + page.length) * bs);
      while (pos < pageEnd) {
        // One step per run of blocks that make one extent, not per block: a sparse map may hold 2^29 entries.
        const first = Math.floor(pos / bs) - pageStart;
        const entry = page[first];
        let last = first + 1;
        if (entry < BLOCK_DISCARDED) while (last < page.length && page[last] === entry + (last - first)) last++;
        else while (last < page.length && page[last] >= BLOCK_DISCARDED) last++;
        const stop = Math.min(pageEnd, (pageStart + last) * bs);
        const next: Extent =
          entry < BLOCK_DISCARDED
            ? { offset: pos, length: stop - pos, kind: 'data', depth: 0, hostOffset: dataOffset(this.header, entry) + (pos - (pageStart + first) * bs) }
            : { offset: pos, length: stop - pos, kind: 'zero', depth: 0 };
        if (pending && continues(pending, next)) pending.length += next.length;
        else {
          if (pending) yield* this.refine(pending);
          pending = next;
        }
        pos = stop;
      }
    }
    if (pending) yield* this.refine(pending);
  }

  /** Splits a static image's data extent at the holes of the file; other extents pass unchanged. */
  private *refine(ext: Extent): Iterable<Extent> {
    if (ext.kind !== 'data' || this.header.imageType !== TYPE_STATIC) {
      yield ext;
      return;
    }
    const hostStart = ext.hostOffset!;
    const hostEnd = hostStart + ext.length;
    const piece = (from: number, to: number, kind: Extent['kind']): Extent => ({
      offset: ext.offset + (from - hostStart),
      length: to - from,
      kind,
      depth: 0,
      hostOffset: from,
    });
    for (const run of fileRuns(this.handle.fd, hostStart, hostEnd)) yield piece(run.start, run.end, run.data ? 'data' : 'zero');
  }

  /** Reads contiguous runs of blocks with one read each, all runs in parallel. */
  async readAllocated(offset: number, length: number, into: Buffer, intoOffset: number): Promise<void> {
    const bs = this.header.blockSize;
    const end = offset + length;
    const reads: Array<Promise<void>> = [];
    let run: { host: number; at: number; len: number } | undefined;
    const flush = () => {
      if (run) reads.push(this.readHost(run.host, run.len, into, run.at));
      run = undefined;
    };
    let page: Uint32Array = new Uint32Array(0);
    let pageIndex = -1;
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / bs);
      if (Math.floor(block / PAGE_ENTRIES) !== pageIndex) {
        pageIndex = Math.floor(block / PAGE_ENTRIES);
        page = await this.page(pageIndex);
      }
      const entry = page[block % PAGE_ENTRIES];
      const stop = Math.min(end, (block + 1) * bs);
      const at = intoOffset + (pos - offset);
      if (entry < BLOCK_DISCARDED) {
        const host = dataOffset(this.header, entry) + (pos - block * bs);
        if (run && run.host + run.len === host) run.len += stop - pos;
        else {
          flush();
          run = { host, at, len: stop - pos };
        }
      } else {
        flush();
        into.fill(0, at, at + (stop - pos));
      }
      pos = stop;
    }
    flush();
    await Promise.all(reads);
  }

  private async readHost(host: number, len: number, into: Buffer, at: number): Promise<void> {
    const got = await readFully(this.handle, into, at, len, host);
    // A last block cut short by the end of the file reads as zeroes, as in QEMU.
    if (got < len) into.fill(0, at + got, at + len);
  }

  /** Block map page `index`, validated when loaded, from a small LRU cache. */
  private async page(index: number): Promise<Uint32Array> {
    const cached = this.pages.get(index);
    if (cached) {
      this.pages.delete(index);
      this.pages.set(index, cached);
      return cached;
    }
    let loading = this.pagesLoading.get(index);
    if (!loading) {
      loading = this.loadPage(index).finally(() => this.pagesLoading.delete(index));
      this.pagesLoading.set(index, loading);
    }
    return loading;
  }

  private async loadPage(index: number): Promise<Uint32Array> {
    const entries = await readPage(this.handle, this.header, index, this.path);
    const limit = firstUnreadableEntry(this.header, this.fileSize);
    for (let i = 0; i < entries.length; i++) {
      if (entries[i] >= limit && entries[i] < BLOCK_DISCARDED) {
        throw new CorruptImageError(unreadableReason(index * PAGE_ENTRIES + i, entries[i], this.header), { file: this.path, field: 'block_map' });
      }
    }
    this.pages.set(index, entries);
    if (this.pages.size > PAGE_CACHE_LIMIT) this.pages.delete(this.pages.keys().next().value as number);
    return entries;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/** Whether `next` extends `pending` seamlessly: same kind, adjacent, and contiguous in the file for data. */
function continues(pending: Extent, next: Extent): boolean {
  if (pending.kind !== next.kind || pending.offset + pending.length !== next.offset) return false;
  return pending.hostOffset === undefined ? next.hostOffset === undefined : next.hostOffset === pending.hostOffset + pending.length;
}
