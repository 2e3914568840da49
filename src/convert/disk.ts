/**
 * The two roles every disk format plays: a layer that reads one image file, and a writer that creates one.
 * Backing chains, zero detection and parallel copying live above these, in disk-chain.ts and pipeline.ts,
 * so that a format driver only describes its own file (as QEMU's block drivers do).
 */

export type ExtentKind = 'data' | 'zero' | 'unallocated';

/** A run of guest bytes with the same allocation state, like QEMU's block status. */
export interface Extent {
  offset: number;
  length: number;
  /** data: stored bytes; zero: known to read as zeroes; unallocated: nothing stored (reads through to a backing image, or zeroes). */
  kind: ExtentKind;
  /** In a chain: 0 for the top image, 1 for its backing file, ... */
  depth: number;
  /** Where the bytes sit in the layer's data file when they are stored plainly and contiguously. */
  hostOffset?: number;
  /**
   * For layers spread over several files (VMDK extents): the descriptor and name of the file `hostOffset`
   * refers to. Absent means the layer's `dataFd` and `path`.
   */
  hostFd?: number;
  hostFile?: string;
}

/** A reference from an image to another file (backing file, data file, extent), before it is resolved. */
export interface FileReference {
  name: string;
  /** The format the image records for it, if any (qcow2 backing_fmt). */
  format?: string;
}

/** Format-specific facts for `info`, keyed like qemu-img's "format-specific" data. */
export interface FormatDetails {
  clusterSize?: number;
  dirty?: boolean;
  specific?: { type: string; data: Record<string, unknown> };
}

/** One opened image file, without its backing chain. */
export interface ImageLayer {
  readonly format: string;
  readonly path: string;
  readonly virtualSize: number;
  /** The backing image this layer falls through to for unallocated ranges, if it has one. */
  readonly backing?: FileReference;
  /** File descriptor that `hostOffset` of extents refers to (the image itself, or its data file). */
  readonly dataFd?: number;
  /**
   * This layer's own allocation for [offset, offset+length), in order, covering the range exactly.
   * Adjacent extents should be merged where possible: callers iterate large images.
   */
  blockStatus(offset: number, length: number): AsyncIterable<Extent>;
  /**
   * Reads [offset, offset+length) into `into` at `intoOffset`. The range must lie in extents this layer
   * reports as 'data' or 'zero'; unallocated ranges are the chain's business.
   */
  readAllocated(offset: number, length: number, into: Buffer, intoOffset: number): Promise<void>;
  details(): FormatDetails;
  close(): Promise<void>;
}

export interface ScannedRange {
  data: Buffer;
  /** Alternating run lengths, data first: [data, zero, data, zero, ...]. */
  runs: Uint32Array;
  release(): void;
}

/** A whole disk: an image and its resolved backing chain, read as one. */
export interface DiskReader {
  readonly format: string;
  readonly path: string;
  readonly virtualSize: number;
  /** The chain from this image down: layers[0] is the top image. */
  readonly layers: readonly ImageLayer[];
  /** The composed allocation map over the chain, 'unallocated' only where no layer stores anything. */
  extents(offset?: number, length?: number): AsyncIterable<Extent>;
  /** Reads guest bytes [offset, offset+length) into `into` (from index 0). */
  read(offset: number, length: number, into: Buffer): Promise<void>;
  /**
   * Reads like `read` and also reports which `granularity`-sized blocks are all zeroes, in one pass over
   * the data while it is in cache. When the range is one plain range of a file, the data is not read into
   * `into` but mapped from the page cache (one copy fewer); `release` must then be called once the data is
   * no longer used.
   */
  readScanned(offset: number, length: number, into: Buffer, granularity: number): Promise<ScannedRange>;
  close(): Promise<void>;
}

/** Receives a disk's contents. Created by a FormatDriver; the pipeline drives it. */
export interface DiskWriter {
  readonly path: string;
  readonly virtualSize: number;
  /** The unit the writer allocates in; the pipeline aligns writes and zero detection to it. */
  readonly granularity: number;
  /**
   * True when the writer can only take each block once, in ascending order (streamOptimized VMDK). Calls
   * then arrive in ascending order, but a call may come before the previous one's promise settles: such a
   * writer starts its work (compression) at once and commits results in call order.
   */
  readonly sequential: boolean;
  /** True when unwritten ranges read as zeroes, so zero runs need not be written. */
  readonly zeroInitialized: boolean;
  write(offset: number, data: Buffer): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  /** Completes the image (metadata, rename into place). After it the writer is closed. */
  finish(): Promise<void>;
  /** Removes everything written. Safe to call after a failed finish. */
  abort(): Promise<void>;
}
