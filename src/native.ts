/**
 * Typed access to native/ferry_native.c: what Node 20 lacks (SEEK_DATA/SEEK_HOLE, hole punching, CRC-32C,
 * zstd) or cannot do off the main thread in large batches (read + zero scan, block (de)compression).
 */
import { createRequire } from 'node:module';

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
  crc32c(data: Uint8Array, initial?: number): number;
  isZero(data: Uint8Array): boolean;
}

const require = createRequire(import.meta.url);
export const native: FerryNative = require('../native/build/Release/ferry_native.node');
