import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { qemuImg, qemuIo } from './helpers/env.js';
import {
  expectBackingChainAsQemu,
  expectFerryReadsQemuImage,
  expectRawConversion,
  ferryInfo,
  inTempDirWithPatternedSource,
  makeImage,
  makeQcow2OverlayOverShorterBase,
  qemuInfo,
} from './helpers/image-tests.js';

/** Every qcow2 variant qemu-img writes must read back, through Ferry, exactly as QEMU reads it. */
describe('reading qcow2 images produced by qemu-img', () => {
  let dir: string;
  let source: string;
  inTempDirWithPatternedSource((made) => ({ dir, source } = made));

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
      await expectFerryReadsQemuImage(source, 'qcow2', args, join(dir, name.replace(/\W+/g, '_')));
    });
  }

  it('reads extended L2 subclusters: allocated, zero and unallocated parts of one cluster over a backing file', async () => {
    const base = join(dir, 'sub-base.qcow2');
    const top = join(dir, 'sub-top.qcow2');
    await makeImage(base, 'qcow2', '8M', 'write -P 0x33 0 8M');
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'sub-base.qcow2', '-F', 'qcow2', top);
    await qemuIo(top, 'qcow2', 'write -P 0x44 2k 2k', 'write -z 8k 4k', 'write -P 0x55 1M 64k', 'write -z 2M 128k');
    await expectRawConversion(top, join(dir, 'sub.raw'));
  });

  it('reads an overlay over a shorter backing file, with zero clusters hiding backing data', async () => {
    const top = await makeQcow2OverlayOverShorterBase(dir, 16);
    await expectRawConversion(top, join(dir, 'top.raw'));
    await expectBackingChainAsQemu(top);
  });

  for (const raw of [true, false]) {
    it(`reads an image with an external data file (data_file_raw=${raw ? 'on' : 'off'})`, async () => {
      const image = join(dir, `df-${raw}.qcow2`);
      // qemu-img create takes the data file name relative to its working directory: give it a full path.
      await qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, `df-${raw}.data`)},data_file_raw=${raw ? 'on' : 'off'}`, image, '16M');
      await qemuIo(image, 'qcow2', 'write -P 0x12 1M 2M', 'write -P 0x13 9M 64k');
      await expectRawConversion(image, join(dir, `df-${raw}.raw`));
      expect((await ferryInfo(image))['format-specific']).toEqual((await qemuInfo(image))['format-specific']);
    });
  }

  it('reads an odd virtual size', async () => {
    const image = join(dir, 'odd.qcow2');
    await makeImage(image, 'qcow2', String(10 * 1024 * 1024 + 4096 + 512), `write -P 0x99 ${10 * 1024 * 1024} 4608`);
    const out = join(dir, 'odd.raw');
    await expectRawConversion(image, out);
    expect((await ferryInfo(out))['virtual-size']).toBe(10 * 1024 * 1024 + 4096 + 512);
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
    await expectRawConversion(image, join(dir, 'dirty.raw'), source);
    expect((await ferryInfo(image))['dirty-flag']).toBe(true);
  });
});
