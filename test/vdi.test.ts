import { execFile } from 'node:child_process';
import { mkdir, open, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { ferry, imagesIdentical, qemuImg, requireTool } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';
import { expectImageRefused } from './helpers/hostile.js';
import { expectFerryReadsQemuImage, ferryInfo, ferryOk, inTempDir, makeImage, qemuInfo } from './helpers/image-tests.js';

const MiB = 1024 * 1024;
/** Not a whole number of sectors: QEMU rounds the VDI disk size up, and Ferry must do the same. */
const ODD_SIZE = 10 * MiB + 4096 + 300;

/** Header fields (little-endian) the hostile inputs patch. */
const AT = {
  signature: 0x40,
  version: 0x44,
  headerSize: 0x48,
  imageType: 0x4c,
  offsetBmap: 0x154,
  offsetData: 0x158,
  sectorSize: 0x168,
  diskSize: 0x170,
  blockSize: 0x178,
  blockExtra: 0x17c,
  blocksInImage: 0x180,
  blocksAllocated: 0x184,
  uuidParent: 0x1b8,
};
const OFFSET_BMAP = 0x200;

type Variant = { name: string; options: string[] };
const VARIANTS: Variant[] = [
  { name: 'dynamic', options: [] },
  { name: 'static', options: ['-o', 'static=on'] },
];

/** The header fields that describe the layout, read straight from the file. */
async function layoutFields(image: string): Promise<Record<string, number | bigint>> {
  const h = await open(image, 'r');
  const header = Buffer.alloc(512);
  await h.read(header, 0, 512, 0);
  await h.close();
  const fields: Record<string, number | bigint> = { diskSize: header.readBigUInt64LE(AT.diskSize) };
  for (const key of ['signature', 'version', 'headerSize', 'imageType', 'offsetBmap', 'offsetData', 'sectorSize', 'blockSize', 'blocksInImage', 'blocksAllocated'] as const) {
    fields[key] = header.readUInt32LE(AT[key]);
  }
  return fields;
}

async function virtualSize(image: string): Promise<number> {
  return (await qemuInfo(image))['virtual-size'];
}

interface MapRow {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/** Which guest ranges qemu-img map calls data and which zero, wherever in the file the blocks sit. */
async function allocation(image: string): Promise<MapRow[]> {
  const rows: MapRow[] = [];
  for (const { start, length, data, zero } of JSON.parse(await qemuImg('map', '--output=json', image)) as MapRow[]) {
    const prev = rows[rows.length - 1];
    if (prev && prev.data === data && prev.zero === zero) prev.length += length;
    else rows.push({ start, length, data, zero });
  }
  return rows;
}

/** qemu-img check's exit status: 0 clean, 2 corruptions. */
async function qemuCheckStatus(image: string): Promise<number> {
  requireTool('qemu-img', 'qemu-utils');
  try {
    await promisify(execFile)('qemu-img', ['check', image]);
    return 0;
  } catch (err) {
    return (err as { code: number }).code;
  }
}

describe('vdi', () => {
  let dir: string;
  let sources: Record<string, string>;

  inTempDir(async (made) => {
    dir = made;
    const odd = join(dir, 'odd.raw');
    const h = await open(odd, 'w');
    await h.truncate(ODD_SIZE);
    await h.write(Buffer.alloc(8192, 0x3c), 0, 8192, 3 * MiB - 4096); // across a block boundary
    await h.write(Buffer.alloc(300, 0xee), 0, 300, ODD_SIZE - 300); // the last, partial sector
    await h.close();
    sources = { patterned: await makePatternedRaw(dir), odd };
  });

  for (const [sourceName, variant] of [['patterned', VARIANTS[0]], ['patterned', VARIANTS[1]], ['odd', VARIANTS[0]], ['odd', VARIANTS[1]]] as const) {
    it(`reads a ${variant.name} VDI written by qemu-img (${sourceName} source)`, async () => {
      const { image, out } = await expectFerryReadsQemuImage(sources[sourceName], 'vdi', variant.options, join(dir, `qemu-${sourceName}-${variant.name}`));
      expect((await stat(out)).size).toBe(await virtualSize(image));
    });

    it(`writes a ${variant.name} VDI that qemu-img reads and checks clean (${sourceName} source)`, async () => {
      const ours = join(dir, `ferry-${sourceName}-${variant.name}.vdi`);
      const theirs = join(dir, `theirs-${sourceName}-${variant.name}.vdi`);
      await ferryOk(['convert', '-f', 'raw', '-O', 'vdi', ...variant.options, sources[sourceName], ours]);
      expect(await qemuImg('check', ours)).toContain('No errors were found on the image.');
      expect(await imagesIdentical(sources[sourceName], ours)).toBe(true);
      await qemuImg('convert', '-f', 'raw', '-O', 'vdi', ...variant.options, sources[sourceName], theirs);
      expect(await virtualSize(ours)).toBe(await virtualSize(theirs));
      expect(await layoutFields(ours)).toEqual(await layoutFields(theirs));
      // The same blocks allocated (dynamic) or the same preallocated length (static) as QEMU's own output.
      if (variant.name === 'dynamic') expect(await allocation(ours)).toEqual(await allocation(theirs));
      else expect((await stat(ours)).size).toBe((await stat(theirs)).size);
      expect((await readdir(dir)).filter((f) => f.includes('.ferry-'))).toEqual([]);
    });
  }

  it('reads discarded blocks (0xfffffffe) as zeroes, as qemu does', async () => {
    const image = join(dir, 'discarded.vdi');
    const out = join(dir, 'discarded.raw');
    await qemuImg('convert', '-f', 'raw', '-O', 'vdi', sources.odd, image);
    const b = await readFile(image);
    expect(b.readUInt32LE(OFFSET_BMAP + 3 * 4)).toBeLessThan(0xfffffffe); // block 3 holds data
    b.writeUInt32LE(0xfffffffe, OFFSET_BMAP + 3 * 4);
    await writeFile(image, b);
    expect((await ferry(['convert', '-O', 'raw', image, out])).code).toBe(0);
    expect(await imagesIdentical(image, out)).toBe(true);
    expect(await imagesIdentical(sources.odd, out)).toBe(false);
  });

  it('writes every block with -S 0, as qemu-img does', async () => {
    const ours = join(dir, 'full.vdi');
    const theirs = join(dir, 'full-theirs.vdi');
    expect((await ferry(['convert', '-S', '0', '-f', 'raw', '-O', 'vdi', sources.odd, ours])).code).toBe(0);
    await qemuImg('convert', '-S', '0', '-f', 'raw', '-O', 'vdi', sources.odd, theirs);
    expect(await allocation(ours)).toEqual(await allocation(theirs));
    expect(await qemuImg('check', ours)).toContain('No errors were found on the image.');
    expect(await imagesIdentical(sources.odd, ours)).toBe(true);
  });

  it('converts vdi to qcow2 and qcow2 to vdi', async () => {
    const vdi = join(dir, 'cross.vdi');
    const qcow2 = join(dir, 'cross.qcow2');
    const back = join(dir, 'cross-back.vdi');
    await qemuImg('convert', '-f', 'raw', '-O', 'vdi', sources.patterned, vdi);
    expect((await ferry(['convert', '-O', 'qcow2', vdi, qcow2])).code).toBe(0);
    expect(await imagesIdentical(vdi, qcow2)).toBe(true);
    const fromQemuQcow2 = join(dir, 'cross-source.qcow2');
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', sources.patterned, fromQemuQcow2);
    const r = await ferry(['convert', '-O', 'vdi', fromQemuQcow2, back]);
    expect(r.stderr).toBe('');
    expect(await imagesIdentical(fromQemuQcow2, back)).toBe(true);
    expect(await qemuImg('check', back)).toContain('No errors were found on the image.');
  });

  it('info, map and check agree with qemu-img', async () => {
    const image = join(dir, 'report.vdi');
    await qemuImg('convert', '-f', 'raw', '-O', 'vdi', sources.odd, image);
    const info = await ferryInfo(image);
    const qemu = await qemuInfo(image);
    for (const key of ['format', 'virtual-size', 'cluster-size', 'format-specific', 'dirty-flag']) expect(info[key], key).toEqual(qemu[key]);
    expect(info.format).toBe('vdi');
    expect(JSON.parse((await ferry(['map', '--output=json', image])).stdout)).toEqual(JSON.parse(await qemuImg('map', '--output=json', image)));
    expect((await ferry(['check', image])).code).toBe(0);
  });

  it('check finds a data block used twice, as qemu-img check does', async () => {
    const image = join(dir, 'twice.vdi');
    await qemuImg('convert', '-f', 'raw', '-O', 'vdi', sources.odd, image);
    const b = await readFile(image);
    const first = b.readUInt32LE(OFFSET_BMAP + 2 * 4); // block 2 holds data (written at 3 MiB - 4 KiB)
    b.writeUInt32LE(first, OFFSET_BMAP + 9 * 4); // block 9 was unallocated
    b.writeUInt32LE(b.readUInt32LE(AT.blocksAllocated) + 1, AT.blocksAllocated); // so only the sharing is wrong
    await writeFile(image, b);
    expect(await qemuCheckStatus(image)).toBe(2);
    const r = await ferry(['check', image]);
    expect(r.code).toBe(2);
    expect(r.stdout).toMatch(/data block \d+ is used again by block map entry 9/);
  });
});

/**
 * Images from strangers: each must end in a one-line error naming the file and field, in bounded memory,
 * without hanging, and leave nothing behind.
 */
describe('hostile vdi inputs', () => {
  let dir: string;
  let valid: Buffer;

  inTempDir(async (made) => {
    dir = made;
    const path = join(dir, 'valid.vdi');
    await makeImage(path, 'vdi', '64M', 'write -P 0xab 0 1M');
    valid = await readFile(path);
  });

  /** Converts `image` (with `-f vdi` when `forced`, for inputs a probe would call raw) and expects refusal. */
  function expectRefused(name: string, image: Buffer, pattern: RegExp, forced = false): Promise<void> {
    return expectImageRefused(join(dir, name), 'input.vdi', image, pattern, forced ? ['-f', 'vdi'] : []);
  }

  function patched(edit: (b: Buffer) => void): Buffer {
    const b = Buffer.from(valid);
    edit(b);
    return b;
  }

  it('is probed as vdi by its signature', async () => {
    const path = join(dir, 'probe.vdi');
    await writeFile(path, valid);
    expect(JSON.parse((await ferry(['info', '--output=json', path])).stdout).format).toBe('vdi');
  });

  it('truncated header', () => expectRefused('truncated', valid.subarray(0, 300), /truncated VDI header \(300 bytes/, true));
  it('wrong signature', () => expectRefused('signature', patched((b) => b.writeUInt32LE(0xbeda1070, AT.signature)), /bad signature 0xbeda1070/, true));
  it('version 1.0', () => expectRefused('version', patched((b) => b.writeUInt32LE(0x00010000, AT.version)), /VDI version 1\.0 is not supported/));
  it('header size too small', () => expectRefused('header-size', patched((b) => b.writeUInt32LE(0x100, AT.headerSize)), /header_size 256 is smaller/));
  it('differencing image type', () => expectRefused('image-type', patched((b) => b.writeUInt32LE(4, AT.imageType)), /image type 4 is not supported/));
  it('unaligned data offset', () => expectRefused('offset-data', patched((b) => b.writeUInt32LE(0x401, AT.offsetData)), /data offset 0x00000401 is not sector aligned/));
  it('sector size 4096', () => expectRefused('sector-size', patched((b) => b.writeUInt32LE(4096, AT.sectorSize)), /sector_size 4096 is not 512/));
  it('block size 0', () => expectRefused('block-size-0', patched((b) => b.writeUInt32LE(0, AT.blockSize)), /block_size 0 is not a power of two/));
  it('block size not a power of two', () => expectRefused('block-size-odd', patched((b) => b.writeUInt32LE(1000000, AT.blockSize)), /block_size 1000000 is not a power of two/));
  it('block size 2 GiB', () => expectRefused('block-size-huge', patched((b) => b.writeUInt32LE(2 ** 31, AT.blockSize)), /block_size 2147483648 is not supported/));
  it('block extra bytes', () => expectRefused('block-extra', patched((b) => b.writeUInt32LE(512, AT.blockExtra)), /block_extra 512 is not supported/));
  it('disk size 2^62', () => expectRefused('disk-size', patched((b) => b.writeBigUInt64LE(2n ** 62n, AT.diskSize)), /disk_size 4611686018427387904 exceeds/));
  it('disk size beyond the block map', () => expectRefused('disk-vs-blocks', patched((b) => b.writeBigUInt64LE(65n * BigInt(MiB), AT.diskSize)), /does not fit in blocks_in_image 64/));
  it('blocks_in_image 2^32-1', () => expectRefused('blocks-max', patched((b) => b.writeUInt32LE(0xffffffff, AT.blocksInImage)), /blocks_in_image 4294967295 exceeds/));
  it('block map past the end of the file', () => {
    const image = patched((b) => {
      b.writeUInt32LE(1024 * 1024, AT.blocksInImage);
      b.writeBigUInt64LE(2n ** 40n, AT.diskSize);
    });
    return expectRefused('bmap-eof', image, /block map of 4194304 bytes .* extends past the end of the file/);
  });
  it('blocks_allocated beyond blocks_in_image', () => expectRefused('allocated', patched((b) => b.writeUInt32LE(65, AT.blocksAllocated)), /blocks_allocated 65 exceeds/));
  it('block map entry beyond blocks_allocated', () =>
    expectRefused('entry-allocated', patched((b) => b.writeUInt32LE(7, OFFSET_BMAP + 4)), /block map entry 1 points to data block 7, beyond blocks_allocated 1/));
  it('block map entry past the data area', () => {
    const image = patched((b) => {
      b.writeUInt32LE(64, AT.blocksAllocated);
      b.writeUInt32LE(40, OFFSET_BMAP + 4);
    });
    return expectRefused('entry-eof', image, /block map entry 1: data block 40 at \d+ lies past the end of the file/);
  });
  it('parent UUID set', () => expectRefused('parent', patched((b) => (b[AT.uuidParent] = 1)), /non-null parent UUID/));

  /** The header of a disk of `blocks` 1 MiB blocks, none allocated, whose data area starts right after the block map. */
  function unallocatedHeader(blocks: number): Buffer {
    const header = Buffer.from(valid.subarray(0, 512));
    header.writeUInt32LE(blocks, AT.blocksInImage);
    header.writeUInt32LE(0, AT.blocksAllocated);
    header.writeBigUInt64LE(BigInt(blocks) * BigInt(MiB), AT.diskSize);
    header.writeUInt32LE(OFFSET_BMAP + blocks * 4, AT.offsetData);
    return header;
  }

  it('a 512 MiB block map is walked in pages, in bounded memory', async () => {
    const folder = join(dir, 'big-map');
    await mkdir(folder, { recursive: true });
    const path = join(folder, 'input.vdi');
    const blocks = 128 * MiB;
    const h = await open(path, 'w');
    await h.write(unallocatedHeader(blocks), 0, 512, 0);
    const unallocated = Buffer.alloc(16 * MiB, 0xff);
    for (let at = 0; at < blocks * 4; at += unallocated.length) await h.write(unallocated, 0, unallocated.length, OFFSET_BMAP + at);
    await h.close();
    const r = await ferry(['map', '--output=json', path], { timeoutMs: 20_000 });
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toEqual([{ start: 0, length: blocks * MiB, depth: 0, present: true, zero: true, data: false }]);
    expect(r.maxRssKiB).toBeLessThan(256 * 1024);
  });

  it('a 2 GiB block map in a sparse file is read in pages: info in bounded memory, bad entries refused at once', async () => {
    const folder = join(dir, 'huge-map');
    await mkdir(folder, { recursive: true });
    const path = join(folder, 'input.vdi');
    const blocks = (2 ** 31 - 512) / 4;
    const h = await open(path, 'w');
    await h.write(unallocatedHeader(blocks), 0, 512, 0);
    await h.truncate(OFFSET_BMAP + blocks * 4); // every entry reads 0: data block 0, which was never allocated
    await h.close();
    const info = await ferry(['info', '--output=json', path]);
    expect(info.stderr).toBe('');
    expect(JSON.parse(info.stdout)['virtual-size']).toBe(blocks * MiB);
    expect(info.maxRssKiB).toBeLessThan(256 * 1024);
    const map = await ferry(['map', '--output=json', path], { timeoutMs: 20_000 });
    expect(map.code).toBe(1);
    expect(map.stderr.trim()).toMatch(/^[^\n]*block map entry 0 points to data block 0, beyond blocks_allocated 0$/);
    expect(map.maxRssKiB).toBeLessThan(256 * 1024);
  });
});
