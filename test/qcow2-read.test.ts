import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ferry, imagesIdentical, qemuImg, qemuIo, tempDir } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';

/** Every qcow2 variant qemu-img writes must read back, through Ferry, exactly as QEMU reads it. */
describe('reading qcow2 images produced by qemu-img', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let source: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir());
    source = await makePatternedRaw(dir);
  });
  afterAll(() => cleanup());

  const variants: Array<[string, string[]]> = [
    ['v2 (compat=0.10)', ['-o', 'compat=0.10']],
    ['v3 with 4 KiB clusters', ['-o', 'cluster_size=4k']],
    ['v3 with 2 MiB clusters', ['-o', 'cluster_size=2M']],
    ['512-byte clusters', ['-o', 'cluster_size=512']],
    ['zlib compressed', ['-c']],
    ['zlib compressed v2', ['-c', '-o', 'compat=0.10']],
    ['zstd compressed', ['-c', '-o', 'compression_type=zstd']],
    ['zstd compressed with 4 KiB clusters', ['-c', '-o', 'compression_type=zstd,cluster_size=4k']],
    ['extended L2', ['-o', 'extended_l2=on']],
    ['extended L2 with 2 MiB clusters', ['-o', 'extended_l2=on,cluster_size=2M']],
  ];

  for (const [name, args] of variants) {
    it(`converts ${name} to raw identical to what qemu reads`, async () => {
      const image = join(dir, `${name.replace(/\W+/g, '_')}.qcow2`);
      const out = join(dir, `${name.replace(/\W+/g, '_')}.raw`);
      await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...args, source, image);
      const r = await ferry(['convert', '-O', 'raw', image, out]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      expect(await imagesIdentical(image, out)).toBe(true);
      expect(await imagesIdentical(source, out)).toBe(true);
    });
  }

  it('reads extended L2 subclusters: allocated, zero and unallocated parts of one cluster over a backing file', async () => {
    const base = join(dir, 'sub-base.qcow2');
    const top = join(dir, 'sub-top.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
    await qemuIo(base, 'qcow2', 'write -P 0x33 0 8M');
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'sub-base.qcow2', '-F', 'qcow2', top);
    await qemuIo(top, 'qcow2', 'write -P 0x44 2k 2k', 'write -z 8k 4k', 'write -P 0x55 1M 64k', 'write -z 2M 128k');
    const out = join(dir, 'sub.raw');
    const r = await ferry(['convert', '-O', 'raw', top, out]);
    expect(r.stderr).toBe('');
    expect(await imagesIdentical(top, out)).toBe(true);
  });

  it('reads an overlay over a shorter backing file, with zero clusters hiding backing data', async () => {
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
    await qemuIo(base, 'qcow2', 'write -P 0x61 0 16M');
    await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, '24M');
    await qemuIo(top, 'qcow2', 'write -P 0x62 1M 1M', 'write -z 4M 2M', 'write -P 0x63 20M 1M');
    const out = join(dir, 'top.raw');
    const r = await ferry(['convert', '-O', 'raw', top, out]);
    expect(r.stderr).toBe('');
    expect(await imagesIdentical(top, out)).toBe(true);
    const info = JSON.parse((await ferry(['info', '--output=json', '--backing-chain', top])).stdout);
    const qemu = JSON.parse(await qemuImg('info', '--output=json', '--backing-chain', top));
    expect(info.map((i: Record<string, unknown>) => [i.filename, i.format, i['virtual-size'], i['backing-filename']])).toEqual(
      qemu.map((i: Record<string, unknown>) => [i.filename, i.format, i['virtual-size'], i['backing-filename']]),
    );
  });

  for (const raw of [true, false]) {
    it(`reads an image with an external data file (data_file_raw=${raw ? 'on' : 'off'})`, async () => {
      const image = join(dir, `df-${raw}.qcow2`);
      // qemu-img create takes the data file name relative to its working directory: give it a full path.
      await qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, `df-${raw}.data`)},data_file_raw=${raw ? 'on' : 'off'}`, image, '16M');
      await qemuIo(image, 'qcow2', 'write -P 0x12 1M 2M', 'write -P 0x13 9M 64k');
      const out = join(dir, `df-${raw}.raw`);
      const r = await ferry(['convert', '-O', 'raw', image, out]);
      expect(r.stderr).toBe('');
      expect(await imagesIdentical(image, out)).toBe(true);
      const ours = JSON.parse((await ferry(['info', '--output=json', image])).stdout);
      const theirs = JSON.parse(await qemuImg('info', '--output=json', image));
      expect(ours['format-specific']).toEqual(theirs['format-specific']);
    });
  }

  it('reads an odd virtual size', async () => {
    const image = join(dir, 'odd.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', image, String(10 * 1024 * 1024 + 4096 + 512));
    await qemuIo(image, 'qcow2', `write -P 0x99 ${10 * 1024 * 1024} 4608`);
    const out = join(dir, 'odd.raw');
    const r = await ferry(['convert', '-O', 'raw', image, out]);
    expect(r.code).toBe(0);
    expect(await imagesIdentical(image, out)).toBe(true);
    const ours = JSON.parse((await ferry(['info', '--output=json', out])).stdout);
    expect(ours['virtual-size']).toBe(10 * 1024 * 1024 + 4096 + 512);
  });

  it('reads a dirty image left by lazy refcounts, as qemu does', async () => {
    const image = join(dir, 'dirty.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-o', 'lazy_refcounts=on', source, image);
    const { open } = await import('node:fs/promises');
    const h = await open(image, 'r+');
    const flags = Buffer.alloc(8);
    await h.read(flags, 0, 8, 72);
    flags[7] |= 1; // incompatible bit 0: dirty
    await h.write(flags, 0, 8, 72);
    await h.close();
    const out = join(dir, 'dirty.raw');
    const r = await ferry(['convert', '-O', 'raw', image, out]);
    expect(r.stderr).toBe('');
    expect(await imagesIdentical(source, out)).toBe(true);
    const info = JSON.parse((await ferry(['info', '--output=json', image])).stdout);
    expect(info['dirty-flag']).toBe(true);
  });
});
