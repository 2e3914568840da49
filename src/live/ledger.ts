import { availableParallelism } from 'node:os';
import { native } from '../native.js';

/**
 * The XXH64 digest of every page, as (low, high) 32-bit pairs. The source keeps one for the version of each
 * page the destination holds (updated as pages are sent); the destination keeps one for what it wrote.
 * Equal combined digests at switchover prove that the destination's memory is the source's.
 */
export class PageLedger {
  readonly digests: Uint32Array;

  constructor(readonly pageCount: number) {
    this.digests = new Uint32Array(pageCount * 2);
  }

  /** Records digests from a batch's meta (kind, size, digest low, digest high per page). */
  recordBatch(pages: Uint32Array, count: number, meta: Uint32Array): void {
    const d = this.digests;
    for (let i = 0; i < count; i++) {
      const p = pages[i] * 2;
      d[p] = meta[i * 4 + 2];
      d[p + 1] = meta[i * 4 + 3];
    }
  }

  /** One digest over all page digests, in page order. */
  combined(): bigint {
    return native.xxh64(new Uint8Array(this.digests.buffer, this.digests.byteOffset, this.digests.byteLength));
  }

  /** Pages in [from, to) whose digest in `current` differs from this ledger's. */
  differing(current: Uint32Array, from = 0, to = this.pageCount): Uint32Array {
    const d = this.digests;
    const out: number[] = [];
    for (let p = from; p < to; p++) {
      if (d[p * 2] !== current[p * 2] || d[p * 2 + 1] !== current[p * 2 + 1]) out.push(p);
    }
    return Uint32Array.from(out);
  }
}

/** Sorted union of two sorted page sets. */
export function unionPages(a: Uint32Array, b: Uint32Array): Uint32Array {
  if (a.length === 0) return b;
  if (b.length === 0) return a;
  const out = new Uint32Array(a.length + b.length);
  let i = 0;
  let j = 0;
  let n = 0;
  while (i < a.length || j < b.length) {
    const x = i < a.length ? a[i] : Infinity;
    const y = j < b.length ? b[j] : Infinity;
    const v = x <= y ? x : y;
    if (x === v) i++;
    if (y === v) j++;
    out[n++] = v;
  }
  return out.subarray(0, n);
}

/** The pages of sorted set `a` that are not in sorted set `b`. */
export function subtractPages(a: Uint32Array, b: Uint32Array): Uint32Array {
  if (a.length === 0 || b.length === 0) return a;
  const out = new Uint32Array(a.length);
  let j = 0;
  let n = 0;
  for (let i = 0; i < a.length; i++) {
    while (j < b.length && b[j] < a[i]) j++;
    if (j >= b.length || b[j] !== a[i]) out[n++] = a[i];
  }
  return out.subarray(0, n);
}

/** Every page number, 0..count-1. */
export function allPages(count: number): Uint32Array {
  const out = new Uint32Array(count);
  for (let i = 0; i < count; i++) out[i] = i;
  return out;
}

/** XXH64 of every page of a file into out (low, high pairs), in parallel slices on the thread pool. */
export async function digestFilePages(fd: number, pageSize: number, pageCount: number, out: Uint32Array): Promise<void> {
  const per = Math.ceil(pageCount / Math.max(1, availableParallelism()));
  const work: Promise<number>[] = [];
  for (let first = 0; first < pageCount; first += per) {
    const count = Math.min(per, pageCount - first);
    work.push(native.hashFilePages(fd, first * pageSize, pageSize, count, out.subarray(first * 2, (first + count) * 2)));
  }
  await Promise.all(work);
}
