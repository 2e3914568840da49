import type { DiskReader } from './disk.js';
import { openDisk } from './open.js';

export interface CompareOptions {
  formatA?: string;
  formatB?: string;
  /** Different sizes are a mismatch even when the extra part reads as zeroes (qemu-img compare -s). */
  strict?: boolean;
  allowExternal?: boolean;
  onProgress?: (done: number, total: number) => void;
}

export type CompareResult = { identical: true } | { identical: false; offset: number; reason: 'content' | 'size' };

const CHUNK = 4 * 1024 * 1024;
const IN_FLIGHT = 4;
const SECTOR = 512;

/** Compares what two images read as, guest byte by guest byte, skipping ranges unallocated in both. */
export async function compareImages(pathA: string, pathB: string, opts: CompareOptions = {}): Promise<CompareResult> {
  const a = await openDisk(pathA, { format: opts.formatA, allowExternal: opts.allowExternal });
  try {
    const b = await openDisk(pathB, { format: opts.formatB, allowExternal: opts.allowExternal });
    try {
      if (opts.strict && a.virtualSize !== b.virtualSize) return { identical: false, offset: Math.min(a.virtualSize, b.virtualSize), reason: 'size' };
      const common = Math.min(a.virtualSize, b.virtualSize);
      const total = Math.max(a.virtualSize, b.virtualSize);
      const mismatch = await firstDifference(a, b, common, opts.onProgress && ((d) => opts.onProgress!(d, total)));
      if (mismatch !== undefined) return { identical: false, offset: mismatch, reason: 'content' };
      // The longer image's tail must read as zeroes.
      const longer = a.virtualSize > b.virtualSize ? a : b;
      const tail = await firstNonZero(longer, common, longer.virtualSize);
      if (tail !== undefined) return { identical: false, offset: tail, reason: 'content' };
      return { identical: true };
    } finally {
      await b.close();
    }
  } finally {
    await a.close();
  }
}

/** Ranges of [0, end) where at least one of the disks stores data. */
async function dataRanges(disks: DiskReader[], end: number): Promise<Array<[number, number]>> {
  const ranges: Array<[number, number]> = [];
  for (const disk of disks) for await (const e of disk.extents(0, end)) if (e.kind === 'data') ranges.push([e.offset, e.offset + e.length]);
  ranges.sort((x, y) => x[0] - y[0]);
  const merged: Array<[number, number]> = [];
  for (const r of ranges) {
    const last = merged[merged.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else merged.push([...r]);
  }
  return merged;
}

async function firstDifference(a: DiskReader, b: DiskReader, end: number, progress?: (done: number) => void): Promise<number | undefined> {
  const work: Array<[number, number]> = [];
  for (const [s, e] of await dataRanges([a, b], end)) for (let p = s; p < e; p += CHUNK) work.push([p, Math.min(e, p + CHUNK)]);
  let found: number | undefined;
  let next = 0;
  let done = 0;
  const worker = async () => {
    const bufA = Buffer.allocUnsafe(CHUNK);
    const bufB = Buffer.allocUnsafe(CHUNK);
    while (next < work.length) {
      const [s, e] = work[next++];
      if (found !== undefined && found < s) return;
      const len = e - s;
      await Promise.all([a.read(s, len, bufA), b.read(s, len, bufB)]);
      if (!bufA.subarray(0, len).equals(bufB.subarray(0, len))) {
        const at = s + firstDiffSector(bufA, bufB, len);
        if (found === undefined || at < found) found = at;
      }
      done += len;
      progress?.(done);
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  return found;
}

function firstDiffSector(x: Buffer, y: Buffer, len: number): number {
  for (let off = 0; off < len; off += SECTOR) {
    const stop = Math.min(len, off + SECTOR);
    if (!x.subarray(off, stop).equals(y.subarray(off, stop))) return off;
  }
  return len;
}

async function firstNonZero(disk: DiskReader, from: number, to: number): Promise<number | undefined> {
  const buf = Buffer.allocUnsafe(CHUNK);
  for await (const e of disk.extents(from, to - from)) {
    if (e.kind !== 'data') continue;
    for (let p = e.offset; p < e.offset + e.length; p += CHUNK) {
      const len = Math.min(CHUNK, e.offset + e.length - p);
      await disk.read(p, len, buf);
      for (let off = 0; off < len; off += SECTOR) {
        const sector = buf.subarray(off, Math.min(len, off + SECTOR));
        if (sector.some((byte) => byte !== 0)) return p + off;
      }
    }
  }
  return undefined;
}
