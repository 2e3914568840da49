/**
 * Typed access to native/ferry_native.c: what Node 20 lacks (SEEK_DATA/SEEK_HOLE, hole punching, CRC-32C,
 * zstd) or cannot do off the main thread in large batches (read + zero scan, block (de)compression, chunk hashes).
 */
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { PACKAGE_ROOT } from './paths.js';

export const enum Codec {
  /** Raw deflate without header (qcow2). */
  Deflate = 0,
  Zstd = 1,
  /** Deflate with the zlib header and Adler-32 (VMDK streamOptimized grains). */
  Zlib = 2,
}

export interface ScanResult {
  bytesRead: number;
  /** Alternating run lengths, data first: [data, zero, data, zero, ...]. */
  runs: Uint32Array;
}

interface FerryNative {
  preadScan(fd: number, buffer: Buffer, length: number, position: number, granularity: number): Promise<ScanResult>;
  scanZeroes(buffer: Buffer, length: number, granularity: number): Promise<ScanResult>;
  /**
   * Maps [position, position+length) of a file read-only and scans it like preadScan, without copying:
   * `buffer` views the page cache. Null when the range is not wholly inside the file.
   */
  mapScanned(fd: number, position: number, length: number, granularity: number): Promise<(ScanResult & { buffer: Buffer }) | null>;
  /** Unmaps a mapScanned buffer now; every view of it becomes empty. */
  releaseMapping(buffer: Buffer): void;
  compressBlocks(
    codec: Codec,
    level: number,
    src: Buffer,
    blockSize: number,
    count: number,
    out: Buffer,
    outStride: number,
    capacity: number,
    sizes: Uint32Array,
  ): Promise<number>;
  decompressBlocks(codec: Codec, src: Buffer, triples: Float64Array, dst: Buffer, blockSize: number): Promise<number>;
  dataSegments(fd: number, start: number, end: number, maxSegments: number): Float64Array;
  punchHole(fd: number, offset: number, length: number): boolean;
  /**
   * A thread of its own that writes to fd, in order, what laneWrite queues: each write into a range allocated
   * just before (fallocate, file size unchanged, so the buffered write skips delayed allocation), in pieces of
   * at most 512 KiB; writes queued at consecutive positions go out as one. Close it once its writes settled.
   */
  openWriteLane(fd: number): WriteLane;
  /**
   * Queues a write of the buffers (1 to 256) back to back at `position`; resolves to the bytes written. The
   * buffers and the array must not change until it settles.
   */
  laneWrite(lane: WriteLane, buffers: Uint8Array[], position: number): Promise<number>;
  /** Lets the lane finish what is queued and ends its thread; closing again does nothing, later writes throw. */
  closeWriteLane(lane: WriteLane): void;
  crc32c(data: Uint8Array, initial?: number): number;
  isZero(data: Uint8Array): boolean;
  /**
   * XXH64 (seed 0) of each `blockSize` piece of buffer[0, length), the last piece possibly shorter, as 8
   * little-endian bytes per piece into `out`. Resolves to the number of hashes. The capture agent computes
   * the same hashes on the source (native/xxh64.h).
   */
  hashBlocks(buffer: Uint8Array, length: number, blockSize: number, out: Uint8Array): Promise<number>;
  /**
   * A shared mapping of the file's first `length` bytes (unmapped when collected), read-only unless `writable`:
   * writing to a read-only one kills the process.
   */
  mapShared(fd: number, length: number, writable?: boolean): ArrayBuffer;
  /** XXH64 (seed 0) of a small buffer, synchronously. */
  xxh64(data: Uint8Array): bigint;
  /**
   * XXH64 of each page of `memory`, a mapping of fd's range at `position` (mapShared), as (low, high) pairs in
   * out. Holes of the file are not read (their digest is the zero page's): on tmpfs, reading a hole through
   * a shared mapping would allocate it. Pages flagged in `skip` keep their digest. Pages flagged in `knownData`
   * (kept by the caller across passes) held data before and are read without looking for holes; pages found
   * holding data get flagged. Resolves to the pages read.
   */
  hashMappedPages(
    memory: Uint8Array,
    fd: number,
    position: number,
    pageSize: number,
    count: number,
    out: Uint32Array,
    skip?: Uint8Array,
    knownData?: Uint8Array,
  ): Promise<number>;
  /** XXH64 of each page of the file range [position, position + pageSize*count), as (low, high) pairs in out. */
  hashFilePages(fd: number, position: number, pageSize: number, count: number, out: Uint32Array): Promise<number>;
  /** Reads pages indices[0..count) of a file back to back into out (contiguous pages in one pread). */
  preadPages(fd: number, pageSize: number, indices: Uint32Array, count: number, out: Uint8Array): Promise<number>;
  /**
   * Encodes pages for live migration; resolves to the bytes written to out. Per page, meta holds kind
   * (LivePageKind), encoded size and the XXH64 of the page (low, high). Pages come from `src`: with fd < 0 it
   * holds the batch's pages back to back; otherwise it maps all of fd (mapShared) and each page is gathered from
   * its place (a page whose state lacks PAGE_HELD_DATA is read from fd instead, for it may be a hole). Deltas are
   * taken against `cache` (slot = page number mod slots, tags = page held by each slot or -1); pass empty cache
   * and tags for none; `cacheMode` says what encoding writes there (CacheMode). `states` (one byte per page
   * number, kept by the caller across batches): PAGE_HELD_DATA, and the page's raw sends in a row (a page that
   * went raw is only tried with zstd again every 8th send).
   */
  encodePages(
    src: Uint8Array,
    fd: number,
    pageSize: number,
    count: number,
    indices: Uint32Array,
    cache: Uint8Array,
    tags: Int32Array,
    cacheMode: CacheMode,
    level: number,
    out: Uint8Array,
    meta: Uint32Array,
    states?: Uint8Array,
  ): Promise<number>;
  /**
   * Decodes a batch from encodePages into `memory`, a writable mapping of the RAM file (mapShared), at each
   * page's place; fills the XXH64 of each written page into meta. `held` (the digests of what the memory holds,
   * by page number) lets zero pages already zero there go unwritten.
   */
  applyPages(memory: Uint8Array, pageSize: number, count: number, indices: Uint32Array, payload: Uint8Array, meta: Uint32Array, held?: Uint32Array): Promise<number>;
}

/** An output lane (openWriteLane): opaque. */
export type WriteLane = { readonly __writeLane: never };

/** What encodePages writes to the delta cache. */
export const enum CacheMode {
  /** Reads it only; a cached page sent is evicted (the stop-and-copy: no later round could use it). */
  Lookup = 0,
  /** Also refreshes the pages it holds. */
  Refresh = 1,
  /** Also caches pages it does not hold yet. */
  Insert = 2,
}

/** encodePages state bit: the page held data when last read, so it is no hole of the file. */
export const PAGE_HELD_DATA = 0x80;

const require = createRequire(import.meta.url);
export const native: FerryNative = require(join(PACKAGE_ROOT, 'native', 'build', 'Release', 'ferry_native.node'));
