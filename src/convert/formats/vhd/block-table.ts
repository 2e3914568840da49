import type { FileHandle } from 'node:fs/promises';
import { readFully } from '../../output-file.js';
import { UNALLOCATED } from './layout.js';

/** BAT entries per page: the unit the table is cached in (64 KiB). */
const PAGE_ENTRIES = 16384;
/** Pages kept in memory: 32 MiB, the whole BAT of any 2 MiB-block disk up to the 2040 GiB limit and more. */
const CACHE_PAGES = 512;
/** Entries checked per read while validating the table at open. */
const SCAN_ENTRIES = 16 * PAGE_ENTRIES;

/**
 * The Block Allocation Table, read in pages and cached up to a bound, so that memory stays bounded even
 * for the largest tables a valid image may carry (2^29 entries with tiny blocks).
 */
export class BlockTable {
  private readonly cache = new Map<number, Uint32Array>();
  private readonly loading = new Map<number, Promise<Uint32Array>>();

  private constructor(
    private readonly handle: FileHandle,
    private readonly tableOffset: number,
    /** Entries the virtual size uses; the rest of the table is validated but never read again. */
    private readonly usedEntries: number,
  ) {}

  /**
   * Streams through all `totalEntries` entries (the table must lie inside the file), handing every
   * allocated one to `check`, and keeps the first pages in the cache.
   */
  static async load(
    handle: FileHandle,
    tableOffset: number,
    totalEntries: number,
    usedEntries: number,
    check: (index: number, entry: number) => void,
  ): Promise<BlockTable> {
    const table = new BlockTable(handle, tableOffset, usedEntries);
    const buf = Buffer.alloc(Math.min(totalEntries, SCAN_ENTRIES) * 4);
    for (let first = 0; first < totalEntries; first += SCAN_ENTRIES) {
      const count = Math.min(SCAN_ENTRIES, totalEntries - first);
      await readFully(handle, buf, 0, count * 4, tableOffset + first * 4);
      for (let i = 0; i < count; i++) {
        const entry = buf.readUInt32BE(i * 4);
        if (entry !== UNALLOCATED) check(first + i, entry);
      }
      for (let page = first / PAGE_ENTRIES; page * PAGE_ENTRIES < Math.min(first + count, usedEntries); page++) {
        if (table.cache.size >= CACHE_PAGES) break;
        const start = page * PAGE_ENTRIES - first;
        table.cache.set(page, decode(buf, start, Math.min(PAGE_ENTRIES, usedEntries - page * PAGE_ENTRIES)));
      }
    }
    return table;
  }

  pageOf(block: number): number {
    return Math.floor(block / PAGE_ENTRIES);
  }

  firstBlockOf(page: number): number {
    return page * PAGE_ENTRIES;
  }

  async entry(block: number): Promise<number> {
    const page = this.pageOf(block);
    return (await this.page(page))[block - this.firstBlockOf(page)];
  }

  /** The entries of one page: BAT entries firstBlockOf(page) onwards. */
  page(page: number): Promise<Uint32Array> | Uint32Array {
    const cached = this.cache.get(page);
    if (cached) {
      this.cache.delete(page);
      this.cache.set(page, cached);
      return cached;
    }
    let loading = this.loading.get(page);
    if (!loading) {
      loading = this.readPage(page).finally(() => this.loading.delete(page));
      this.loading.set(page, loading);
    }
    return loading;
  }

  private async readPage(page: number): Promise<Uint32Array> {
    const count = Math.min(PAGE_ENTRIES, this.usedEntries - page * PAGE_ENTRIES);
    const buf = Buffer.alloc(count * 4);
    await readFully(this.handle, buf, 0, buf.length, this.tableOffset + page * PAGE_ENTRIES * 4);
    const entries = decode(buf, 0, count);
    this.cache.set(page, entries);
    if (this.cache.size > CACHE_PAGES) this.cache.delete(this.cache.keys().next().value as number);
    return entries;
  }
}

function decode(buf: Buffer, firstEntry: number, count: number): Uint32Array {
  const out = new Uint32Array(count);
  for (let i = 0; i < count; i++) out[i] = buf.readUInt32BE((firstEntry + i) * 4);
  return out;
}
