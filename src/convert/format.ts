import type { DiskWriter, Extent, ImageLayer } from './disk.js';
import type { OptionSpec, OptionValues } from './options.js';

export interface OpenContext {
  /**
   * Resolves a file named inside an image (data file, extent, parent locator) to a path, relative to the
   * image's folder, refusing one outside it unless the caller allowed external references.
   */
  resolve(fromImage: string, name: string, what: string): Promise<string>;
}

export interface CreateRequest {
  /** Where the finished image must end up. Writers write a temporary file beside it and rename on finish. */
  path: string;
  virtualSize: number;
  options: OptionValues;
  /** Compress data (qemu-img convert -c); only for drivers with `compression`. */
  compress: boolean;
  /** fsync before the rename, for callers that must survive a host crash (qemu-img -t other than unsafe). */
  durable?: boolean;
}

export interface OpenWriterOptions {
  /** The target's own backing chain may be read from outside its folder (--allow-external). */
  allowExternal?: boolean;
}

/** Sizes `measure` reports, in bytes, as qemu-img measure does. */
export interface MeasureResult {
  required: number;
  fullyAllocated: number;
}

export interface CheckReport {
  /** Errors that make the image unsafe to use (refcount too low, bad table entries). */
  corruptions: string[];
  /** Allocated clusters nobody references: space wasted, data safe. */
  leaks: string[];
  /** Clusters whose stored refcount is higher than their references. */
  leakedClusters: number;
  allocatedClusters?: number;
  totalClusters?: number;
  fragmentedClusters?: number;
  compressedClusters?: number;
  imageEndOffset?: number;
}

/** One disk image format, filled in once per format like a QEMU BlockDriver. */
export interface FormatDriver {
  readonly name: string;
  /** Other names accepted on the command line, e.g. "vpc" for vhd. */
  readonly aliases: readonly string[];
  readonly description: string;
  /**
   * 0 = not this format, 100 = certain. `head` holds the first 64 KiB (less for small files); `tail` the
   * last 512 bytes, for formats identified by a footer (fixed VHD).
   */
  probe(head: Buffer, fileSize: number, tail: Buffer): number;
  open(path: string, ctx: OpenContext): Promise<ImageLayer>;
  readonly createOptions: readonly OptionSpec[];
  /** Absent for read-only formats. */
  create?(req: CreateRequest): Promise<DiskWriter>;
  /**
   * Writes into an existing image in place (qemu-img convert -n), for formats that allow it.
   * `virtualSize` is the source's: a smaller target is refused, a larger one keeps what lies past it.
   */
  openWriter?(path: string, virtualSize: number, opts?: OpenWriterOptions): Promise<DiskWriter>;
  /** Whether `create` honours `compress`. */
  readonly compression: boolean;
  /** Output size for a given allocation of the source; extents cover the whole virtual size. */
  measure?(virtualSize: number, allocated: AsyncIterable<Extent>, options: OptionValues): Promise<MeasureResult>;
  /** Consistency check (qemu-img check). Absent where the format has nothing beyond its headers. */
  check?(path: string): Promise<CheckReport>;
}
