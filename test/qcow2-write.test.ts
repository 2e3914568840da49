import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ferry, imagesIdentical, qemuImg } from './helpers/env.js';
import { expectRawConversion, ferryInfo, ferryOk, inTempDirWithPatternedSource, qemuInfo } from './helpers/image-tests.js';

/** Every qcow2 Ferry writes must pass qemu-img check and read back identical to its source. */
describe('writing qcow2', () => {
  let dir: string;
  let source: string;
  inTempDirWithPatternedSource((made) => ({ dir, source } = made));

  const variants: Array<[string, string[]]> = [
    ['default v3', []],
    ['compat=0.10', ['-o', 'compat=0.10']],
    ['512-byte clusters', ['-o', 'cluster_size=512']],
    ['4 KiB clusters', ['-o', 'cluster_size=4k']],
    ['2 MiB clusters', ['-o', 'cluster_size=2M']],
    ['extended L2', ['-o', 'extended_l2=on']],
    ['refcount_bits=1', ['-o', 'refcount_bits=1']],
    ['refcount_bits=64', ['-o', 'refcount_bits=64']],
    ['lazy refcounts', ['-o', 'lazy_refcounts=on']],
    ['zlib compressed', ['-c']],
    ['zlib compressed v2', ['-c', '-o', 'compat=0.10']],
    ['zlib compressed with 512-byte clusters', ['-c', '-o', 'cluster_size=512']],
    ['zstd compressed', ['-c', '-o', 'compression_type=zstd']],
    ['zstd compressed with 2 MiB clusters', ['-c', '-o', 'compression_type=zstd,cluster_size=2M']],
    ['compressed with extended L2', ['-c', '-o', 'extended_l2=on']],
  ];

  for (const [name, args] of variants) {
    it(`${name}: passes qemu-img check and compares identical`, async () => {
      const out = join(dir, `${name.replace(/\W+/g, '_')}.qcow2`);
      await ferryOk(['convert', '-O', 'qcow2', ...args, source, out]);
      const check = JSON.parse(await qemuImg('check', '--output=json', out));
      expect(check['check-errors']).toBe(0);
      expect(check.corruptions ?? 0).toBe(0);
      expect(check.leaks ?? 0).toBe(0);
      expect(await imagesIdentical(source, out)).toBe(true);
      // Ferry reads back what it wrote.
      await expectRawConversion(out, join(dir, `${name.replace(/\W+/g, '_')}.back.raw`), source);
      // And Ferry's own check agrees with qemu's.
      const ours = await ferry(['check', out]);
      expect(ours.stdout).toContain('No errors were found on the image.');
      expect(ours.code).toBe(0);
    });
  }

  it('compressed output is smaller than plain, and zero clusters are not stored', async () => {
    const plain = join(dir, 'size-plain.qcow2');
    const packed = join(dir, 'size-packed.qcow2');
    await ferry(['convert', '-O', 'qcow2', source, plain]);
    await ferry(['convert', '-c', '-O', 'qcow2', source, packed]);
    const { stat } = await import('node:fs/promises');
    const [p, c] = [(await stat(plain)).size, (await stat(packed)).size];
    expect(c).toBeLessThan(p / 2);
    // ~8.1 MiB of non-zero data in a 64 MiB disk: the plain image holds data plus little metadata.
    expect(p).toBeLessThan(12 * 1024 * 1024);
  });

  it('reports the same info as qemu-img for what it writes', async () => {
    const out = join(dir, 'info.qcow2');
    await ferry(['convert', '-O', 'qcow2', '-o', 'cluster_size=128k,compression_type=zstd', source, out]);
    const ours = await ferryInfo(out);
    const theirs = await qemuInfo(out);
    for (const key of ['virtual-size', 'format', 'cluster-size', 'dirty-flag', 'format-specific']) expect(ours[key]).toEqual(theirs[key]);
  });

  it('converts qcow2 to qcow2 with a different cluster size and compression', async () => {
    const mid = join(dir, 'mid.qcow2');
    const out = join(dir, 'again.qcow2');
    await qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', source, mid);
    const r = await ferry(['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=1M', mid, out]);
    expect(r.code).toBe(0);
    expect(await imagesIdentical(source, out)).toBe(true);
  });

  it('records a backing file and format that qemu-img follows', async () => {
    const base = join(dir, 'bk-base.raw');
    await qemuImg('create', '-q', '-f', 'raw', base, '8M');
    const out = join(dir, 'bk-top.qcow2');
    const small = join(dir, 'small8.raw');
    await qemuImg('create', '-q', '-f', 'raw', small, '8M');
    await ferryOk(['convert', '-O', 'qcow2', '-o', 'backing_file=bk-base.raw,backing_fmt=raw', small, out]);
    const info = await qemuInfo(out);
    expect(info['backing-filename']).toBe('bk-base.raw');
    expect(info['backing-filename-format']).toBe('raw');
    expect(JSON.parse(await qemuImg('check', '--output=json', out))['check-errors']).toBe(0);
    expect(await imagesIdentical(small, out)).toBe(true);
  });

  it('refuses options qemu would refuse, naming the option', async () => {
    for (const [opts, word] of [
      ['cluster_size=3k', 'cluster_size'],
      ['compat=0.10,compression_type=zstd', 'compression_type'],
      ['compat=0.10,extended_l2=on', 'extended_l2'],
      ['refcount_bits=3', 'refcount_bits'],
      ['no_such_option=1', 'no_such_option'],
    ]) {
      const r = await ferry(['convert', '-O', 'qcow2', '-o', opts, source, join(dir, 'refused.qcow2')]);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(word);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
  });
});
