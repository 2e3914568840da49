import { mkdir, open, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ferry, qemuImg, qemuIo, tempDir } from './helpers/env.js';

/**
 * Images from strangers: each hostile input must end in a one-line error naming the file, in bounded
 * memory, without hanging, and leave no output (not even a temporary file) behind.
 */
describe('hostile qcow2 inputs', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let valid: Buffer;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir());
    const path = join(dir, 'valid.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', path, '64M');
    await qemuIo(path, 'qcow2', 'write -P 0xab 0 1M');
    const { readFile } = await import('node:fs/promises');
    valid = await readFile(path);
  });
  afterAll(() => cleanup());

  async function expectRefused(name: string, image: Buffer | string, pattern: RegExp, inputs: string[] = []): Promise<void> {
    const folder = join(dir, name);
    await mkdir(folder, { recursive: true });
    const path = join(folder, 'input.qcow2');
    if (typeof image !== 'string') await writeFile(path, image);
    const out = join(folder, 'out.raw');
    const r = await ferry(['convert', '-O', 'raw', typeof image === 'string' ? image : path, out], { timeoutMs: 20_000 });
    expect(r.code, r.stderr).toBe(1);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(pattern);
    expect(lines[0]).not.toMatch(/at .*\.js:\d+/); // no stack trace
    // Bounded memory: far below what the hostile sizes would cost if believed.
    expect(r.maxRssKiB).toBeGreaterThan(0);
    expect(r.maxRssKiB).toBeLessThan(256 * 1024);
    // Nothing left behind: no output, no temporary file.
    const left = (await readdir(folder)).filter((f) => f !== 'input.qcow2' && !inputs.includes(f));
    expect(left).toEqual([]);
  }

  function patched(edit: (b: Buffer) => void): Buffer {
    const b = Buffer.from(valid);
    edit(b);
    return b;
  }

  it('truncated header', async () => {
    await expectRefused('truncated', valid.subarray(0, 40), /truncated qcow2 header/);
  });

  it('truncated v3 header', async () => {
    await expectRefused('truncated-v3', valid.subarray(0, 90), /truncated qcow2 v3 header/);
  });

  it('L1 table past the end of the file', async () => {
    await expectRefused('l1-eof', patched((b) => b.writeBigUInt64BE(1n << 40n, 40)), /l1_table_offset.*past the end of the file/);
  });

  it('L1 size 2^31', async () => {
    await expectRefused('l1-size', patched((b) => b.writeUInt32BE(0x80000000, 36)), /l1_size 2147483648 exceeds the 32 MiB limit/);
  });

  it('cluster_bits 63', async () => {
    await expectRefused('cluster-bits', patched((b) => b.writeUInt32BE(63, 20)), /cluster_bits 63 out of range/);
  });

  it('virtual size near 2^63', async () => {
    await expectRefused('huge-size', patched((b) => b.writeBigUInt64BE(0x7fff_ffff_ffff_fe00n, 24)), /size \d+ is out of range/);
  });

  it('virtual size needing an L1 larger than the one stored', async () => {
    await expectRefused('size-vs-l1', patched((b) => b.writeBigUInt64BE(1n << 50n, 24)), /l1_size \d+ too small for virtual size/);
  });

  it('unknown incompatible feature bit', async () => {
    await expectRefused('incompat', patched((b) => (b[79] |= 1 << 5)), /unknown incompatible feature bits 0x20/);
  });

  it('image flagged corrupt', async () => {
    await expectRefused('corrupt-bit', patched((b) => (b[79] |= 1 << 1)), /flagged corrupt/);
  });

  it('encrypted image', async () => {
    await expectRefused('crypt', patched((b) => b.writeUInt32BE(1, 32)), /encrypted/);
  });

  it('L2 table pointer past the end of the file', async () => {
    await expectRefused(
      'l2-eof',
      patched((b) => {
        const l1 = Number(b.readBigUInt64BE(40));
        b.writeBigUInt64BE((1n << 63n) | (1n << 36n), l1);
      }),
      /L2 table at \d+ lies past the end of the file/,
    );
  });

  it('data cluster pointer past the end of the file', async () => {
    await expectRefused(
      'data-eof',
      patched((b) => {
        const l1 = Number(b.readBigUInt64BE(40));
        const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
        b.writeBigUInt64BE((1n << 63n) | (1n << 36n), l2);
      }),
      /host offset \d+ lies past the end of the file/,
    );
  });

  it('corrupt compressed cluster', async () => {
    const folder = join(dir, 'compressed-src');
    await mkdir(folder, { recursive: true });
    const raw = join(folder, 'a.raw');
    const img = join(folder, 'a.qcow2');
    await qemuImg('create', '-q', '-f', 'raw', raw, '4M');
    await qemuIo(raw, 'raw', 'write -P 0x42 0 4M');
    await qemuImg('convert', '-c', '-O', 'qcow2', raw, img);
    const { readFile } = await import('node:fs/promises');
    const b = await readFile(img);
    const l1 = Number(b.readBigUInt64BE(40));
    const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const entry = b.readBigUInt64BE(l2 + 8);
    const offset = Number(entry & ((1n << 54n) - 1n));
    b.fill(0xff, offset, offset + 16);
    await expectRefused('compressed', b, /compressed cluster .* cannot be decompressed/);
  });

  it('backing file /etc/hostname', async () => {
    const folder = join(dir, 'abs-backing');
    await mkdir(folder, { recursive: true });
    const img = join(folder, 'input.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/hostname', '-F', 'raw', img, '1M');
    await expectRefused('abs-backing', img, /outside the image's folder.*--allow-external/);
  });

  it('backing file ../../etc/hostname', async () => {
    const folder = join(dir, 'rel-backing');
    await mkdir(folder, { recursive: true });
    const img = join(folder, 'input.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', '../../../../../../../../etc/hostname', '-F', 'raw', img, '1M');
    await expectRefused('rel-backing', img, /outside the image's folder/);
  });

  it('external data file outside the image folder', async () => {
    const folder = join(dir, 'data-file');
    await mkdir(folder, { recursive: true });
    const img = join(folder, 'input.qcow2');
    const dataFile = join(folder, 'input.data');
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${dataFile}`, img, '1M');
    const b = await (await import('node:fs/promises')).readFile(img);
    // Rewrite the data file header extension to name /etc/hostname, keeping cluster 0 the same size.
    const at = b.indexOf(Buffer.from(dataFile));
    const oldEnd = at + Math.ceil(dataFile.length / 8) * 8;
    const evil = Buffer.from('/etc/hostname');
    const length = Buffer.alloc(4);
    length.writeUInt32BE(evil.length);
    const cluster0 = Buffer.concat([b.subarray(0, at - 4), length, evil, Buffer.alloc(8 - (evil.length % 8)), b.subarray(oldEnd, 65536)]).subarray(0, 65536);
    const patchedImage = Buffer.concat([cluster0, Buffer.alloc(65536 - cluster0.length), b.subarray(65536)]);
    await expectRefused('data-file', patchedImage, /data file '\/etc\/hostname' resolves to \/etc\/hostname, outside the image's folder/, ['input.data']);
  });

  it('backing file that points at itself', async () => {
    const folder = join(dir, 'self-backing');
    await mkdir(folder, { recursive: true });
    const img = join(folder, 'input.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'input.qcow2', '-F', 'qcow2', img, '1M');
    await expectRefused('self-backing', img, /backing chain loops/);
  });

  it('a backing loop of two images', async () => {
    const folder = join(dir, 'loop2');
    await mkdir(folder, { recursive: true });
    const a = join(folder, 'input.qcow2');
    const b = join(folder, 'b.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'b.qcow2', '-F', 'qcow2', a, '1M');
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'input.qcow2', '-F', 'qcow2', b, '1M');
    const out = join(folder, 'out.raw');
    const r = await ferry(['convert', '-O', 'raw', a, out], { timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/backing chain loops/);
  });

  it('allows an external backing file when asked to', async () => {
    const outside = join(dir, 'outside.raw');
    await qemuImg('create', '-q', '-f', 'raw', outside, '1M');
    const folder = join(dir, 'allowed');
    await mkdir(folder, { recursive: true });
    const img = join(folder, 'input.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', outside, '-F', 'raw', img, '1M');
    expect((await ferry(['convert', '-O', 'raw', img, join(folder, 'out.raw')])).code).toBe(1);
    const r = await ferry(['convert', '--allow-external', '-O', 'raw', img, join(folder, 'out.raw')]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
  });

  it('a FIFO given as the image is refused instead of blocking', async () => {
    const folder = join(dir, 'fifo');
    await mkdir(folder, { recursive: true });
    const fifo = join(folder, 'input.qcow2');
    const { execFileSync } = await import('node:child_process');
    execFileSync('mkfifo', [fifo]);
    const r = await ferry(['convert', '-O', 'raw', fifo, join(folder, 'out.raw')], { timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not a regular file or block device/);
  });

  it('never opens the source for writing: converting onto the source is refused', async () => {
    const folder = join(dir, 'onto-source');
    await mkdir(folder, { recursive: true });
    const img = join(folder, 'input.qcow2');
    await writeFile(img, valid);
    const r = await ferry(['convert', '-O', 'qcow2', img, img]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/is the source image/);
    const h = await open(img, 'r');
    const { size } = await h.stat();
    await h.close();
    expect(size).toBe(valid.length);
  });
});
