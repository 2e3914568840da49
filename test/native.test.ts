import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Codec, native } from '../src/native.js';
import { tempDir } from './helpers/env.js';

describe('native helpers', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => ({ dir, cleanup } = await tempDir()));
  afterAll(() => cleanup());

  it('finds data and holes in a sparse file without reading it', async () => {
    const path = join(dir, 'sparse');
    const h = await open(path, 'w+');
    await h.truncate(64 * 1024 * 1024);
    await h.write(Buffer.alloc(4096, 1), 0, 4096, 8 * 1024 * 1024);
    await h.write(Buffer.alloc(8192, 2), 0, 8192, 32 * 1024 * 1024);
    const seg = native.dataSegments(h.fd, 0, 64 * 1024 * 1024, 100);
    await h.close();
    expect(Array.from(seg)).toEqual([8 * 1024 * 1024, 8 * 1024 * 1024 + 4096, 32 * 1024 * 1024, 32 * 1024 * 1024 + 8192, 64 * 1024 * 1024]);
  });

  it('writes buffers back to back into an allocated range through the lane, extending the file and leaving holes elsewhere', async () => {
    const h = await open(join(dir, 'allocated'), 'w+');
    const MiB = 1024 * 1024;
    const lane = native.openWriteLane(h.fd);
    // Random content and odd sizes: the write goes out in 512 KiB pieces, cut inside and across buffers.
    const parts = [randomBytes(MiB + 3), randomBytes(4096), randomBytes(700 * 1024), randomBytes(100)];
    const total = parts.reduce((n, p) => n + p.length, 0);
    // Queued at once, the second right behind the first: the lane may merge them; each settles with its own size.
    const tail = randomBytes(5000);
    const [first, second] = await Promise.all([native.laneWrite(lane, parts, 8 * MiB), native.laneWrite(lane, [tail], 8 * MiB + total)]);
    expect([first, second]).toEqual([total, tail.length]);
    native.closeWriteLane(lane);
    expect(() => native.closeWriteLane(lane)).not.toThrow(); // closing again does nothing
    expect(() => native.laneWrite(lane, [tail], 0)).toThrow(/open write lane/);
    const { size } = await h.stat();
    expect(size).toBe(8 * MiB + total + tail.length);
    const back = Buffer.alloc(total + tail.length);
    await h.read(back, 0, back.length, 8 * MiB);
    expect(back.equals(Buffer.concat([...parts, tail]))).toBe(true);
    // Only the written range was allocated: the first 8 MiB are still a hole.
    expect(native.dataSegments(h.fd, 0, size, 10)[0]).toBe(8 * MiB);
    expect(() => native.laneWrite(native.openWriteLane(h.fd), [], 0)).toThrow(/buffers expected/);
    await h.close();
  });

  it('rejects a lane write the file refuses, with its errno, and goes on with the next', async () => {
    const h = await open(join(dir, 'read-only'), 'w+');
    await h.close();
    const ro = await open(join(dir, 'read-only'), 'r');
    const lane = native.openWriteLane(ro.fd);
    await expect(native.laneWrite(lane, [Buffer.alloc(10)], 0)).rejects.toMatchObject({ code: 'ERR_FERRY_IO', errno: 9 });
    await expect(native.laneWrite(lane, [Buffer.alloc(10)], 4096)).rejects.toMatchObject({ errno: 9 });
    native.closeWriteLane(lane);
    await ro.close();
  });

  it('reports where to resume when the segment limit is reached', async () => {
    const path = join(dir, 'many');
    const h = await open(path, 'w+');
    await h.truncate(1024 * 1024);
    for (let i = 0; i < 4; i++) await h.write(Buffer.alloc(4096, 1), 0, 4096, i * 65536);
    const seg = native.dataSegments(h.fd, 0, 1024 * 1024, 2);
    await h.close();
    expect(Array.from(seg)).toEqual([0, 4096, 65536, 65536 + 4096, 65536 + 4096]);
  });

  it('reads and marks zero blocks in one pass', async () => {
    const path = join(dir, 'scan');
    const data = Buffer.alloc(64 * 1024);
    data.fill(7, 4096, 8192);
    data[40000] = 1;
    const h = await open(path, 'w+');
    await h.write(data, 0, data.length, 0);
    const buf = Buffer.alloc(data.length);
    const { bytesRead, runs } = await native.preadScan(h.fd, buf, data.length, 0, 4096);
    await h.close();
    expect(bytesRead).toBe(data.length);
    expect(buf.equals(data)).toBe(true);
    // no leading data, zero block 0, data block 1, zero blocks 2-8, data block 9 (byte 40000), zero blocks 10-15
    expect(Array.from(runs)).toEqual([0, 4096, 4096, 4096 * 7, 4096, 4096 * 6]);
  });

  it('maps a file range and scans it in place, refusing ranges past the end of the file', async () => {
    const path = join(dir, 'mapped');
    const data = Buffer.alloc(3 * 4096 + 700);
    data.fill(5, 4096, 8192);
    const h = await open(path, 'w+');
    await h.write(data, 0, data.length, 0);
    // An unaligned start maps from the page below it.
    const mapped = await native.mapScanned(h.fd, 100, 3 * 4096, 4096);
    expect(mapped).not.toBeNull();
    const { buffer, runs } = mapped!;
    expect(buffer.equals(data.subarray(100, 100 + 3 * 4096))).toBe(true);
    // Bytes 100.. : two blocks reaching into the filled page, then one zero block.
    expect(Array.from(runs)).toEqual([8192, 4096]);
    const view = buffer.subarray(10, 20);
    native.releaseMapping(buffer);
    expect(buffer.length).toBe(0);
    expect(view.length).toBe(0);
    expect(await native.mapScanned(h.fd, 4 * 4096, 4096, 4096)).toBeNull();
    await h.close();
  });

  it('scans buffers that end in a partial block', async () => {
    const buf = Buffer.alloc(5000);
    buf[4999] = 9;
    const { runs } = await native.scanZeroes(buf, 5000, 4096);
    expect(Array.from(runs)).toEqual([0, 4096, 904]);
  });

  it('computes CRC-32C', () => {
    expect(native.crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
    expect(native.crc32c(Buffer.alloc(32))).toBe(0x8a9136aa);
    const whole = native.crc32c(Buffer.from('hello world'));
    expect(native.crc32c(Buffer.from(' world'), native.crc32c(Buffer.from('hello')))).toBe(whole);
  });

  for (const [name, codec] of [
    ['deflate', Codec.Deflate],
    ['zstd', Codec.Zstd],
  ] as const) {
    it(`${name}: compresses blocks in a batch and decompresses them, refusing corrupt input`, async () => {
      const block = 65536;
      const src = Buffer.alloc(block * 3);
      src.fill('compressible text ', 0, block);
      for (let i = block; i < 2 * block; i++) src[i] = (i * 2654435761) >>> 24; // poorly compressible
      const out = Buffer.alloc(block * 3);
      const sizes = new Uint32Array(3);
      await native.compressBlocks(codec, 3, src, block, 3, out, block, block - 1, sizes);
      expect(sizes[0]).toBeGreaterThan(0);
      expect(sizes[0]).toBeLessThan(2000);
      expect(sizes[2]).toBeGreaterThan(0);

      const packed = Buffer.concat([out.subarray(0, sizes[0]), Buffer.alloc(300, 0xee), out.subarray(2 * block, 2 * block + sizes[2])]);
      const triples = new Float64Array([0, sizes[0] + 300, 0, sizes[0] + 300, sizes[2], block]);
      const dst = Buffer.alloc(2 * block);
      await native.decompressBlocks(codec, packed, triples, dst, block);
      expect(dst.subarray(0, block).equals(src.subarray(0, block))).toBe(true);
      expect(dst.subarray(block).equals(src.subarray(2 * block))).toBe(true);

      const garbage = Buffer.alloc(200, 0xff);
      await expect(native.decompressBlocks(codec, garbage, new Float64Array([0, 200, 0]), dst, block)).rejects.toThrow(/corrupt/);
      const truncated = out.subarray(0, Math.floor(sizes[0] / 2));
      await expect(native.decompressBlocks(codec, truncated, new Float64Array([0, truncated.length, 0]), dst, block)).rejects.toThrow(/corrupt/);
    });
  }
});
