import { readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ferry, imagesIdentical, qemuImg, qemuIo, tempDir } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';

describe('ferry CLI, against qemu-img', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let source: string;
  let qcow: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir());
    source = await makePatternedRaw(dir);
    qcow = join(dir, 'mixed.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', qcow, '100M');
    await qemuIo(qcow, 'qcow2', 'write -P 1 0 1M', 'write -z 2M 1M', 'write -c -P 3 8M 1M', 'write -P 4 99M 1M');
  });
  afterAll(() => cleanup());

  it('map --output=json matches qemu-img map for raw and qcow2', async () => {
    for (const image of [source, qcow]) {
      const ours = (await ferry(['map', '--output=json', image])).stdout;
      const theirs = await qemuImg('map', '--output=json', image);
      expect(JSON.parse(ours)).toEqual(JSON.parse(theirs));
      expect(ours.trim()).toBe(theirs.trim());
    }
  });

  it('map human output lists the data ranges', async () => {
    const r = await ferry(['map', qcow]);
    expect(r.stdout.split('\n')[0]).toMatch(/^Offset\s+Length\s+Mapped to\s+File/);
    expect(r.stdout).toContain('0x0             0x100000        0x50000');
  });

  it('measure matches qemu-img measure', async () => {
    const cases: string[][] = [
      ['-O', 'qcow2', source],
      ['-O', 'qcow2', '-o', 'cluster_size=4k', source],
      ['-O', 'qcow2', '-o', 'extended_l2=on', qcow],
      ['-O', 'qcow2', '-o', 'refcount_bits=1,cluster_size=512', qcow],
      ['-O', 'raw', qcow],
      ['-O', 'qcow2', '--size', '10G'],
    ];
    for (const args of cases) {
      const ours = JSON.parse((await ferry(['measure', '--output=json', ...args])).stdout);
      const theirs = JSON.parse(await qemuImg('measure', '--output=json', ...args));
      expect(ours.required, args.join(' ')).toBe(theirs.required);
      expect(ours['fully-allocated'], args.join(' ')).toBe(theirs['fully-allocated']);
    }
  });

  it('compare: 0 and the same words for identical images, 1 and the first differing offset otherwise, 2 on error', async () => {
    const copy = join(dir, 'copy.qcow2');
    await ferry(['convert', '-O', 'qcow2', source, copy]);
    const same = await ferry(['compare', source, copy]);
    expect(same.code).toBe(0);
    expect(same.stdout).toBe('Images are identical.\n');

    const changed = join(dir, 'changed.raw');
    await ferry(['convert', '-O', 'raw', source, changed]);
    await qemuIo(changed, 'raw', 'write -P 0x42 33555000 10');
    const diff = await ferry(['compare', source, changed]);
    expect(diff.code).toBe(1);
    let qemuOut = '';
    try {
      await qemuImg('compare', source, changed);
    } catch (err) {
      qemuOut = (err as { stdout: string }).stdout;
    }
    expect(diff.stdout).toBe(qemuOut);

    const missing = await ferry(['compare', source, join(dir, 'nope.raw')]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/nope.raw: No such file or directory/);
  });

  it('compare: a longer image with a zero tail is identical unless -s', async () => {
    const longer = join(dir, 'longer.raw');
    await qemuImg('convert', '-O', 'raw', source, longer);
    await qemuImg('resize', '-q', '-f', 'raw', longer, '+1M');
    expect((await ferry(['compare', source, longer])).code).toBe(0);
    const strict = await ferry(['compare', '-s', source, longer]);
    expect(strict.code).toBe(1);
    expect(strict.stdout).toContain('Image size mismatch');
  });

  it('check: 0 for a clean image, 3 for leaks, 2 for corruption, like qemu-img', async () => {
    const image = join(dir, 'check.qcow2');
    await ferry(['convert', '-O', 'qcow2', source, image]);
    expect((await ferry(['check', image])).code).toBe(0);

    // A leak: raise the header cluster's refcount to 2.
    const { readFile } = await import('node:fs/promises');
    const b = await readFile(image);
    const reftable = Number(b.readBigUInt64BE(48));
    const block0 = Number(b.readBigUInt64BE(reftable));
    const leaky = Buffer.from(b);
    leaky.writeUInt16BE(2, block0);
    const leakPath = join(dir, 'leak.qcow2');
    await writeFile(leakPath, leaky);
    const leak = await ferry(['check', leakPath]);
    expect(leak.code).toBe(3);
    expect(leak.stdout).toContain('1 leaked clusters were found on the image.');
    await expect(qemuImg('check', leakPath)).rejects.toMatchObject({ code: 3 });

    // Corruption: zero the refcount of an in-use data cluster's block entry.
    const corrupt = Buffer.from(b);
    corrupt.writeUInt16BE(0, block0 + 2 * 10);
    const corruptPath = join(dir, 'corrupt.qcow2');
    await writeFile(corruptPath, corrupt);
    const bad = await ferry(['check', corruptPath]);
    expect(bad.code).toBe(2);
    expect(bad.stdout).toMatch(/errors were found on the image/);
    await expect(qemuImg('check', corruptPath)).rejects.toMatchObject({ code: 2 });

    const raw = await ferry(['check', source]);
    expect(raw.code).toBe(1);
    expect(raw.stderr).toMatch(/format raw does not support checks/);
  });

  it('info agrees with qemu-img on a raw image', async () => {
    const ours = JSON.parse((await ferry(['info', '--output=json', source])).stdout);
    const theirs = JSON.parse(await qemuImg('info', '--output=json', source));
    expect(ours['virtual-size']).toBe(theirs['virtual-size']);
    expect(ours.format).toBe(theirs.format);
    expect(ours['actual-size']).toBe(theirs['actual-size']);
  });

  it('--progress=json prints machine-readable progress ending in a done line', async () => {
    const out = join(dir, 'progress.qcow2');
    const r = await ferry(['convert', '--progress=json', '-O', 'qcow2', source, out]);
    expect(r.code).toBe(0);
    const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
    const last = lines[lines.length - 1];
    expect(last).toMatchObject({ type: 'done', operation: 'convert', done: 64 * 1024 * 1024, total: 64 * 1024 * 1024, percent: 100 });
    expect(last.bytesWritten).toBeGreaterThan(0);
  });

  it('-p on a non-terminal prints percentage steps to stderr', async () => {
    const r = await ferry(['convert', '-p', '-O', 'raw', source, join(dir, 'p.raw')]);
    expect(r.code).toBe(0);
    expect(r.stderr).toContain('(100.00/100%)');
  });

  it('-S 0 writes a fully allocated raw output; the default keeps holes', async () => {
    const sparse = join(dir, 'sparse.raw');
    const full = join(dir, 'full.raw');
    await ferry(['convert', '-O', 'raw', source, sparse]);
    await ferry(['convert', '-S', '0', '-O', 'raw', source, full]);
    expect(await imagesIdentical(sparse, full)).toBe(true);
    const [s, f] = [await stat(sparse), await stat(full)];
    expect(s.blocks * 512).toBeLessThan(16 * 1024 * 1024);
    expect(f.blocks * 512).toBeGreaterThanOrEqual(64 * 1024 * 1024);
  });

  it('-n writes into an existing raw target, zeroing what the source does not hold', async () => {
    const target = join(dir, 'existing.raw');
    await qemuImg('create', '-q', '-f', 'raw', target, '64M');
    await qemuIo(target, 'raw', 'write -P 0x99 0 64M');
    const r = await ferry(['convert', '-n', '-O', 'raw', source, target]);
    expect(r.stderr).toBe('');
    expect(await imagesIdentical(source, target)).toBe(true);
  });

  it('a failed conversion leaves no output or temporary file', async () => {
    const folder = join(dir, 'fail');
    const { mkdir } = await import('node:fs/promises');
    await mkdir(folder);
    // A qcow2 whose second data cluster points past the end of the file fails midway through the copy.
    const img = join(folder, 'broken.qcow2');
    await qemuImg('convert', '-O', 'qcow2', source, img);
    const { readFile } = await import('node:fs/promises');
    const b = await readFile(img);
    const l1 = Number(b.readBigUInt64BE(40));
    const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    b.writeBigUInt64BE((1n << 63n) | (1n << 40n), l2 + 8 * 100);
    await writeFile(img, b);
    const r = await ferry(['convert', '-O', 'qcow2', img, join(folder, 'out.qcow2')]);
    expect(r.code).toBe(1);
    expect(await readdir(folder)).toEqual(['broken.qcow2']);
  });

  it('errors are one line without a stack trace; --debug adds it', async () => {
    const r = await ferry(['info', join(dir, 'missing.qcow2')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`ferry info: ${join(dir, 'missing.qcow2')}: No such file or directory\n`);
    const d = await ferry(['--debug', 'info', join(dir, 'missing.qcow2')]);
    expect(d.stderr.split('\n').length).toBeGreaterThan(2);
  });

  it('--help explains every command and -o help lists format options', async () => {
    const help = await ferry(['--help']);
    expect(help.code).toBe(0);
    for (const cmd of ['info', 'convert', 'check', 'compare', 'map', 'measure']) expect(help.stdout).toContain(cmd);
    const convertHelp = await ferry(['convert', '--help']);
    expect(convertHelp.stdout).toContain('--target-is-zero');
    const opts = await ferry(['convert', '-O', 'qcow2', '-o', 'help', 'a', 'b']);
    expect(opts.stdout).toContain('compression_type');
    expect(opts.stdout).toContain('cluster_size');
  });
});
