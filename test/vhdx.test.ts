import { execFile } from 'node:child_process';
import { copyFile, mkdir, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { native } from '../src/native.js';
import { ferry, imagesIdentical, qemuImg, qemuIo } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';
import { expectImageRefused } from './helpers/hostile.js';
import { expectRawConversion, ferryInfo, ferryOk, inTempDir, makeImage, makeQcow2OverlayOverShorterBase, qemuInfo } from './helpers/image-tests.js';

const MiB = 1024 * 1024;
const run = promisify(execFile);

/** On-disk GUIDs ([MS-VHDX] 2.2.3, 2.6.2), written out so the tests do not borrow the driver's tables. */
const GUID = {
  bat: '6677c22d23f600429d64115e9bfd4a08',
  metadata: '06a27c8b90479a4bb8fe575f050f886e',
  fileParameters: '3767a1ca36fa434db3b633f0aa44e76b',
  virtualDiskSize: '2442a52f1bcd7648b2115dbed83bf4b8',
  logicalSectorSize: '1dbf41816fa90947ba47f233a8faab5f',
  parentLocator: '2d5fd3a80bb34d45abf7d3d84834ab0c',
  vhdxLocatorType: 'b7ef4ab09ed1814ab78925b8e9445913',
};
const HEADERS = [64 * 1024, 128 * 1024];
const REGION_TABLES = [192 * 1024, 256 * 1024];

function setCrc(buf: Buffer, at = 4): void {
  buf.writeUInt32LE(0, at);
  buf.writeUInt32LE(native.crc32c(buf), at);
}

/** A VHDX file in memory with the edits the tests make: headers, region tables, metadata, BAT. */
class VhdxBytes {
  constructor(public b: Buffer) {}

  static async load(path: string): Promise<VhdxBytes> {
    return new VhdxBytes(await readFile(path));
  }

  region(guid: string): { entry: number; offset: number; length: number } {
    const t = this.b.subarray(REGION_TABLES[0]);
    for (let i = 0; i < t.readUInt32LE(8); i++) {
      const at = 16 + i * 32;
      if (t.subarray(at, at + 16).toString('hex') === guid) return { entry: at, offset: Number(t.readBigUInt64LE(at + 16)), length: t.readUInt32LE(at + 24) };
    }
    throw new Error(`no region ${guid}`);
  }

  /** Edits both header copies (4 KiB each) and fixes their checksums. */
  headers(edit: (h: Buffer) => void): this {
    return this.editCopies(HEADERS, 4096, edit);
  }

  /** Edits both region table copies (64 KiB each) and fixes their checksums. */
  regionTables(edit: (t: Buffer) => void): this {
    return this.editCopies(REGION_TABLES, 65536, edit);
  }

  private editCopies(offsets: number[], length: number, edit: (copy: Buffer) => void): this {
    for (const o of offsets) {
      const copy = this.b.subarray(o, o + length);
      edit(copy);
      setCrc(copy);
    }
    return this;
  }

  get metadataTable(): Buffer {
    const md = this.region(GUID.metadata).offset;
    return this.b.subarray(md, md + 65536);
  }

  /** File offset of a metadata item, and the table entry describing it. */
  item(guid: string): { entry: number; offset: number } {
    const t = this.metadataTable;
    for (let i = 0; i < t.readUInt16LE(10); i++) {
      const at = 32 + i * 32;
      if (t.subarray(at, at + 16).toString('hex') === guid) return { entry: at, offset: this.region(GUID.metadata).offset + t.readUInt32LE(at + 16) };
    }
    throw new Error(`no metadata item ${guid}`);
  }

  bat(index: number): { offset: number; state: number } {
    const v = this.b.readBigUInt64LE(this.region(GUID.bat).offset + index * 8);
    return { offset: Number(v >> 20n) * MiB, state: Number(v & 7n) };
  }

  setBat(index: number, offset: number, state: number): this {
    this.b.writeBigUInt64LE(BigInt(offset) | BigInt(state), this.region(GUID.bat).offset + index * 8);
    return this;
  }

  /** Appends `data` at the next 1 MiB boundary and returns its offset. */
  append(data: Buffer): number {
    const at = Math.ceil(this.b.length / MiB) * MiB;
    const grown = Buffer.alloc(at + data.length);
    this.b.copy(grown);
    data.copy(grown, at);
    this.b = grown;
    return at;
  }
}

async function qemuCheckClean(image: string): Promise<void> {
  expect(await qemuImg('check', '-f', 'vhdx', image)).toMatch(/No errors were found on the image/);
}

/**
 * Whether qemu reads `image` as the raw disk `raw`. qemu-img compare against a VHDX reads every byte (the
 * driver reports no allocation), which takes many seconds past 4 GiB; qemu-img convert writes sparse raw.
 */
async function qemuReadsAs(image: string, raw: string): Promise<boolean> {
  const copy = `${image}.qemu.raw`;
  await qemuImg('convert', '-O', 'raw', image, copy);
  return imagesIdentical(raw, copy);
}

/** A sparse raw disk over 4 GiB, so 1 MiB and 32 MiB blocks both span a chunk and a sector bitmap entry. */
function makeBeyondChunkRaw(dir: string): Promise<string> {
  return makeImage(
    join(dir, 'beyond-chunk.raw'),
    'raw',
    String(4200 * MiB + 7 * 512),
    'write -P 0x21 0 1M',
    'write -P 0x22 4095M 2M', // crosses the 4 GiB chunk boundary
    'write -P 0x23 4197M 1536k',
    `write -P 0x24 ${4200 * MiB} ${7 * 512}`, // the odd tail
  );
}

/** Source disks shared by every group, made once: the patterned 64 MiB disk and the sparse one past 4 GiB. */
let source: string;
let beyondChunk: string;
inTempDir(async (dir) => {
  [source, beyondChunk] = await Promise.all([makePatternedRaw(dir), makeBeyondChunkRaw(dir)]);
});

/** qemu-img's VHDX of the patterned source, written at `image` and loaded for editing. */
async function qemuVhdxOfSource(image: string): Promise<VhdxBytes> {
  await qemuImg('convert', '-f', 'raw', '-O', 'vhdx', source, image);
  return VhdxBytes.load(image);
}

describe('reading VHDX images produced by qemu-img', () => {
  let dir: string;
  inTempDir((made) => (dir = made));

  // The last field: also compare `info` with qemu-img's (a few variants suffice).
  const variants: Array<[string, string[], 'patterned' | 'beyond-chunk', boolean]> = [
    ['dynamic (default 8 MiB blocks, ZERO block states)', [], 'patterned', true],
    ['dynamic with NOT_PRESENT block states', ['-o', 'block_state_zero=off'], 'patterned', false],
    ['fixed (QEMU default: ZERO states, data appended)', ['-o', 'subformat=fixed'], 'patterned', false],
    ['fixed, fully preallocated', ['-o', 'subformat=fixed,block_state_zero=off'], 'patterned', true],
    ['dynamic with a 4 MiB log', ['-o', 'log_size=4M'], 'patterned', false],
    ['dynamic with 1 MiB blocks over 4 GiB', ['-o', 'block_size=1M'], 'beyond-chunk', true],
    ['dynamic with 32 MiB blocks over 4 GiB', ['-o', 'block_size=32M'], 'beyond-chunk', false],
  ];

  for (const [name, args, kind, compareInfo] of variants) {
    it(`converts ${name} to raw identical to what qemu reads`, async () => {
      const base = name.replace(/\W+/g, '_');
      const image = join(dir, `${base}.vhdx`);
      const out = join(dir, `${base}.raw`);
      const from = kind === 'patterned' ? source : beyondChunk;
      await qemuImg('convert', '-f', 'raw', '-O', 'vhdx', ...args, from, image);
      await ferryOk(['convert', '-O', 'raw', image, out]);
      expect(kind === 'patterned' ? await imagesIdentical(image, out) : await qemuReadsAs(image, out)).toBe(true);
      expect(await imagesIdentical(from, out)).toBe(true);
      if (!compareInfo) return;
      const ours = await ferryInfo(image);
      const qemu = await qemuInfo(image);
      const described = (i: Record<string, unknown>) => [i.format, i['virtual-size'], i['cluster-size'], i['format-specific']];
      expect(described(ours)).toEqual(described(qemu));
    });
  }

  it('reads an odd virtual size with data in its last sector', async () => {
    const image = join(dir, 'odd.vhdx');
    const size = 10 * MiB + 4096 + 512;
    await makeImage(image, 'vhdx', String(size), `write -P 0x99 ${10 * MiB} 4608`);
    const out = join(dir, 'odd.raw');
    await expectRawConversion(image, out);
    expect((await stat(out)).size).toBe(size);
    expect((await ferryInfo(image))['virtual-size']).toBe((await qemuInfo(image))['virtual-size']);
  });

  it('probes VHDX by its file identifier', async () => {
    const image = join(dir, 'probe.vhdx');
    await qemuImg('create', '-q', '-f', 'vhdx', image, '16M');
    const info = await ferryInfo(image);
    expect(info.format).toBe('vhdx');
    expect(info['cluster-size']).toBe(8 * MiB);
  });

  it('uses the header with the higher sequence number, and the valid one when the other is damaged', async () => {
    const v = await qemuVhdxOfSource(join(dir, 'seq.vhdx'));
    // Header 1 gets a higher sequence number but a log offset that would be refused: it must win.
    const h1 = v.b.subarray(HEADERS[0], HEADERS[0] + 4096);
    h1.writeBigUInt64LE(h1.readBigUInt64LE(8) + 10n, 8);
    h1.writeBigUInt64LE(BigInt(3 * MiB + 4096), 72);
    setCrc(h1);
    const refused = join(dir, 'seq-refused.vhdx');
    await writeFile(refused, v.b);
    const r = await ferry(['convert', '-O', 'raw', refused, join(dir, 'seq-refused.raw')]);
    expect(r.stderr).toMatch(/log_offset 3149824 is not a multiple of 1 MiB/);
    // Damage its checksum: header 2 is the only valid one and the image reads.
    h1[100] ^= 0xff;
    const damaged = join(dir, 'seq-damaged.vhdx');
    await writeFile(damaged, v.b);
    await expectRawConversion(damaged, join(dir, 'seq-damaged.raw'), source);
  });

  it('falls back to the second region table when the first fails its checksum', async () => {
    const image = join(dir, 'rt.vhdx');
    const v = await qemuVhdxOfSource(image);
    v.b[REGION_TABLES[0] + 40] ^= 0xff;
    await writeFile(image, v.b);
    await expectRawConversion(image, join(dir, 'rt.raw'), source);
  });

  it('reads 4096-byte logical sectors (which qemu-img 7.2 refuses to open)', async () => {
    const image = join(dir, 'base512.vhdx');
    const v = await qemuVhdxOfSource(image);
    // 64 MiB in 8 MiB blocks stays within one chunk for either sector size, so only the sector size changes.
    v.b.writeUInt32LE(4096, v.item(GUID.logicalSectorSize).offset);
    const image4k = join(dir, 'sector4k.vhdx');
    await writeFile(image4k, v.b);
    await expectRawConversion(image4k, join(dir, 'sector4k.raw'), image);
  });
});

describe('writing VHDX images', () => {
  let dir: string;
  inTempDir((made) => (dir = made));

  const variants: Array<[string, string[]]> = [
    ['dynamic', []],
    ['dynamic with NOT_PRESENT states', ['-o', 'block_state_zero=off']],
    ['fixed', ['-o', 'subformat=fixed']],
    ['fixed, fully preallocated', ['-o', 'subformat=fixed,block_state_zero=off']],
    ['dynamic with 1 MiB blocks and a 2 MiB log', ['-o', 'block_size=1M,log_size=2M']],
  ];
  for (const [name, args] of variants) {
    it(`writes a ${name} image that qemu-img reads identically and checks clean`, async () => {
      const image = join(dir, `${name.replace(/\W+/g, '_')}.vhdx`);
      await ferryOk(['convert', '-O', 'vhdx', ...args, source, image]);
      expect(await imagesIdentical(source, image)).toBe(true);
      await qemuCheckClean(image);
    });
  }

  it('reads back what it wrote', async () => {
    const image = join(dir, 'roundtrip.vhdx');
    await ferryOk(['convert', '-O', 'vhdx', '-o', 'block_size=1M', source, image]);
    await expectRawConversion(image, join(dir, 'roundtrip.raw'), source);
  });

  it('lays out a dynamic image as QEMU does: same block size choice, same BAT, same file size', async () => {
    const ours = join(dir, 'layout-ferry.vhdx');
    const theirs = join(dir, 'layout-qemu.vhdx');
    await ferryOk(['convert', '-O', 'vhdx', source, ours]);
    await qemuImg('convert', '-f', 'raw', '-O', 'vhdx', source, theirs);
    const [a, b] = await Promise.all([VhdxBytes.load(ours), VhdxBytes.load(theirs)]);
    expect((await qemuInfo(ours))['cluster-size']).toBe(8 * MiB);
    expect(a.b.length).toBe(b.b.length);
    const bat = (v: VhdxBytes) => Array.from({ length: 8 }, (_, i) => v.bat(i));
    // Allocation order may differ under parallel writes; the states and the set of places may not.
    expect(bat(a).map((e) => e.state)).toEqual(bat(b).map((e) => e.state));
    expect(bat(a).map((e) => e.offset).sort()).toEqual(bat(b).map((e) => e.offset).sort());
  });

  it('writes 1 MiB and 32 MiB blocks across the 4 GiB chunk boundary, dynamic and fixed', async () => {
    // Where the data is, and zeroes around it, as qemu-io reads them (it fails on a mismatch).
    const reads = ['read -P 0x21 0 1M', 'read -P 0 1M 7M', 'read -P 0 4000M 95M', 'read -P 0x22 4095M 2M', 'read -P 0 4097M 100M', 'read -P 0x23 4197M 1536k'];
    reads.push(`read -P 0x24 ${4200 * MiB} ${7 * 512}`);
    // Reading a whole fixed image takes qemu many seconds (every block is present), so only dynamic ones are read in full.
    for (const [args, readAll] of [['block_size=1M', true], ['block_size=32M', true], ['subformat=fixed,block_size=32M,block_state_zero=off', false]] as const) {
      const image = join(dir, `beyond-${args.replace(/\W+/g, '_')}.vhdx`);
      const r = await ferryOk(['convert', '-O', 'vhdx', '-o', args, beyondChunk, image]);
      expect(r.maxRssKiB).toBeLessThan(256 * 1024);
      await qemuCheckClean(image);
      await qemuIo(image, 'vhdx', ...reads);
      if (readAll) expect(await qemuReadsAs(image, beyondChunk)).toBe(true);
    }
  });

  it('records an odd virtual size rounded up to whole sectors, as qemu-img does', async () => {
    const odd = join(dir, 'odd.raw');
    await makeImage(odd, 'raw', String(5 * MiB + 1000), `write -P 0x42 ${5 * MiB} 1000`);
    const ours = join(dir, 'odd-ferry.vhdx');
    const theirs = join(dir, 'odd-qemu.vhdx');
    await ferryOk(['convert', '-O', 'vhdx', odd, ours]);
    await qemuImg('convert', '-f', 'raw', '-O', 'vhdx', odd, theirs);
    expect((await qemuInfo(ours))['virtual-size']).toBe((await qemuInfo(theirs))['virtual-size']);
    expect(await imagesIdentical(odd, ours)).toBe(true);
    await qemuCheckClean(ours);
  });

  it('converts a qcow2 overlay with its backing file to VHDX, and VHDX to qcow2', async () => {
    const top = await makeQcow2OverlayOverShorterBase(dir, 32);
    const vhdx = join(dir, 'from-chain.vhdx');
    await ferryOk(['convert', '-O', 'vhdx', top, vhdx]);
    expect(await imagesIdentical(top, vhdx)).toBe(true);
    await qemuCheckClean(vhdx);
    const qcow2 = join(dir, 'from-vhdx.qcow2');
    await ferryOk(['convert', '-O', 'qcow2', vhdx, qcow2]);
    expect(await imagesIdentical(vhdx, qcow2)).toBe(true);
    expect(await imagesIdentical(top, qcow2)).toBe(true);
  });

  it('refuses options qemu-img refuses, leaving nothing behind', async () => {
    const folder = join(dir, 'bad-options');
    await mkdir(folder);
    const cases: Array<[string, RegExp]> = [
      ['block_size=3M', /block_size 3145728 must be a power of two/],
      ['log_size=0', /log_size must be at least 1 MiB/],
      ['subformat=differencing', /subformat=differencing.*expected one of dynamic, fixed/],
    ];
    await Promise.all(
      cases.map(async ([opt, pattern]) => {
        const r = await ferry(['convert', '-O', 'vhdx', '-o', opt, source, join(folder, 'out.vhdx')]);
        expect(r.code).toBe(1);
        expect(r.stderr).toMatch(pattern);
      }),
    );
    // A 65 TiB disk (a qcow2 holds it in a few KiB) is over the VHDX limit.
    const huge = join(dir, 'huge.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', huge, '65T');
    const r = await ferry(['convert', '-O', 'vhdx', huge, join(folder, 'out.vhdx')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/exceeds the VHDX limit of 64 TiB/);
    expect(await readdir(folder)).toEqual([]);
  });
});

type LogWrite = { kind: 'data'; offset: number; data: Buffer } | { kind: 'zero'; offset: number; length: number };

/** One log entry ([MS-VHDX] 2.3.1): descriptor sectors, then one data sector per data descriptor, CRC-32C over all. */
function logEntry(sequence: bigint, logGuid: Buffer, writes: LogWrite[], fileSize: number): Buffer {
  const descriptorSectors = Math.ceil((writes.length + 2) / 128);
  const dataSectors = writes.filter((w) => w.kind === 'data').length;
  const e = Buffer.alloc((descriptorSectors + dataSectors) * 4096);
  e.write('loge', 0, 'latin1');
  e.writeUInt32LE(e.length, 8);
  e.writeBigUInt64LE(sequence, 16);
  e.writeUInt32LE(writes.length, 24);
  logGuid.copy(e, 32);
  e.writeBigUInt64LE(BigInt(fileSize), 48); // FlushedFileOffset
  e.writeBigUInt64LE(BigInt(fileSize), 56); // LastFileOffset
  let sector = descriptorSectors;
  writes.forEach((w, i) => {
    const d = 64 + i * 32;
    e.writeBigUInt64LE(BigInt(w.offset), d + 16);
    e.writeBigUInt64LE(sequence, d + 24);
    if (w.kind === 'zero') {
      e.write('zero', d, 'latin1');
      e.writeBigUInt64LE(BigInt(w.length), d + 8);
      return;
    }
    e.write('desc', d, 'latin1');
    w.data.copy(e, d + 4, 4092, 4096); // trailing bytes
    w.data.copy(e, d + 8, 0, 8); // leading bytes
    const s = sector++ * 4096;
    e.write('data', s, 'latin1');
    e.writeUInt32LE(Number(sequence >> 32n), s + 4);
    w.data.copy(e, s + 8, 8, 4092);
    e.writeUInt32LE(Number(sequence & 0xffffffffn), s + 4092);
  });
  setCrc(e);
  return e;
}

describe('the VHDX log', () => {
  let dir: string;
  inTempDir((made) => (dir = made));

  it('replays a non-empty log in memory exactly as qemu-img check -r all replays it on disk, without touching the source', async () => {
    const v = await qemuVhdxOfSource(join(dir, 'base.vhdx'));
    const bat = v.region(GUID.bat).offset;
    const log = { offset: 1 * MiB, length: 1 * MiB };
    expect(v.b.readUInt32LE(HEADERS[0] + 68)).toBe(log.length);
    const logGuid = Buffer.from('0123456789abcdeffedcba9876543210', 'hex');
    // Payload written directly (as the log must not carry payload): a new block for guest block 4.
    const newBlock = v.append(Buffer.alloc(8 * MiB, 0x5c));
    const fileSize = v.b.length;
    const block2 = v.bat(2).offset;
    expect(v.bat(2).state).toBe(6);
    expect(v.bat(7).state).toBe(6);

    // Entry 1: block 0 becomes ZERO, block 4 points at the new block; a data sector and a zero range over payload.
    const batSector1 = Buffer.from(v.b.subarray(bat, bat + 4096));
    batSector1.writeBigUInt64LE(2n, 0);
    batSector1.writeBigUInt64LE(BigInt(newBlock) | 6n, 4 * 8);
    const entry1 = logEntry(5n, logGuid, [
      { kind: 'data', offset: bat, data: batSector1 },
      { kind: 'data', offset: newBlock + 8192, data: Buffer.alloc(4096, 0x77) },
      { kind: 'zero', offset: block2 + 4 * MiB, length: 64 * 1024 },
    ], fileSize);
    // Entry 2, next in sequence: block 7 (holding the last sector) becomes NOT_PRESENT as well.
    const batSector2 = Buffer.from(batSector1);
    batSector2.writeBigUInt64LE(0n, 7 * 8);
    const entry2 = logEntry(6n, logGuid, [{ kind: 'data', offset: bat, data: batSector2 }], fileSize);
    // An older, complete entry further on: its sequence number is lower, so it must not be replayed.
    const stale = Buffer.from(batSector1);
    stale.writeBigUInt64LE(2n, 1 * 8);
    const entry3 = logEntry(3n, logGuid, [{ kind: 'data', offset: bat, data: stale }], fileSize);
    entry1.copy(v.b, log.offset);
    entry2.copy(v.b, log.offset + entry1.length);
    entry3.copy(v.b, log.offset + 64 * 1024);
    v.headers((h) => logGuid.copy(h, 48));
    const image = join(dir, 'with-log.vhdx');
    await writeFile(image, v.b);

    // qemu sees the log as valid and non-empty: it will not read the image without replaying it.
    await expect(qemuImg('info', image)).rejects.toThrow(/contains a log that needs to be replayed/);
    const replayed = join(dir, 'replayed.vhdx');
    await copyFile(image, replayed);
    await run('qemu-img', ['check', '-r', 'all', replayed]).catch((err: { code?: number }) => expect(err.code).not.toBe(1));

    const out = join(dir, 'with-log.raw');
    await expectRawConversion(image, out, replayed);
    expect(await imagesIdentical(source, out)).toBe(false);
    // The source was opened read-only and is byte for byte what was written.
    expect((await readFile(image)).equals(v.b)).toBe(true);
    // And VHDX output from the log-replayed image matches too.
    const again = join(dir, 'again.vhdx');
    await ferryOk(['convert', '-O', 'vhdx', image, again]);
    expect(await imagesIdentical(replayed, again)).toBe(true);
  });

  it('replays a log entry written by qemu itself and left unapplied, as after a crash', async () => {
    const image = join(dir, 'crashed.vhdx');
    const before = await qemuVhdxOfSource(image);
    // qemu allocates a block for this write and updates the BAT through its log.
    await qemuIo(image, 'vhdx', 'write -P 0x55 50M 1M');
    const after = await VhdxBytes.load(image);
    const bat = after.region(GUID.bat).offset;
    const entry = after.b.subarray(MiB, MiB + 4096);
    expect(entry.toString('latin1', 0, 4)).toBe('loge');
    expect(Number(entry.readBigUInt64LE(64 + 16))).toBe(bat); // its one descriptor rewrites the first BAT sector
    // The crash: the log entry is on disk, the BAT sector is not, and the header still names the log.
    before.b.copy(after.b, bat, bat, bat + 4096);
    after.headers((h) => entry.copy(h, 48, 32, 48));
    await writeFile(image, after.b);
    await expect(qemuImg('info', image)).rejects.toThrow(/contains a log that needs to be replayed/);
    const replayed = join(dir, 'crashed-replayed.vhdx');
    await copyFile(image, replayed);
    await run('qemu-img', ['check', '-r', 'all', replayed]).catch((err: { code?: number }) => expect(err.code).not.toBe(1));
    await qemuIo(replayed, 'vhdx', 'read -P 0x55 50M 1M');

    const out = join(dir, 'crashed.raw');
    await expectRawConversion(image, out, replayed);
    expect(await imagesIdentical(source, out)).toBe(false);
  });

  it('refuses a non-empty log too large to replay in memory, naming the fix', async () => {
    const folder = join(dir, 'big-log');
    await mkdir(folder);
    const image = join(folder, 'input.vhdx');
    await qemuImg('create', '-q', '-f', 'vhdx', '-o', 'log_size=64M', image, '16M');
    const v = await VhdxBytes.load(image);
    v.headers((h) => h.fill(0x42, 48, 64));
    await writeFile(image, v.b);
    const r = await ferry(['convert', '-O', 'raw', image, join(folder, 'out.raw')]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/non-empty 67108864-byte log.*qemu-img check -r all/);
    expect(await readdir(folder)).toEqual(['input.vhdx']);
  });
});

describe('differencing VHDX images', () => {
  let dir: string;
  inTempDir((made) => (dir = made));

  /** The current header's DataWriteGuid in the braced text form parent locators use. */
  async function dataWriteGuid(path: string): Promise<string> {
    const b = await readFile(path);
    const [h1, h2] = HEADERS.map((o) => b.subarray(o, o + 4096));
    const g = (h1.readBigUInt64LE(8) > h2.readBigUInt64LE(8) ? h1 : h2).subarray(32, 48);
    const le = (from: number, to: number) => Buffer.from(g.subarray(from, to)).reverse().toString('hex');
    return `{${le(0, 4)}-${le(4, 6)}-${le(6, 8)}-${g.toString('hex', 8, 10)}-${g.toString('hex', 10, 16)}}`;
  }

  /** Makes `v` a differencing image of the VHDX at `relativePath` (Windows separators, as Hyper-V writes it). */
  function makeDifferencing(v: VhdxBytes, relativePath: string, parentLinkage: string): void {
    v.b.writeUInt32LE(v.b.readUInt32LE(v.item(GUID.fileParameters).offset + 4) | 2, v.item(GUID.fileParameters).offset + 4);
    const pairs: Array<[string, string]> = [
      ['parent_linkage', parentLinkage],
      ['relative_path', relativePath],
    ];
    const strings = pairs.flat().map((t) => Buffer.from(t, 'utf16le'));
    const item = Buffer.alloc(20 + pairs.length * 12 + strings.reduce((n, s) => n + s.length, 0));
    Buffer.from(GUID.vhdxLocatorType, 'hex').copy(item, 0);
    item.writeUInt16LE(pairs.length, 18);
    let at = 20 + pairs.length * 12;
    strings.forEach((s, i) => {
      const entry = 20 + Math.floor(i / 2) * 12;
      item.writeUInt32LE(at, entry + (i % 2) * 4);
      item.writeUInt16LE(s.length, entry + 8 + (i % 2) * 2);
      s.copy(item, at);
      at += s.length;
    });
    const t = v.metadataTable;
    const count = t.readUInt16LE(10);
    const itemOffset = 64 * 1024 + 1024; // past QEMU's five items
    const e = 32 + count * 32;
    Buffer.from(GUID.parentLocator, 'hex').copy(t, e);
    t.writeUInt32LE(itemOffset, e + 16);
    t.writeUInt32LE(item.length, e + 20);
    t.writeUInt32LE(4, e + 24); // IsRequired
    t.writeUInt16LE(count + 1, 10);
    item.copy(v.b, v.region(GUID.metadata).offset + itemOffset);
  }

  it('reads a differencing image over its parent: present, partially present, zero, unmapped and absent blocks', async () => {
    const parent = join(dir, 'parent.vhdx');
    const child = join(dir, 'child.vhdx');
    await makeImage(parent, 'vhdx', '64M', 'write -P 0x11 0 64M');
    await qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_state_zero=off', child, '64M');
    await qemuIo(child, 'vhdx', 'write -P 0x22 8M 1M', 'write -P 0x33 16M 8M');
    const v = await VhdxBytes.load(child);
    makeDifferencing(v, 'parent.vhdx', (await dataWriteGuid(parent)).toUpperCase());
    // Block 1 (8-16 MiB) is partially present: its first 1 MiB and one zero sector at 12 MiB come from the child.
    const bitmap = Buffer.alloc(MiB);
    const chunkSectorOfBlock1 = (8 * MiB) / 512;
    bitmap.fill(0xff, chunkSectorOfBlock1 / 8, (chunkSectorOfBlock1 + 2048) / 8);
    const zeroSector = chunkSectorOfBlock1 + (4 * MiB) / 512;
    bitmap[zeroSector >> 3] |= 1 << (zeroSector & 7);
    const bitmapAt = v.append(bitmap);
    const chunkRatio = ((1 << 23) * 512) / (8 * MiB);
    v.setBat(chunkRatio, bitmapAt, 6); // the chunk's sector bitmap entry
    v.setBat(1, v.bat(1).offset, 7);
    v.setBat(3, 0, 2); // ZERO: hides the parent
    v.setBat(4, 0, 3); // UNMAPPED: reads as zeroes, as QEMU reads it elsewhere
    await writeFile(child, v.b);

    const expected = Buffer.alloc(64 * MiB, 0x11);
    expected.fill(0x22, 8 * MiB, 9 * MiB);
    expected.fill(0, 12 * MiB, 12 * MiB + 512);
    expected.fill(0x33, 16 * MiB, 24 * MiB);
    expected.fill(0, 24 * MiB, 40 * MiB);
    const expectedPath = join(dir, 'expected.raw');
    await writeFile(expectedPath, expected);

    await expectRawConversion(child, join(dir, 'child.raw'), expectedPath);
    const info = JSON.parse((await ferryOk(['info', '--output=json', '--backing-chain', child])).stdout);
    expect(info.map((i: Record<string, unknown>) => [i.format, i['backing-filename']])).toEqual([
      ['vhdx', 'parent.vhdx'],
      ['vhdx', undefined],
    ]);
    // The chain also converts to a standalone VHDX that qemu reads.
    const flat = join(dir, 'flat.vhdx');
    await ferryOk(['convert', '-O', 'vhdx', child, flat]);
    expect(await imagesIdentical(expectedPath, flat)).toBe(true);

    // A parent written to after the child was made no longer matches the child's parent_linkage.
    await qemuIo(parent, 'vhdx', 'write -P 0x44 0 4k');
    const r = await ferry(['convert', '-O', 'raw', child, join(dir, 'stale.raw')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/parent .*parent.vhdx has DataWriteGuid \{[0-9a-f-]+\}, not the \{[0-9a-f-]+\} this image was made from/);
  });

  it('refuses a parent outside the image folder', async () => {
    const folder = join(dir, 'confined');
    await mkdir(folder);
    await qemuImg('create', '-q', '-f', 'vhdx', join(dir, 'outside.vhdx'), '16M');
    const child = join(folder, 'input.vhdx');
    await qemuImg('create', '-q', '-f', 'vhdx', child, '16M');
    const v = await VhdxBytes.load(child);
    makeDifferencing(v, '..\\outside.vhdx', await dataWriteGuid(join(dir, 'outside.vhdx')));
    await writeFile(child, v.b);
    const r = await ferry(['convert', '-O', 'raw', child, join(folder, 'out.raw')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/backing file '..\/outside.vhdx' resolves to .* outside the image's folder/);
    expect(await readdir(folder)).toEqual(['input.vhdx']);
  });
});

/**
 * Images from strangers: each hostile input must end in a one-line error naming the file, in bounded
 * memory, without hanging, and leave no output (not even a temporary file) behind.
 */
describe('hostile VHDX inputs', () => {
  let dir: string;
  let valid: VhdxBytes;

  inTempDir(async (made) => {
    dir = made;
    const path = join(dir, 'valid.vhdx');
    const raw = join(dir, 'valid.raw');
    await makeImage(raw, 'raw', '64M', 'write -P 0xab 0 1M', 'write -P 0xcd 20M 1M');
    await qemuImg('convert', '-f', 'raw', '-O', 'vhdx', raw, path);
    valid = await VhdxBytes.load(path);
  });

  function expectRefused(name: string, image: Buffer, pattern: RegExp, sourceArgs: string[] = []): Promise<void> {
    return expectImageRefused(join(dir, name), 'input.vhdx', image, pattern, sourceArgs);
  }

  function patched(edit: (v: VhdxBytes) => void): Buffer {
    const v = new VhdxBytes(Buffer.from(valid.b));
    edit(v);
    return v.b;
  }

  /** Rewrites a metadata item's value; metadata carries no checksum, so nothing else changes. */
  function withItem(guid: string, edit: (b: Buffer, at: number) => void): Buffer {
    return patched((v) => edit(v.b, v.item(guid).offset));
  }

  it('truncated file', async () => {
    await expectRefused('truncated', valid.b.subarray(0, 40), /shorter than the 1 MiB VHDX header section/);
  });

  it('bad file identifier, opened as VHDX', async () => {
    // Probing would take it for raw, as qemu-img does; named as VHDX it must be refused.
    await expectRefused('identifier', patched((v) => v.b.write('vhdxfilX', 0, 'latin1')), /no "vhdxfile" identifier/, ['-f', 'vhdx']);
  });

  it('bad CRC-32C on both headers', async () => {
    await expectRefused('header-crc', patched((v) => HEADERS.forEach((o) => (v.b[o + 200] ^= 1))), /no valid VHDX header \(header 1: bad CRC-32C, header 2: bad CRC-32C\)/);
  });

  it('two different headers with the same sequence number', async () => {
    await expectRefused(
      'header-seq',
      patched((v) => {
        v.headers((h) => h.writeBigUInt64LE(7n, 8));
        const h1 = v.b.subarray(HEADERS[0], HEADERS[0] + 4096);
        h1[16] ^= 0xff; // a different FileWriteGuid
        setCrc(h1);
      }),
      /both headers have sequence number 7 but differ/,
    );
  });

  it('bad CRC-32C on both region tables', async () => {
    await expectRefused('region-crc', patched((v) => REGION_TABLES.forEach((o) => (v.b[o + 100] ^= 1))), /both region tables are damaged/);
  });

  it('region table entry count 2^32-1', async () => {
    await expectRefused('region-count', patched((v) => v.regionTables((t) => t.writeUInt32LE(0xffffffff, 8))), /region table entry count 4294967295 exceeds 2047/);
  });

  it('BAT region past the end of the file', async () => {
    await expectRefused(
      'bat-eof',
      patched((v) => v.regionTables((t) => t.writeBigUInt64LE(1n << 40n, v.region(GUID.bat).entry + 16))),
      /BAT region of \d+ bytes at 1099511627776 extends past the end of the file/,
    );
  });

  it('BAT region overlapping the metadata region', async () => {
    await expectRefused(
      'bat-overlap',
      patched((v) => v.regionTables((t) => t.writeBigUInt64LE(BigInt(v.region(GUID.metadata).offset), v.region(GUID.bat).entry + 16))),
      /metadata region at \d+ overlaps the BAT region/,
    );
  });

  it('BAT region too small for the virtual size', async () => {
    await expectRefused('bat-small', withItem(GUID.virtualDiskSize, (b, at) => b.writeBigUInt64LE(1n << 40n, at)), /BAT region of 1048576 bytes is too small for virtual size 1099511627776/);
  });

  it('block size 0, not a power of two, and over 256 MiB', async () => {
    await Promise.all(
      ([['bs-0', 0], ['bs-3m', 3 * MiB], ['bs-512m', 512 * MiB]] as const).map(([name, size]) =>
        expectRefused(name, withItem(GUID.fileParameters, (b, at) => b.writeUInt32LE(size, at)), new RegExp(`block_size ${size} is not a power of two between 1 MiB and 256 MiB`)),
      ),
    );
  });

  it('virtual size 2^62 and just over 64 TiB', async () => {
    await Promise.all([
      expectRefused('size-2-62', withItem(GUID.virtualDiskSize, (b, at) => b.writeBigUInt64LE(1n << 62n, at)), /virtual_disk_size 4611686018427387904 exceeds the VHDX limit of 64 TiB/),
      expectRefused('size-64t', withItem(GUID.virtualDiskSize, (b, at) => b.writeBigUInt64LE((64n << 40n) + 512n, at)), /exceeds the VHDX limit of 64 TiB/),
    ]);
  });

  it('logical sector size 1000', async () => {
    await expectRefused('sector', withItem(GUID.logicalSectorSize, (b, at) => b.writeUInt32LE(1000, at)), /logical_sector_size 1000 is neither 512 nor 4096/);
  });

  it('BAT entry pointing past the end of the file', async () => {
    await expectRefused('entry-eof', patched((v) => v.setBat(0, 2 ** 40, 6)), /BAT entry 0: block offset 1099511627776 points past the end of the file/);
  });

  it('BAT entry pointing into the header section and into the BAT', async () => {
    await Promise.all([
      expectRefused('entry-header', patched((v) => v.setBat(0, 0, 6)), /BAT entry 0: block offset 0 lies inside the header section/),
      expectRefused('entry-bat', patched((v) => v.setBat(0, v.region(GUID.bat).offset, 6)), /BAT entry 0: block at \d+ overlaps the BAT region/),
    ]);
  });

  it('check reports a bad BAT entry as a corruption, as qemu-img check does', async () => {
    const folder = join(dir, 'check');
    await mkdir(folder);
    const image = join(folder, 'input.vhdx');
    await writeFile(image, patched((v) => v.setBat(0, 2 ** 40, 6)));
    const qemu = await run('qemu-img', ['check', image]).then(() => 0, (err: { code: number }) => err.code);
    const ours = await ferry(['check', '--output=json', image]);
    expect([ours.code, qemu]).toEqual([2, 2]);
    expect(JSON.parse(ours.stdout)).toMatchObject({ 'check-errors': 0, corruptions: 1, format: 'vhdx' });
    await writeFile(image, valid.b);
    expect((await ferry(['check', image])).code).toBe(0);
  });

  it('BAT entries in invalid states', async () => {
    await Promise.all([
      expectRefused('state-4', patched((v) => v.setBat(1, 0, 4)), /BAT entry 1: invalid payload block state 4/),
      expectRefused('state-7', patched((v) => v.setBat(2, v.bat(2).offset, 7)), /BAT entry 2: block is partially present in an image without a parent/),
    ]);
  });

  it('metadata items overlapping, out of range, or missing', async () => {
    await Promise.all([
      expectRefused(
        'md-overlap',
        patched((v) => v.metadataTable.writeUInt32LE(v.metadataTable.readUInt32LE(v.item(GUID.fileParameters).entry + 16) + 4, v.item(GUID.virtualDiskSize).entry + 16)),
        /virtual disk size overlaps file parameters in the metadata region/,
      ),
      expectRefused(
        'md-range',
        patched((v) => v.metadataTable.writeUInt32LE(0xfffffff0, v.item(GUID.virtualDiskSize).entry + 16)),
        /virtual disk size \(8 bytes at 4294967280\) lies outside the metadata region/,
      ),
      expectRefused('md-missing', patched((v) => v.metadataTable.writeUInt16LE(1, 10)), /metadata has no virtual disk size item/),
      expectRefused('md-signature', patched((v) => v.metadataTable.write('metadatX', 0, 'latin1')), /metadata table has a bad signature/),
      expectRefused('md-count', patched((v) => v.metadataTable.writeUInt16LE(0xffff, 10)), /metadata entry count 65535 exceeds 2047/),
    ]);
  });

  it('an unknown region or metadata item marked required', async () => {
    await Promise.all([
      expectRefused(
        'required-region',
        patched((v) =>
          v.regionTables((t) => {
            const at = 16 + t.readUInt32LE(8) * 32;
            t.fill(0x5a, at, at + 16);
            t.writeBigUInt64LE(BigInt(v.b.length - MiB), at + 16);
            t.writeUInt32LE(4096, at + 24);
            t.writeUInt32LE(1, at + 28);
            t.writeUInt32LE(t.readUInt32LE(8) + 1, 8);
          }),
        ),
        /required region \{5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a\} is not supported/,
      ),
      expectRefused(
        'required-item',
        patched((v) => {
          const t = v.metadataTable;
          const at = 32 + t.readUInt16LE(10) * 32;
          t.fill(0x5b, at, at + 16);
          t.writeUInt32LE(4, at + 24);
          t.writeUInt16LE(t.readUInt16LE(10) + 1, 10);
        }),
        /required metadata item \{5b5b5b5b-5b5b-5b5b-5b5b-5b5b5b5b5b5b\} is not supported/,
      ),
    ]);
  });

  it('a log whose entry has a malformed descriptor, and one that needs a longer file', async () => {
    const guid = Buffer.alloc(16, 0x99);
    const bat = valid.region(GUID.bat).offset;
    const sector = Buffer.from(valid.b.subarray(bat, bat + 4096));
    await Promise.all([
      expectRefused(
        'log-descriptor',
        patched((v) => {
          const e = logEntry(1n, guid, [{ kind: 'zero', offset: bat + 100, length: 4096 }], v.b.length);
          e.copy(v.b, MiB);
          v.headers((h) => guid.copy(h, 48));
        }),
        /log entry 1: descriptor 0 is malformed/,
      ),
      expectRefused(
        'log-truncated',
        patched((v) => {
          logEntry(1n, guid, [{ kind: 'data', offset: bat, data: sector }], v.b.length + MiB).copy(v.b, MiB);
          v.headers((h) => guid.copy(h, 48));
        }),
        /log entry 1 needs a file of at least \d+ bytes, but it has \d+: it was truncated/,
      ),
    ]);
  });
});
