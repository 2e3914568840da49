import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import type { DiskReader, DiskWriter, Extent } from '../src/convert/disk.js';
import { OutputFile } from '../src/convert/output-file.js';
import { copyDisk } from '../src/convert/pipeline.js';
import { native } from '../src/native.js';
import { CancelledError } from '../src/errors.js';

/** An in-memory disk with a given allocation map. */
function memoryDisk(bytes: Buffer, map: Extent[]): DiskReader {
  return {
    format: 'memory',
    path: 'memory',
    virtualSize: bytes.length,
    layers: [],
    async *extents(offset = 0, length = bytes.length - offset) {
      for (const e of map) {
        const s = Math.max(e.offset, offset);
        const t = Math.min(e.offset + e.length, offset + length);
        if (s < t) yield { ...e, offset: s, length: t - s };
      }
    },
    async read(offset, length, into) {
      bytes.copy(into, 0, offset, offset + length);
    },
    async readScanned(offset, length, into, granularity) {
      bytes.copy(into, 0, offset, offset + length);
      return { data: into.subarray(0, length), runs: (await native.scanZeroes(into, length, granularity)).runs, release: () => undefined };
    },
    async close() {},
  };
}

interface Recorded {
  writes: Array<[number, number]>;
  zeroes: Array<[number, number]>;
  image: Buffer;
}

function memoryWriter(size: number, opts: { granularity?: number; sequential?: boolean; zeroInitialized?: boolean } = {}): DiskWriter & Recorded {
  const image = Buffer.alloc(size, 0xee);
  const rec: Recorded = { writes: [], zeroes: [], image };
  return {
    ...rec,
    path: 'out',
    virtualSize: size,
    granularity: opts.granularity ?? 512,
    sequential: opts.sequential ?? false,
    zeroInitialized: opts.zeroInitialized ?? true,
    async write(offset, data) {
      rec.writes.push([offset, data.length]);
      // Complete after a random delay, so that parallel workers interleave as real I/O does.
      await new Promise((r) => setTimeout(r, Math.random() * 2));
      data.copy(image, offset);
    },
    async writeZeroes(offset, length) {
      rec.zeroes.push([offset, length]);
      image.fill(0, offset, offset + length);
    },
    async finish() {},
    async abort() {},
  };
}

function patterned(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4096) if ((i / 4096) % 3 !== 1) b.fill((i / 4096) % 251, i, i + 4096);
  return b;
}

describe('conversion pipeline', () => {
  it('copies data, skips zero blocks for zero-initialised targets, and reports progress to the end', async () => {
    const size = 8 * 1024 * 1024;
    const bytes = patterned(size);
    const disk = memoryDisk(bytes, [{ offset: 0, length: size, kind: 'data', depth: 0 }]);
    const w = memoryWriter(size);
    w.image.fill(0);
    const seen: number[] = [];
    const stats = await copyDisk(disk, w, { chunkSize: 1024 * 1024, onProgress: (p) => seen.push(p.done) });
    expect(w.image.equals(bytes)).toBe(true);
    let nonZero = 0;
    for (let i = 0; i < size; i += 4096) if (bytes.subarray(i, i + 4096).some((v) => v !== 0)) nonZero += 4096;
    expect(stats.bytesWritten).toBe(nonZero);
    expect(w.zeroes).toEqual([]);
    expect(seen[seen.length - 1]).toBe(size);
    expect(seen.every((v, i) => i === 0 || v >= seen[i - 1])).toBe(true);
  });

  it('writes zeroes explicitly when the target is not zero-initialised', async () => {
    const size = 4 * 1024 * 1024;
    const bytes = patterned(size);
    bytes.fill(0, 2 * 1024 * 1024);
    const disk = memoryDisk(bytes, [
      { offset: 0, length: 2 * 1024 * 1024, kind: 'data', depth: 0 },
      { offset: 2 * 1024 * 1024, length: 2 * 1024 * 1024, kind: 'unallocated', depth: 0 },
    ]);
    const w = memoryWriter(size, { zeroInitialized: false });
    await copyDisk(disk, w);
    expect(w.image.equals(bytes)).toBe(true);
    expect(w.zeroes.some(([o, l]) => o === 2 * 1024 * 1024 && l === 2 * 1024 * 1024)).toBe(true);
  });

  it('calls a sequential writer strictly in order even with many workers', async () => {
    const size = 16 * 1024 * 1024;
    const bytes = patterned(size);
    const disk = memoryDisk(bytes, [
      { offset: 0, length: 3 * 1024 * 1024, kind: 'data', depth: 0 },
      { offset: 3 * 1024 * 1024, length: 1024 * 1024, kind: 'zero', depth: 0 },
      { offset: 4 * 1024 * 1024, length: 12 * 1024 * 1024, kind: 'data', depth: 0 },
    ]);
    bytes.fill(0, 3 * 1024 * 1024, 4 * 1024 * 1024);
    const w = memoryWriter(size, { sequential: true, granularity: 65536 });
    w.image.fill(0);
    await copyDisk(disk, w, { workers: 8, chunkSize: 512 * 1024 });
    expect(w.image.equals(bytes)).toBe(true);
    for (let i = 1; i < w.writes.length; i++) expect(w.writes[i][0]).toBeGreaterThan(w.writes[i - 1][0]);
  });

  it('widens data to the writer granularity so every write is aligned', async () => {
    const size = 1024 * 1024;
    const bytes = Buffer.alloc(size);
    bytes.fill(5, 70000, 70100);
    const disk = memoryDisk(bytes, [
      { offset: 0, length: 69632, kind: 'zero', depth: 0 },
      { offset: 69632, length: 4096, kind: 'data', depth: 0 },
      { offset: 73728, length: size - 73728, kind: 'zero', depth: 0 },
    ]);
    const w = memoryWriter(size, { granularity: 65536 });
    w.image.fill(0);
    await copyDisk(disk, w);
    expect(w.writes).toEqual([[65536, 65536]]);
    expect(w.image.equals(bytes)).toBe(true);
  });

  it('stops with CancelledError when aborted', async () => {
    const size = 64 * 1024 * 1024;
    const disk = memoryDisk(patterned(size), [{ offset: 0, length: size, kind: 'data', depth: 0 }]);
    const w = memoryWriter(size);
    const ctl = new AbortController();
    const run = copyDisk(disk, w, { chunkSize: 1024 * 1024, workers: 2, signal: ctl.signal, onProgress: (p) => p.done > 4 * 1024 * 1024 && ctl.abort() });
    await expect(run).rejects.toBeInstanceOf(CancelledError);
    const written = w.writes.reduce((sum, [, len]) => sum + len, 0);
    expect(written).toBeLessThan(size / 2);
  });
});

describe('OutputFile', () => {
  const tempFor = (dir: string, tag: string) => join(dir, `.out.raw.ferry-${tag}.tmp`);

  it('writes under a free temporary name beside the target, taking another when one is taken, and renames when committed', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-output-'));
    try {
      // The first two names drawn are the same and already exist: the third draw must be used.
      const draws = [0.25, 0.25, 0.5];
      const random = vi.spyOn(Math, 'random').mockImplementation(() => draws.shift() ?? 0.75);
      await writeFile(tempFor(dir, '40000000'), 'somebody else');
      const out = await OutputFile.create(join(dir, 'out.raw'));
      random.mockRestore();
      expect(out.tempPath).toBe(tempFor(dir, '80000000'));
      await out.writeAt(Buffer.from('ferry'), 0);
      await out.commit(false);
      expect(await readFile(join(dir, 'out.raw'), 'utf8')).toBe('ferry');
      expect(await readFile(tempFor(dir, '40000000'), 'utf8')).toBe('somebody else');
      expect((await readdir(dir)).sort()).toEqual([basename(tempFor(dir, '40000000')), 'out.raw']);
    } finally {
      vi.restoreAllMocks();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('gives up with EEXIST when every name it draws is taken', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-output-'));
    try {
      vi.spyOn(Math, 'random').mockReturnValue(0.25);
      await writeFile(tempFor(dir, '40000000'), '');
      await expect(OutputFile.create(join(dir, 'out.raw'))).rejects.toMatchObject({ code: 'EEXIST' });
      expect(await readdir(dir)).toEqual([basename(tempFor(dir, '40000000'))]);
    } finally {
      vi.restoreAllMocks();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
