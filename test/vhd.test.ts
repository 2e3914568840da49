import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ferry, qemuImg } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';
import { expectImageRefused } from './helpers/hostile.js';
import { ferryInfo, ferryOk, inTempDir, makeImage } from './helpers/image-tests.js';

const MIB = 1024 * 1024;

/** qemu-img compare with explicit formats (a fixed VHD probes as raw in qemu): true when identical. */
async function identical(a: string, formatA: string, b: string, formatB: string): Promise<boolean> {
  try {
    await qemuImg('compare', '-f', formatA, '-F', formatB, a, b);
    return true;
  } catch (err) {
    if ((err as { code?: number }).code === 1) return false;
    throw err;
  }
}

async function qemuInfo(path: string, format = 'vpc'): Promise<Record<string, unknown>> {
  return JSON.parse(await qemuImg('info', '-f', format, '--output=json', path));
}

/** A raw file of exactly `size` bytes (not rounded to sectors) with data at the start, middle and end. */
async function oddRaw(path: string, size: number): Promise<string> {
  const h = await open(path, 'w');
  try {
    await h.truncate(size);
    await h.write(Buffer.alloc(4096, 0x3c), 0, 4096, 0);
    await h.write(randomBytes(70_000), 0, 70_000, Math.floor(size / 2));
    await h.write(Buffer.alloc(1000, 0xe7), 0, 1000, size - 1000);
  } finally {
    await h.close();
  }
  return path;
}

// VHD structures written by hand, independently of Ferry's code, for what qemu cannot produce.
function checksum(buf: Buffer, at: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) if (i < at || i >= at + 4) sum += buf[i];
  return ~sum >>> 0;
}

function fixFooterChecksum(image: Buffer, at: number): void {
  const footer = image.subarray(at, at + 512);
  footer.writeUInt32BE(checksum(footer, 64), 64);
}

function fixHeaderChecksum(image: Buffer): void {
  const header = image.subarray(512, 1536);
  header.writeUInt32BE(checksum(header, 36), 36);
}

function footer(type: number, size: number, dataOffset: bigint, creator: string): Buffer {
  const b = Buffer.alloc(512);
  b.write('conectix', 0, 'latin1');
  b.writeUInt32BE(2, 8);
  b.writeUInt32BE(0x10000, 12);
  b.writeBigUInt64BE(dataOffset, 16);
  b.write(creator, 28, 'latin1');
  b.writeUInt32BE(0x000a0000, 32);
  b.write('Wi2k', 36, 'latin1');
  b.writeBigUInt64BE(BigInt(size), 40);
  b.writeBigUInt64BE(BigInt(size), 48);
  b.writeUInt16BE(65535, 56);
  b[58] = 16;
  b[59] = 255;
  b.writeUInt32BE(type, 60);
  randomBytes(16).copy(b, 68);
  b.writeUInt32BE(checksum(b, 64), 64);
  return b;
}

interface Locator {
  platform: string;
  data: Buffer;
}

interface ChildBlock {
  /** Sector bitmap, MSB of byte 0 = first sector of the block. */
  bitmap: Buffer;
  data: Buffer;
}

const BLOCK = 2 * MIB;

/**
 * A differencing VHD (disk type 4) as Hyper-V lays it out: footer copy, header with parent name and
 * locators, BAT, locator data, blocks (bitmap + data), footer.
 */
function differencingVhd(size: number, blocks: Array<ChildBlock | undefined>, locators: Locator[]): Buffer {
  const entries = Math.ceil(size / BLOCK);
  const batBytes = Math.ceil((entries * 4) / 512) * 512;
  const parts: Buffer[] = [];
  const foot = footer(4, size, 512n, 'win ');
  const header = Buffer.alloc(1024);
  header.write('cxsparse', 0, 'latin1');
  header.writeBigUInt64BE(0xffffffffffffffffn, 8);
  header.writeBigUInt64BE(1536n, 16);
  header.writeUInt32BE(0x10000, 24);
  header.writeUInt32BE(entries, 28);
  header.writeUInt32BE(BLOCK, 32);
  Buffer.from('parent.vhd', 'utf16le').swap16().copy(header, 64);
  const bat = Buffer.alloc(batBytes, 0xff);
  let at = 1536 + batBytes;
  const locatorData: Buffer[] = [];
  locators.forEach((l, i) => {
    const space = Math.ceil(l.data.length / 512) * 512 || 512;
    const e = 576 + i * 24;
    header.write(l.platform, e, 'latin1');
    header.writeUInt32BE(space, e + 4);
    header.writeUInt32BE(l.data.length, e + 8);
    header.writeBigUInt64BE(BigInt(at), e + 16);
    const padded = Buffer.alloc(space);
    l.data.copy(padded);
    locatorData.push(padded);
    at += space;
  });
  header.writeUInt32BE(checksum(header, 36), 36);
  const blockData: Buffer[] = [];
  blocks.forEach((b, i) => {
    if (!b) return;
    bat.writeUInt32BE(at / 512, i * 4);
    const bitmap = Buffer.alloc(512);
    b.bitmap.copy(bitmap);
    blockData.push(bitmap, b.data);
    at += 512 + BLOCK;
  });
  parts.push(foot, header, bat, ...locatorData, ...blockData, foot);
  return Buffer.concat(parts);
}

const w2ru = (path: string): Locator => ({ platform: 'W2ru', data: Buffer.from(path, 'utf16le') });
const w2ku = (path: string): Locator => ({ platform: 'W2ku', data: Buffer.from(path, 'utf16le') });

describe('reading VHDs produced by qemu-img', () => {
  let dir: string;
  const sources: Array<[string, string]> = [];

  inTempDir(async (made) => {
    dir = made;
    sources.push(['64 MiB patterned', await makePatternedRaw(dir)]);
    sources.push(['odd size 10M+4.5k', await oddRaw(join(dir, 'odd1.raw'), 10 * MIB + 4096 + 512)]);
    sources.push(['odd size 12345678 bytes', await oddRaw(join(dir, 'odd2.raw'), 12345678)]);
  });

  const variants: Array<[string, string]> = [
    ['dynamic', 'subformat=dynamic'],
    ['fixed', 'subformat=fixed'],
    ['dynamic force_size', 'subformat=dynamic,force_size=on'],
    ['fixed force_size', 'subformat=fixed,force_size=on'],
  ];

  it('converts every subformat and size to raw as qemu reads it, with qemu\'s virtual size', async () => {
    for (const [sourceName, source] of sources) {
      for (const [variant, opts] of variants) {
        const what = `${sourceName}, ${variant}`;
        const image = join(dir, `${what.replace(/\W+/g, '_')}.vhd`);
        const out = join(dir, `${what.replace(/\W+/g, '_')}.raw`);
        await qemuImg('convert', '-f', 'raw', '-O', 'vpc', '-o', opts, source, image);
        // No -f: Ferry probes fixed disks by their footer too.
        await ferryOk(['convert', '-O', 'raw', image, out], what);
        const qemu = await qemuInfo(image);
        expect((await stat(out)).size, what).toBe(qemu['virtual-size']);
        expect(await identical(image, 'vpc', out, 'raw'), what).toBe(true);
        expect(await identical(source, 'raw', out, 'raw'), what).toBe(true);
        const ours = await ferryInfo(image);
        for (const key of ['virtual-size', 'format', 'cluster-size']) expect(ours[key], `${what}: ${key}`).toEqual(qemu[key]);
      }
    }
  });

  it('agrees with qemu-img info on the size of empty images of many sizes (CHS rounding, force_size, > 127 GiB)', async () => {
    for (const size of ['1M', '100M', '3G', '127G', '200G', '2000G']) {
      for (const opts of ['subformat=dynamic', 'subformat=dynamic,force_size=on']) {
        const image = join(dir, `empty-${size}-${opts.length}.vhd`);
        await qemuImg('create', '-q', '-f', 'vpc', '-o', opts, image, size);
        const ours = await ferryInfo(image);
        const theirs = await qemuInfo(image);
        expect([size, opts, ours['virtual-size'], ours['cluster-size']]).toEqual([size, opts, theirs['virtual-size'], theirs['cluster-size']]);
      }
    }
  });

  it('sizes images by CHS geometry or current_size depending on the creator, as QEMU 7.2 does', async () => {
    const base = join(dir, 'creator-base.vhd');
    await qemuImg('create', '-q', '-f', 'vpc', base, '64M');
    const original = await readFile(base);
    // current_size 1 MiB below the geometry's size, so the two rules give different answers.
    const chsBytes = original.readUInt16BE(56) * original[58] * original[59] * 512;
    const cases: Array<[string, boolean]> = [
      ['vpc ', false],
      ['qemu', false],
      ['qem2', true],
      ['win ', true],
      ['d2v ', true],
      ['CTXS', true],
      ['tap\0', true],
      ['wa\0\0', false], // Azure: QEMU 7.2 still uses CHS for it (later QEMU versions use current_size)
      ['xyz ', false],
    ];
    for (const [creator, bySize] of cases) {
      const b = Buffer.from(original);
      b.write(creator, 28, 'latin1');
      b.writeBigUInt64BE(BigInt(chsBytes - MIB), 48);
      fixFooterChecksum(b, 0);
      const image = join(dir, `creator-${creator.replace(/\W/g, '_')}.vhd`);
      await writeFile(image, b);
      const theirs = (await qemuInfo(image))['virtual-size'];
      expect([creator, theirs]).toEqual([creator, bySize ? chsBytes - MIB : chsBytes]);
      expect([creator, (await ferryInfo(image))['virtual-size']]).toEqual([creator, theirs]);
    }
    // The maximum geometry means "too large for CHS": current_size, whoever the creator.
    const b = Buffer.from(original);
    b.writeUInt16BE(65535, 56);
    b[58] = 16;
    b[59] = 255;
    b.writeBigUInt64BE(BigInt(chsBytes - MIB), 48);
    fixFooterChecksum(b, 0);
    const image = join(dir, 'creator-maxgeometry.vhd');
    await writeFile(image, b);
    expect((await ferryInfo(image))['virtual-size']).toBe((await qemuInfo(image))['virtual-size']);
    expect((await qemuInfo(image))['virtual-size']).toBe(chsBytes - MIB);
  });

  it('ignores a garbage current_size where QEMU does (CHS-sized creators)', async () => {
    const image = join(dir, 'garbage-size.vhd');
    await qemuImg('convert', '-f', 'raw', '-O', 'vpc', sources[1][1], image);
    const b = await readFile(image);
    b.writeBigUInt64BE(1n << 62n, 48);
    fixFooterChecksum(b, 0);
    await writeFile(image, b);
    const out = join(dir, 'garbage-size.raw');
    await ferryOk(['convert', '-O', 'raw', image, out]);
    expect(await identical(image, 'vpc', out, 'raw')).toBe(true);
    expect((await ferryInfo(image))['virtual-size']).toBe((await qemuInfo(image))['virtual-size']);
  });

  it('map --output=json matches qemu-img map for a dynamic VHD', async () => {
    const image = join(dir, 'map.vhd');
    await qemuImg('convert', '-f', 'raw', '-O', 'vpc', sources[0][1], image);
    const ours = await ferryOk(['map', '--output=json', image]);
    expect(JSON.parse(ours.stdout)).toEqual(JSON.parse(await qemuImg('map', '-f', 'vpc', '--output=json', image)));
  });

  it('converts a qemu dynamic VHD to qcow2 identically', async () => {
    const image = join(dir, 'cross.vhd');
    const out = join(dir, 'cross.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'vpc', sources[0][1], image);
    await ferryOk(['convert', '-O', 'qcow2', image, out]);
    expect(await identical(image, 'vpc', out, 'qcow2')).toBe(true);
  });
});

describe('writing VHDs', () => {
  let dir: string;
  let source: string;
  let odd: string;

  inTempDir(async (made) => {
    dir = made;
    source = await makePatternedRaw(dir);
    odd = await oddRaw(join(dir, 'odd.raw'), 10 * MIB + 4096 + 512);
  });

  // [name, Ferry's options, the qemu-img options that must give the same image]
  const variants: Array<[string, string[], string[]]> = [
    ['dynamic (default)', [], []],
    ['fixed', ['-o', 'subformat=fixed'], ['-o', 'subformat=fixed']],
    ['dynamic force_size', ['-o', 'force_size=on'], ['-o', 'force_size=on']],
    ['fixed force_size', ['-o', 'subformat=fixed,force_size=on'], ['-o', 'subformat=fixed,force_size=on']],
  ];

  for (const [name, ours, theirs] of variants) {
    it(`${name}: qemu reads it identical to the source, with the size and layout qemu-img itself writes`, async () => {
      for (const src of [source, odd]) {
        const base = `${name}-${src === source ? 'patterned' : 'odd'}`.replace(/\W+/g, '_');
        const out = join(dir, `${base}.vhd`);
        const reference = join(dir, `${base}.qemu.vhd`);
        await ferryOk(['convert', '-O', 'vhd', ...ours, src, out]);
        await qemuImg('convert', '-f', 'raw', '-O', 'vpc', ...theirs, src, reference);
        const [mine, qemus] = [await qemuInfo(out), await qemuInfo(reference)];
        expect(mine['virtual-size'], base).toBe(qemus['virtual-size']);
        expect(mine['cluster-size'], base).toBe(qemus['cluster-size']);
        // Same allocated blocks, same metadata: the same file size.
        expect((await stat(out)).size, base).toBe((await stat(reference)).size);
        expect(await identical(src, 'raw', out, 'vpc'), base).toBe(true);
        // And Ferry reads back what it wrote.
        const back = join(dir, `${base}.back.raw`);
        await ferryOk(['convert', '-O', 'raw', out, back]);
        expect(await identical(src, 'raw', back, 'raw'), base).toBe(true);
      }
    });
  }

  it('writes 512 KiB blocks when asked (block_size, a Ferry extension qemu reads)', async () => {
    const out = join(dir, 'small-blocks.vhd');
    const r = await ferry(['convert', '-O', 'vpc', '-o', 'block_size=512k', source, out]);
    expect(r.stderr).toBe('');
    const info = await qemuInfo(out);
    expect(info['cluster-size']).toBe(512 * 1024);
    expect(await identical(source, 'raw', out, 'vpc')).toBe(true);
    const back = join(dir, 'small-blocks.raw');
    expect((await ferry(['convert', '-O', 'raw', out, back])).stderr).toBe('');
    expect(await identical(source, 'raw', back, 'raw')).toBe(true);
    const bad = await ferry(['convert', '-O', 'vhd', '-o', 'block_size=3M', source, join(dir, 'bad-blocks.vhd')]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/block_size 3145728 must be a power of two from 512k to 2M/);
  });

  it('azure=on: a fixed VHD of whole MiB, zero padded, that qemu reads with the same content', async () => {
    const out = join(dir, 'azure.vhd');
    await ferryOk(['convert', '-O', 'vhd', '-o', 'azure=on', odd, out]);
    const size = Math.ceil((10 * MIB + 4096 + 512) / MIB) * MIB;
    expect((await qemuInfo(out))['virtual-size']).toBe(size);
    expect((await stat(out)).size).toBe(size + 512);
    const tail = (await readFile(out)).subarray(size);
    expect(tail.toString('latin1', 0, 8)).toBe('conectix');
    expect(tail.readUInt32BE(60)).toBe(2); // fixed
    expect(tail.readBigUInt64BE(48)).toBe(BigInt(size)); // current_size: what Azure reads
    expect(await identical(odd, 'raw', out, 'vpc')).toBe(true);
    const conflict = await ferry(['convert', '-O', 'vhd', '-o', 'azure=on,subformat=dynamic', odd, join(dir, 'azure-dyn.vhd')]);
    expect(conflict.code).toBe(1);
    expect(conflict.stderr).toMatch(/azure=on writes a fixed VHD/);
    expect(await readdir(dir)).not.toContain('azure-dyn.vhd');
  });

  it('converts qcow2 to vhd identically, and sizes past the CHS limit and at 2040 GiB like qemu', async () => {
    const qcow = join(dir, 'src.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', source, qcow);
    const out = join(dir, 'from-qcow2.vhd');
    expect((await ferry(['convert', '-O', 'vhd', qcow, out])).stderr).toBe('');
    expect(await identical(qcow, 'qcow2', out, 'vpc')).toBe(true);

    for (const size of ['300G', '2040G']) {
      const empty = join(dir, `empty-${size}.qcow2`);
      await makeImage(empty, 'qcow2', size, 'write -P 0x42 100M 64k');
      const mine = join(dir, `big-${size}.vhd`);
      const theirs = join(dir, `big-${size}.qemu.vhd`);
      const r = await ferry(['convert', '-O', 'vhd', empty, mine]);
      expect(r.stderr).toBe('');
      expect(r.maxRssKiB).toBeLessThan(256 * 1024);
      await qemuImg('convert', '-O', 'vpc', empty, theirs);
      expect((await qemuInfo(mine))['virtual-size']).toBe((await qemuInfo(theirs))['virtual-size']);
      expect((await stat(mine)).size).toBe((await stat(theirs)).size);
      expect(await identical(mine, 'vpc', theirs, 'vpc')).toBe(true);
    }

    const tooBig = join(dir, 'too-big.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', tooBig, '2041G');
    const r = await ferry(['convert', '-O', 'vhd', tooBig, join(dir, 'too-big.vhd')]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/exceeds the VHD maximum of 2040 GiB/);
  });
});

describe('differencing VHDs (built by hand: qemu cannot read them with their parent)', () => {
  let dir: string;
  let parentRaw: Buffer;
  let size: number;

  inTempDir(async (made) => {
    dir = made;
    // Every sector of the parent differs from its neighbours, so a misplaced read shows.
    const raw = Buffer.alloc(8 * MIB);
    for (let s = 0; s < raw.length / 512; s++) raw.fill((s * 7 + 1) & 0xff, s * 512, s * 512 + 512);
    const rawPath = join(dir, 'parent.raw');
    await writeFile(rawPath, raw);
    await mkdir(join(dir, 'chain'));
    await qemuImg('convert', '-f', 'raw', '-O', 'vpc', rawPath, join(dir, 'chain', 'parent.vhd'));
    size = (await qemuInfo(join(dir, 'chain', 'parent.vhd')))['virtual-size'] as number;
    parentRaw = Buffer.alloc(size);
    raw.copy(parentRaw);
  });

  /** Child blocks with every kind of bitmap, and the guest content they must produce over the parent. */
  function childContent(): { blocks: Array<ChildBlock | undefined>; expected: Buffer } {
    const expected = Buffer.from(parentRaw);
    const mixedBitmap = Buffer.alloc(512);
    mixedBitmap[0] = 0xf0; // sectors 0-3
    mixedBitmap[2] = 0xaa; // every other sector of 16-23
    mixedBitmap.fill(0xff, 100, 200); // sectors 800-1599
    const mixed = Buffer.alloc(BLOCK, 0xe0);
    const full = Buffer.alloc(BLOCK);
    full.fill(0xd1, 0, BLOCK / 2); // the second half holds zeroes that hide the parent
    const blocks: Array<ChildBlock | undefined> = [
      { bitmap: mixedBitmap, data: mixed },
      undefined,
      { bitmap: Buffer.alloc(512, 0xff), data: full },
      { bitmap: Buffer.alloc(512), data: Buffer.alloc(BLOCK, 0x99) }, // allocated, but no sector present
    ];
    blocks.forEach((b, i) => {
      if (!b) return;
      for (let s = 0; s < BLOCK / 512; s++) {
        const guest = i * BLOCK + s * 512;
        if (guest < size && b.bitmap[s >> 3] & (0x80 >> (s & 7))) b.data.copy(expected, guest, s * 512, s * 512 + 512);
      }
    });
    return { blocks, expected };
  }

  it('reads as the parent overlaid with the sectors its bitmaps mark, through the relative locator', async () => {
    const { blocks, expected } = childContent();
    // The absolute locator is a Windows path that exists nowhere here: the relative one must be chosen.
    const child = join(dir, 'chain', 'child.vhd');
    await writeFile(child, differencingVhd(size, blocks, [w2ku('C:\\Images\\parent.vhd'), w2ru('.\\parent.vhd')]));
    const out = join(dir, 'child.raw');
    await ferryOk(['convert', '-O', 'raw', child, out]);
    expect((await readFile(out)).equals(expected)).toBe(true);
    // Through the pipeline into another format as well.
    const qcow = join(dir, 'child.qcow2');
    expect((await ferry(['convert', '-O', 'qcow2', child, qcow])).code).toBe(0);
    expect(await identical(qcow, 'qcow2', out, 'raw')).toBe(true);

    const chain = JSON.parse((await ferry(['info', '--output=json', '--backing-chain', child])).stdout);
    expect(chain.map((i: Record<string, unknown>) => [i.format, i['virtual-size'], i['backing-filename']])).toEqual([
      ['vpc', size, './parent.vhd'],
      ['vpc', size, undefined],
    ]);
    // qemu opens the child alone (without its parent): it must agree on the size.
    expect(chain[0]['virtual-size']).toBe((await qemuInfo(child))['virtual-size']);
  });

  it('refuses a parent outside the image folder unless --allow-external', async () => {
    const { blocks } = childContent();
    const folder = join(dir, 'chain', 'nested');
    await mkdir(folder);
    const child = join(folder, 'child.vhd');
    await writeFile(child, differencingVhd(size, blocks, [w2ru('..\\parent.vhd')]));
    const refused = await ferry(['convert', '-O', 'raw', child, join(folder, 'out.raw')]);
    expect(refused.code).toBe(1);
    expect(refused.stderr.trim().split('\n')).toHaveLength(1);
    expect(refused.stderr).toMatch(/outside the image's folder.*--allow-external/);
    expect(await readdir(folder)).toEqual(['child.vhd']);
    await ferryOk(['convert', '--allow-external', '-O', 'raw', child, join(folder, 'out.raw')]);
  });
});

/**
 * Images from strangers: a one-line error naming the file and the field, bounded memory, no hang, and no
 * output or temporary file left behind.
 */
describe('hostile VHD inputs', () => {
  let dir: string;
  let dynamic: Buffer;
  let fixed: Buffer;

  inTempDir(async (made) => {
    dir = made;
    const raw = join(dir, 'valid.raw');
    await makeImage(raw, 'raw', '64M', 'write -P 0xab 0 1M', 'write -P 0xcd 40M 1M');
    await qemuImg('convert', '-f', 'raw', '-O', 'vpc', raw, join(dir, 'valid.vhd'));
    await qemuImg('convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=fixed', raw, join(dir, 'fixed.vhd'));
    dynamic = await readFile(join(dir, 'valid.vhd'));
    fixed = await readFile(join(dir, 'fixed.vhd'));
  });

  function expectRefused(name: string, image: Buffer, pattern: RegExp, args: string[] = []): Promise<void> {
    return expectImageRefused(join(dir, name), 'input.vhd', image, pattern, args);
  }

  /** The dynamic image with `edit` applied and its footer copy and header checksums made valid again. */
  function patched(edit: (b: Buffer) => void): Buffer {
    const b = Buffer.from(dynamic);
    edit(b);
    fixFooterChecksum(b, 0);
    fixHeaderChecksum(b);
    return b;
  }

  const batEntry = (b: Buffer, i: number, value: number) => b.writeUInt32BE(value, 1536 + i * 4);

  it('file shorter than a footer', () => expectRefused('tiny', dynamic.subarray(0, 100), /too small for a VHD footer/));
  it('truncated inside the dynamic header', () => expectRefused('trunc-header', dynamic.subarray(0, 1000), /data_offset 512: .*past the end of the file/));
  it('truncated data blocks', () => expectRefused('trunc-blocks', dynamic.subarray(0, dynamic.length - MIB), /BAT entry \d+: .*truncated/));
  it('not a VHD at all, opened as one', () => expectRefused('garbage', randomBytes(8192), /not a VHD image/, ['-f', 'vhd']));

  it('bad footer checksum', () => {
    const b = Buffer.from(dynamic);
    b[40] ^= 1;
    return expectRefused('footer-checksum', b, /footer copy at offset 0: checksum 0x[0-9a-f]+ does not match/);
  });

  it('bad dynamic header checksum', () => {
    const b = Buffer.from(dynamic);
    b[512 + 40] ^= 1;
    return expectRefused('header-checksum', b, /dynamic disk header checksum/);
  });

  it('bad fixed footer checksum', () => {
    const b = Buffer.from(fixed);
    b[b.length - 512 + 40] ^= 1;
    return expectRefused('fixed-checksum', b, /footer at the end of the file: checksum/, ['-f', 'vpc']);
  });

  it('dynamic footer at the end without its copy at offset 0', () => {
    const b = Buffer.from(dynamic);
    b.fill(0, 0, 512);
    return expectRefused('no-copy', b, /disk type 3, but only a fixed disk/, ['-f', 'vhd']);
  });

  it('unknown disk type', () => expectRefused('disk-type', patched((b) => b.writeUInt32BE(7, 60)), /disk type 7 is none of/));
  it('data_offset garbage', () => expectRefused('data-offset', patched((b) => b.writeBigUInt64BE(1n << 60n, 16)), /data_offset 1152921504606846976/));
  it('header cookie missing', () => expectRefused('header-cookie', patched((b) => b.write('xxxxxxxx', 512, 'latin1')), /no 'cxsparse' cookie/));
  it('block size 0', () => expectRefused('block-zero', patched((b) => b.writeUInt32BE(0, 512 + 32)), /block_size 0 is not a power of two/));
  it('block size not a power of two', () => expectRefused('block-odd', patched((b) => b.writeUInt32BE(3 * MIB, 512 + 32)), /block_size 3145728 is not a power of two/));
  it('block size 2 GiB', () => expectRefused('block-huge', patched((b) => b.writeUInt32BE(2 ** 31, 512 + 32)), /BAT entry 0: .*past the end of the file/));
  it('max_table_entries 2^32-1', () => expectRefused('entries-max', patched((b) => b.writeUInt32BE(0xffffffff, 512 + 28)), /max_table_entries 4294967295 exceeds/));
  it('max_table_entries 2^28: a BAT larger than the file', () =>
    expectRefused('entries-huge', patched((b) => b.writeUInt32BE(2 ** 28, 512 + 28)), /table_offset 1536: the BAT of 268435456 entries extends past the end/));
  it('max_table_entries too small for the size', () => expectRefused('entries-small', patched((b) => b.writeUInt32BE(1, 512 + 28)), /cover less than the virtual size/));
  it('BAT past the end of the file', () => expectRefused('bat-eof', patched((b) => b.writeBigUInt64BE(1n << 40n, 512 + 16)), /table_offset 1099511627776/));
  it('BAT entry 0xFFFFFFFE', () => expectRefused('bat-fffffffe', patched((b) => batEntry(b, 0, 0xfffffffe)), /BAT entry 0: block at sector 4294967294 .*past the end/));
  it('BAT entry pointing past the end of the file', () => expectRefused('bat-entry-eof', patched((b) => batEntry(b, 3, 0x00200000)), /BAT entry 3: .*past the end/));

  it('current_size 2^62 where it is the size', () =>
    expectRefused(
      'current-size',
      patched((b) => {
        b.write('qem2', 28, 'latin1');
        b.writeBigUInt64BE(1n << 62n, 48);
      }),
      /exceeds the VHD maximum of 2040 GiB/,
    ));

  it('parent locator with a huge data length', async () => {
    const size = 4 * MIB;
    const image = differencingVhd(size, [], [w2ru('.\\parent.vhd')]);
    image.writeUInt32BE(1 << 30, 512 + 576 + 8);
    fixHeaderChecksum(image);
    await expectRefused('locator-length', image, /parent locator W2ru: data length 1073741824 exceeds/);
  });

  it('parent locator pointing outside the folder, relative and as a Mac URL', async () => {
    await expectRefused('locator-rel', differencingVhd(4 * MIB, [], [w2ru('..\\..\\..\\..\\..\\etc\\hostname')]), /outside the image's folder/);
    await expectRefused('locator-macx', differencingVhd(4 * MIB, [], [{ platform: 'MacX', data: Buffer.from('file:///etc/hostname') }]), /outside the image's folder/);
  });
});
