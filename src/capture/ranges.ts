/** A byte range [start, end) of a disk. */
export type ByteRange = [number, number];

/** Reads bytes of the source disk (metadata: partition tables, filesystem bitmaps). */
export type ReadAt = (offset: number, length: number) => Promise<Buffer>;
