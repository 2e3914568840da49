/** A byte range [start, end) of a disk. */
export type ByteRange = [number, number];

/** Reads bytes of the source disk (metadata: partition tables, filesystem bitmaps). */
export type ReadAt = (offset: number, length: number) => Promise<Buffer>;

/**
 * Runs `fn` over `items` with twice the source's parallelism in flight: filesystem metadata reads are
 * small, so keeping every agent channel busy needs more than one request per channel.
 */
export async function inParallel<T>(items: T[], parallelism: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.max(1, Math.min(parallelism * 2, items.length)) }, async () => {
      while (next < items.length) await fn(items[next++]);
    }),
  );
}
