import { execFileSync } from 'node:child_process';
import { mkdir, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ferry, imagesIdentical, qemuImg, qemuIo } from './helpers/env.js';
import {
  expectBackingChainAsQemu,
  expectFerryReadsQemuImage,
  expectRawConversion,
  ferryInfo,
  ferryOk,
  inTempDir,
  inTempDirWithPatternedSource,
  makeImage,
  qemuInfo,
} from './helpers/image-tests.js';

const SECTOR = 512;
const GD_AT_END = 0xffffffffffffffffn;

function info(tool: 'ferry' | 'qemu', image: string): Promise<Record<string, any>> {
  return tool === 'qemu' ? qemuInfo(image) : ferryInfo(image);
}

/** The facts `info` must agree on with qemu-img. */
function infoFacts(i: Record<string, any>): unknown {
  const d = i['format-specific']?.data ?? {};
  return {
    format: i.format,
    'virtual-size': i['virtual-size'],
    'cluster-size': i['cluster-size'],
    type: i['format-specific']?.type,
    cid: d.cid,
    'parent-cid': d['parent-cid'],
    'create-type': d['create-type'],
    extents: (d.extents ?? []).map((e: Record<string, unknown>) => [e.format, e['virtual-size'], e['cluster-size'], e.compressed]),
  };
}

async function qemuCheckPasses(image: string): Promise<void> {
  const check = JSON.parse(await qemuImg('check', '--output=json', image));
  expect(check['check-errors']).toBe(0);
  expect(check.corruptions ?? 0).toBe(0);
}

/** The descriptor text of a VMDK: the file itself, or the area after a sparse header, up to the first NUL. */
async function descriptorOf(image: string): Promise<string> {
  const buf = await readFile(image);
  const text = buf.subarray(0, 4).toString('latin1') === 'KDMV' ? buf.subarray(SECTOR, 21 * SECTOR) : buf;
  const nul = text.indexOf(0);
  return text.subarray(0, nul < 0 ? text.length : nul).toString('utf8');
}

/** Descriptor text with the random CID and the file names taken out, so two creators can be compared. */
function comparableDescriptor(text: string, name: string): string {
  return text.replace(/^CID=[0-9a-f]+$/m, 'CID=*').split(name).join('NAME');
}

describe('reading VMDK images produced by qemu-img', () => {
  let dir: string;
  let source: string;
  inTempDirWithPatternedSource((made) => ({ dir, source } = made));

  const variants: Array<[string, string]> = [
    ['monolithicSparse', 'subformat=monolithicSparse'],
    ['streamOptimized', 'subformat=streamOptimized'],
    ['monolithicFlat', 'subformat=monolithicFlat'],
    ['twoGbMaxExtentSparse', 'subformat=twoGbMaxExtentSparse'],
    ['twoGbMaxExtentFlat', 'subformat=twoGbMaxExtentFlat'],
    ['zeroed_grain', 'zeroed_grain=on'],
    ['lsilogic adapter', 'adapter_type=lsilogic'],
    ['buslogic streamOptimized', 'adapter_type=buslogic,subformat=streamOptimized'],
    ['legacyESX monolithicFlat', 'adapter_type=legacyESX,subformat=monolithicFlat'],
    ['compat6', 'compat6=on'],
  ];

  for (const [name, opts] of variants) {
    it(`${name}: converts to raw identical to what qemu reads, and info agrees with qemu-img`, async () => {
      const { image } = await expectFerryReadsQemuImage(source, 'vmdk', ['-o', opts], join(dir, name.replace(/\W+/g, '_')));
      expect(infoFacts(await info('ferry', image))).toEqual(infoFacts(await info('qemu', image)));
    });
  }

  it('streamOptimized with a short last grain (size not a multiple of the grain)', async () => {
    const raw = join(dir, 'odd.raw');
    const image = join(dir, 'odd-stream.vmdk');
    const size = 10 * 1024 * 1024 + 4608;
    await makeImage(raw, 'raw', String(size), `write -P 0x99 ${size - 8192} 8192`, 'write -P 0x12 0 64k');
    await qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, image);
    await expectRawConversion(image, join(dir, 'odd-stream.raw'), raw);
    expect((await info('ferry', image))['virtual-size']).toBe(size);
  });

  it('info agrees with qemu-img on a size that is not a multiple of 512 (rounded up)', async () => {
    const raw = join(dir, 'odd1000.raw');
    await writeFile(raw, Buffer.alloc(3 * 1024 * 1024 + 1000, 0x41));
    for (const subformat of ['monolithicSparse', 'streamOptimized', 'monolithicFlat']) {
      const image = join(dir, `odd1000-${subformat}.vmdk`);
      await qemuImg('convert', '-O', 'vmdk', '-o', `subformat=${subformat}`, raw, image);
      const ours = await info('ferry', image);
      expect(ours['virtual-size']).toBe((await info('qemu', image))['virtual-size']);
      await expectRawConversion(image, join(dir, `odd1000-${subformat}.raw`));
    }
  });

  it('follows parentFileNameHint to the parent, and zeroed grains hide parent data', async () => {
    const base = join(dir, 'parent-base.vmdk');
    const top = join(dir, 'parent-top.vmdk');
    const baseRaw = join(dir, 'parent-base.raw');
    await makeImage(baseRaw, 'raw', '16M', 'write -P 0x33 0 16M');
    await qemuImg('convert', '-O', 'vmdk', baseRaw, base);
    await qemuImg('create', '-q', '-f', 'vmdk', '-o', 'zeroed_grain=on', '-b', 'parent-base.vmdk', '-F', 'vmdk', top);
    await qemuIo(top, 'vmdk', 'write -P 0x44 1M 128k', 'write -z 4M 1M', 'write -P 0x55 15M 64k');
    await expectRawConversion(top, join(dir, 'parent-top.raw'));
    const { ours, theirs } = await expectBackingChainAsQemu(top);
    expect(infoFacts(ours[0])).toEqual(infoFacts(theirs[0]));
  });

  it('refuses, as qemu does, a child whose parent changed after the child was made (parentCID mismatch)', async () => {
    const folder = join(dir, 'stale-parent');
    await mkdir(folder);
    const base = join(folder, 'base.vmdk');
    const top = join(folder, 'top.vmdk');
    await qemuImg('create', '-q', '-f', 'vmdk', base, '4M');
    await qemuImg('create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', top);
    await ferryOk(['convert', '-O', 'raw', top, join(folder, 'fresh.raw')]);
    await qemuIo(base, 'vmdk', 'write -P 0x21 0 64k'); // a write gives the parent a new CID
    await expect(qemuImg('convert', '-O', 'raw', top, join(folder, 'qemu.raw'))).rejects.toThrow();
    const r = await ferry(['convert', '-O', 'raw', top, join(folder, 'stale.raw')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/parentCID [0-9a-f]+ does not match CID [0-9a-f]+ of parent base\.vmdk/);
  });

  it('a hand-written descriptor with FLAT (at an offset) and SPARSE extents reads as qemu reads it', async () => {
    const folder = join(dir, 'multi');
    await mkdir(folder);
    await makeImage(join(folder, 'a.raw'), 'raw', '1M', 'write -P 0x61 0 1M');
    await makeImage(join(folder, 'b.raw'), 'raw', '3M', 'write -P 0x62 0 1M', 'write -P 0x63 1M 2M');
    const sparseRaw = join(folder, 'c.raw');
    await makeImage(sparseRaw, 'raw', '2M', 'write -P 0x64 512k 64k');
    await qemuImg('convert', '-O', 'vmdk', sparseRaw, join(folder, 'c.vmdk'));
    const image = join(folder, 'multi.vmdk');
    await writeFile(
      image,
      '# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n' +
        '# Extent description\nRW 2048 FLAT "a.raw" 0\nRW 4096 FLAT "b.raw" 2048\nRW 4096 SPARSE "c.vmdk"\n\nddb.adapterType = "ide"\n',
    );
    await expectRawConversion(image, join(folder, 'multi.out.raw'));
    expect(infoFacts(await info('ferry', image))).toEqual(infoFacts(await info('qemu', image)));
    // Plain extents are mapped to their own files, so the copy reads them directly.
    const map = (await ferry(['map', image])).stdout;
    expect(map).toMatch(new RegExp(`^0x100000 +0x200000 +0x100000 +${join(folder, 'b.raw')}$`, 'm'));
  });

  it('a ZERO extent reads as zeroes and counts toward the size, as VMware specifies (qemu skips ZERO lines)', async () => {
    const folder = join(dir, 'zero-extent');
    await mkdir(folder);
    await writeFile(join(folder, 'a.raw'), Buffer.alloc(1024 * 1024, 0x61));
    await writeFile(join(folder, 'b.raw'), Buffer.alloc(2 * 1024 * 1024, 0x62));
    const image = join(folder, 'zero.vmdk');
    await writeFile(
      image,
      '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n' +
        'RW 2048 FLAT "a.raw" 0\nRW 1024 ZERO\nRDONLY 2048 FLAT "b.raw" 2048\n',
    );
    const expected = join(folder, 'expected.raw');
    await writeFile(expected, Buffer.concat([Buffer.alloc(1024 * 1024, 0x61), Buffer.alloc(512 * 1024), Buffer.alloc(1024 * 1024, 0x62)]));
    const out = join(folder, 'zero.out.raw');
    await ferryOk(['convert', '-O', 'raw', image, out]);
    expect((await stat(out)).size).toBe(2.5 * 1024 * 1024);
    expect(await imagesIdentical(expected, out)).toBe(true);
    const ours = await info('ferry', image);
    expect(ours['virtual-size']).toBe(2.5 * 1024 * 1024);
    expect(ours['format-specific'].data.extents.map((e: Record<string, unknown>) => e.format)).toEqual(['FLAT', 'ZERO', 'FLAT']);
  });

  it('reads an ESX sparse (COWD) extent, alone and as a VMFSSPARSE extent of a vmfsSparse descriptor', async () => {
    const folder = join(dir, 'cowd');
    await mkdir(folder);
    const grainSectors = 8;
    const capacity = 8192; // sectors: one grain table of 4096 grains covers it
    const header = Buffer.alloc(SECTOR);
    header.write('COWD', 0, 'latin1');
    header.writeUInt32LE(1, 4); // version
    header.writeUInt32LE(3, 8); // flags
    header.writeUInt32LE(capacity, 12);
    header.writeUInt32LE(grainSectors, 16);
    header.writeUInt32LE(4, 20); // grain directory at sector 4
    header.writeUInt32LE(1, 24); // one directory entry
    const gd = Buffer.alloc(SECTOR);
    gd.writeUInt32LE(5, 0); // grain table at sector 5, 32 sectors long
    const gt = Buffer.alloc(4096 * 4);
    gt.writeUInt32LE(40, 0); // grain 0
    gt.writeUInt32LE(48, 100 * 4); // grain 100
    // QEMU insists on a CID in the sector after any sparse header, though ESX sparse extents have none.
    const cidText = Buffer.alloc(3 * SECTOR);
    cidText.write('# Disk DescriptorFile\nCID=12\nparentCID=ffffffff\n', 'latin1');
    const file = Buffer.concat([header, cidText, gd, gt, Buffer.alloc(3 * SECTOR), Buffer.alloc(4096, 0x41), Buffer.alloc(4096, 0x42)]);
    expect(file.length).toBe(56 * SECTOR);
    const cowd = join(folder, 'esx-sparse.vmdk');
    await writeFile(cowd, file);
    const descriptor = join(folder, 'esx.vmdk');
    const head = '# Disk DescriptorFile\nversion=1\nCID=00000001\nparentCID=ffffffff\ncreateType="vmfsSparse"\n\n';
    await writeFile(descriptor, `${head}RW ${capacity} VMFSSPARSE "esx-sparse.vmdk"\n`);
    const alone = `${cowd}.raw`;
    await expectRawConversion(cowd, alone);
    // All but the CIDs, which QEMU reads from the sector after any sparse header (ESX extents keep none).
    const withoutCid = async (tool: 'ferry' | 'qemu') => ({ ...(infoFacts(await info(tool, cowd)) as object), cid: 0, 'parent-cid': 0 });
    expect(await withoutCid('ferry')).toEqual(await withoutCid('qemu'));
    const raw = await readFile(alone);
    expect(raw.subarray(100 * 4096, 101 * 4096).every((b) => b === 0x42)).toBe(true);
    // qemu 7.2 lists a VMFSSPARSE extent twice (an 8 MiB disk from 8192 sectors), so Ferry's own reading of
    // the extent alone is the reference here.
    const viaDescriptor = `${descriptor}.raw`;
    await ferryOk(['convert', '-O', 'raw', descriptor, viaDescriptor]);
    expect((await readFile(viaDescriptor)).equals(raw)).toBe(true);
    expect((await info('ferry', descriptor))['format-specific'].data['create-type']).toBe('vmfsSparse');
  });

  it('probes a descriptor that starts with comments and "version=1" as QEMU does', async () => {
    const folder = join(dir, 'probe');
    await mkdir(folder);
    await writeFile(join(folder, 'data.raw'), Buffer.alloc(512 * 1024, 0x70));
    const image = join(folder, 'probe.vmdk');
    const body = 'version=1\nCID=2\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 1024 FLAT "data.raw" 0\n';
    await writeFile(image, `# written by hand\n   \n${body}`);
    expect((await info('qemu', image)).format).toBe('vmdk');
    expect((await info('ferry', image)).format).toBe('vmdk');
    // An empty line is not among what QEMU skips: such a file is raw to both.
    const notProbed = join(folder, 'not-probed.vmdk');
    await writeFile(notProbed, `# written by hand\n\n${body}`);
    expect((await info('qemu', notProbed)).format).toBe('raw');
    expect((await info('ferry', notProbed)).format).toBe('raw');
  });
});

describe('writing VMDK', () => {
  let dir: string;
  let source: string;
  inTempDirWithPatternedSource((made) => ({ dir, source } = made));

  const subformats = ['monolithicSparse', 'streamOptimized', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat'];

  for (const subformat of subformats) {
    it(`${subformat}: compares identical to its source, passes qemu-img check, reads back, and info agrees with qemu-img`, async () => {
      const folder = join(dir, subformat);
      await mkdir(folder);
      const out = join(folder, 'disk.vmdk');
      await ferryOk(['convert', '-O', 'vmdk', '-o', `subformat=${subformat}`, source, out]);
      expect(await imagesIdentical(source, out)).toBe(true);
      await qemuCheckPasses(out);
      await expectRawConversion(out, join(folder, 'back.raw'), source);
      expect(infoFacts(await info('ferry', out))).toEqual(infoFacts(await info('qemu', out)));
      // Nothing but the image's own files (and the read-back copy) is left in the folder.
      const names: Record<string, string[]> = {
        monolithicSparse: ['disk.vmdk'],
        streamOptimized: ['disk.vmdk'],
        monolithicFlat: ['disk.vmdk', 'disk-flat.vmdk'],
        twoGbMaxExtentSparse: ['disk.vmdk', 'disk-s001.vmdk'],
        twoGbMaxExtentFlat: ['disk.vmdk', 'disk-f001.vmdk'],
      };
      expect((await readdir(folder)).filter((f) => f !== 'back.raw').sort()).toEqual(names[subformat].sort());
    });
  }

  it('split subformats with several extents: data across the 2 GiB boundary, read and written', async () => {
    const folder = join(dir, 'split');
    await mkdir(folder);
    const raw = join(folder, 'big.raw');
    await makeImage(raw, 'raw', String(5 * 1024 ** 3 + 64 * 1024), 'write -P 0x37 2047M 2M', 'write -P 0x39 4095M 3M', `write -P 0x3a ${5 * 1024 ** 3} 64k`);
    for (const subformat of ['twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']) {
      const theirs = join(folder, `qemu-${subformat}.vmdk`);
      await qemuImg('convert', '-O', 'vmdk', '-o', `subformat=${subformat}`, raw, theirs);
      await expectRawConversion(theirs, join(folder, `qemu-${subformat}.raw`), raw);
      const ours = join(folder, `ferry-${subformat}.vmdk`);
      await ferryOk(['convert', '-O', 'vmdk', '-o', `subformat=${subformat}`, raw, ours]);
      expect(await imagesIdentical(raw, ours)).toBe(true);
      await qemuCheckPasses(ours);
      expect((await descriptorOf(ours)).match(/^RW \d+ \w+ ".*"/gm)).toHaveLength(3);
      expect(infoFacts(await info('ferry', ours))).toEqual(infoFacts(await info('qemu', ours)));
    }
  });

  it('writes the descriptor qemu-img writes, for every adapter type and version option', async () => {
    const cases = [
      'subformat=monolithicFlat',
      'subformat=monolithicFlat,adapter_type=lsilogic',
      'subformat=monolithicFlat,adapter_type=buslogic,hwversion=11',
      'subformat=monolithicFlat,adapter_type=legacyESX,compat6=on',
      'subformat=monolithicFlat,toolsversion=10304',
      'subformat=twoGbMaxExtentSparse,adapter_type=lsilogic',
      'subformat=monolithicSparse,adapter_type=buslogic',
      'subformat=streamOptimized,adapter_type=lsilogic,hwversion=undefined',
    ];
    for (const [i, opts] of cases.entries()) {
      const folder = join(dir, `descriptor-${i}`);
      await mkdir(folder);
      const ours = join(folder, 'ferry.vmdk');
      const theirs = join(folder, 'qemu.vmdk');
      await ferryOk(['convert', '-O', 'vmdk', '-o', opts, source, ours]);
      await qemuImg('convert', '-O', 'vmdk', '-o', opts, source, theirs);
      const a = comparableDescriptor(await descriptorOf(ours), 'ferry');
      const b = comparableDescriptor(await descriptorOf(theirs), 'qemu');
      expect(a, opts).toBe(b);
      expect(a).toMatch(/^ddb\.geometry\.cylinders = "\d+"$/m);
    }
  });

  it('monolithicSparse: header, grain directory and its redundant copy are byte-identical to qemu-img output', async () => {
    for (const opts of ['subformat=monolithicSparse', 'zeroed_grain=on']) {
      const ours = join(dir, `layout-ferry-${opts.replace(/\W+/g, '_')}.vmdk`);
      const theirs = join(dir, `layout-qemu-${opts.replace(/\W+/g, '_')}.vmdk`);
      await ferryOk(['convert', '-O', 'vmdk', '-o', opts, source, ours]);
      await qemuImg('convert', '-O', 'vmdk', '-o', opts, source, theirs);
      const a = await readFile(ours);
      const b = await readFile(theirs);
      expect(a.subarray(0, SECTOR).equals(b.subarray(0, SECTOR))).toBe(true);
      const rgd = Number(a.readBigUInt64LE(48));
      const gd = Number(a.readBigUInt64LE(56));
      const grains = Number(a.readBigUInt64LE(64));
      // Both directories, sized from the header; the tables after each may differ in allocation order.
      const gdBytes = Math.ceil((Math.ceil(Number(a.readBigUInt64LE(12)) / 128 / 512) * 4) / SECTOR) * SECTOR;
      for (const at of [rgd, gd]) expect(a.subarray(at * SECTOR, at * SECTOR + gdBytes).equals(b.subarray(at * SECTOR, at * SECTOR + gdBytes))).toBe(true);
      expect(grains).toBe(128);
      expect(a.length).toBe(b.length);
      await qemuCheckPasses(ours);
    }
  });

  it('streamOptimized is laid out as a stream: version 3, markers for every grain and table, footer and end-of-stream', async () => {
    const out = join(dir, 'layout-stream.vmdk');
    await ferryOk(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', source, out]);
    const b = await readFile(out);
    expect(b.subarray(0, 4).toString('latin1')).toBe('KDMV');
    expect(b.readUInt32LE(4)).toBe(3);
    expect(b.readUInt32LE(8)).toBe(0x30001); // newline test, compressed grains, markers
    expect(b.readBigUInt64LE(56)).toBe(GD_AT_END);
    expect(b.readUInt16LE(77)).toBe(1); // deflate
    const end = b.length;
    expect(end % SECTOR).toBe(0);
    // Footer marker, footer (a header with the real directory offset), end-of-stream marker.
    expect(b.readUInt32LE(end - 3 * SECTOR + 12)).toBe(3);
    expect(b.subarray(end - 2 * SECTOR, end - 2 * SECTOR + 4).toString('latin1')).toBe('KDMV');
    expect(b.subarray(end - SECTOR, end).every((x) => x === 0)).toBe(true);
    const gdSector = Number(b.readBigUInt64LE(end - 2 * SECTOR + 56));
    // Walk the stream from the first grain: every record is a grain or a metadata marker.
    const seen = { grains: 0, tables: 0, directories: 0, footers: 0 };
    const tableSectors: number[] = [];
    let at = Number(b.readBigUInt64LE(64)) * SECTOR;
    let lastLba = -1;
    for (;;) {
      const size = b.readUInt32LE(at + 8);
      if (size > 0) {
        const lba = Number(b.readBigUInt64LE(at));
        expect(lba).toBeGreaterThan(lastLba);
        lastLba = lba;
        seen.grains++;
        at += Math.ceil((12 + size) / SECTOR) * SECTOR;
        continue;
      }
      const sectors = Number(b.readBigUInt64LE(at));
      const type = b.readUInt32LE(at + 12);
      if (type === 0) break;
      if (type === 1) {
        seen.tables++;
        tableSectors.push(at / SECTOR + 1);
      }
      if (type === 2) {
        seen.directories++;
        expect(at / SECTOR + 1).toBe(gdSector);
      }
      if (type === 3) seen.footers++;
      at += (1 + sectors) * SECTOR;
    }
    expect(at).toBe(end - SECTOR);
    expect(seen.directories).toBe(1);
    expect(seen.footers).toBe(1);
    expect(seen.grains).toBeGreaterThan(100);
    // The directory points at exactly the tables written, each behind its marker.
    const directory: number[] = [];
    for (let i = 0; i < 2; i++) directory.push(b.readUInt32LE(gdSector * SECTOR + i * 4));
    expect(directory.filter((s) => s !== 0)).toEqual(tableSectors);
    expect(seen.tables).toBe(2);
  });

  it('streamOptimized with a short last grain and a size that is not a multiple of 512, read by qemu', async () => {
    for (const size of [10 * 1024 * 1024 + 4608, 3 * 1024 * 1024 + 1000]) {
      const raw = join(dir, `short-${size}.raw`);
      const data = Buffer.alloc(size, 0x5c);
      data.fill(0, 64 * 1024, 3 * 1024 * 1024);
      await writeFile(raw, data);
      for (const subformat of ['streamOptimized', 'monolithicSparse', 'monolithicFlat']) {
        const out = join(dir, `short-${size}-${subformat}.vmdk`);
        await ferryOk(['convert', '-O', 'vmdk', '-o', `subformat=${subformat}`, raw, out]);
        expect(await imagesIdentical(raw, out), `${subformat} ${size}`).toBe(true);
        const theirs = await info('qemu', out);
        expect(theirs['virtual-size']).toBe(Math.ceil(size / SECTOR) * SECTOR);
        expect((await info('ferry', out))['virtual-size']).toBe(theirs['virtual-size']);
        await qemuCheckPasses(out);
      }
    }
  });

  it('-S 0 writes zeroes as data: every grain of the stream is stored', async () => {
    const out = join(dir, 'dense-stream.vmdk');
    await ferryOk(['convert', '-S', '0', '-O', 'vmdk', '-o', 'subformat=streamOptimized', source, out]);
    expect(await imagesIdentical(source, out)).toBe(true);
    const map = JSON.parse(await qemuImg('map', '--output=json', out)) as Array<Record<string, unknown>>;
    expect(map.every((m) => m.data === true)).toBe(true);
  });

  it('cross conversions: qcow2 -> streamOptimized -> qcow2, and qemu streamOptimized -> qcow2', async () => {
    const qcow = join(dir, 'cross-src.qcow2');
    await qemuImg('convert', '-c', '-O', 'qcow2', source, qcow);
    const stream = join(dir, 'cross.vmdk');
    await ferryOk(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', qcow, stream]);
    const again = join(dir, 'cross.qcow2');
    await ferryOk(['convert', '-O', 'qcow2', stream, again]);
    expect(await imagesIdentical(source, again)).toBe(true);
    const theirs = join(dir, 'cross-qemu.vmdk');
    await qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', qcow, theirs);
    const fromTheirs = join(dir, 'cross-qemu.qcow2');
    await ferryOk(['convert', '-O', 'qcow2', theirs, fromTheirs]);
    await qemuCheckPasses(fromTheirs);
    expect(await imagesIdentical(source, fromTheirs)).toBe(true);
    const sparse = join(dir, 'cross-sparse.vmdk');
    await ferryOk(['convert', '-O', 'vmdk', fromTheirs, sparse]);
    expect(await imagesIdentical(source, sparse)).toBe(true);
  });

  it('refuses bad options as qemu-img does', async () => {
    const cases: Array<[string, RegExp]> = [
      ['compat6=on,hwversion=7', /compat6 cannot be enabled with hwversion set/],
      ['subformat=monolithicFlat,zeroed_grain=on', /flat images can't enable zeroed grain/],
      ['adapter_type=scsi', /adapter_type=scsi/],
      ['subformat=vmfs', /subformat=vmfs/],
      ['toolsversion=1"2', /toolsversion must not contain quotes/],
    ];
    for (const [opts, pattern] of cases) {
      const folder = join(dir, `badopt-${opts.replace(/\W+/g, '_')}`);
      await mkdir(folder);
      const r = await ferry(['convert', '-O', 'vmdk', '-o', opts, source, join(folder, 'x.vmdk')]);
      expect(r.code, opts).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(pattern);
      expect(await readdir(folder)).toEqual([]);
    }
  });

  it('a conversion that fails half-way leaves none of the files of any subformat behind', async () => {
    const folder = join(dir, 'fails');
    await mkdir(folder);
    // A qcow2 source whose compressed cluster in the middle of the disk is garbage: found only while copying.
    const raw = join(folder, 'src.raw');
    await makeImage(raw, 'raw', '8M', 'write -P 0x42 0 8M');
    const bad = join(folder, 'src.qcow2');
    await qemuImg('convert', '-c', '-O', 'qcow2', raw, bad);
    const b = await readFile(bad);
    const l1 = Number(b.readBigUInt64BE(40));
    const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const entry = b.readBigUInt64BE(l2 + 8 * 100);
    const offset = Number(entry & ((1n << 54n) - 1n));
    b.fill(0xff, offset, offset + 16);
    await writeFile(bad, b);
    for (const subformat of subformats) {
      const r = await ferry(['convert', '-O', 'vmdk', '-o', `subformat=${subformat}`, bad, join(folder, 'out.vmdk')]);
      expect(r.code, subformat).toBe(1);
      expect(r.stderr).toMatch(/cannot be decompressed/);
      expect((await readdir(folder)).sort(), subformat).toEqual(['src.qcow2', 'src.raw']);
    }
  });
});

/**
 * VMDKs from strangers: each hostile input ends in a one-line error naming the file, in bounded memory,
 * without hanging, and leaves no output behind.
 */
describe('hostile VMDK inputs', () => {
  let dir: string;
  let sparse: Buffer;
  let stream: Buffer;

  inTempDir(async (made) => {
    dir = made;
    const raw = join(dir, 'small.raw');
    await makeImage(raw, 'raw', '8M', 'write -P 0xab 0 1M', 'write -P 0xcd 5M 64k');
    await qemuImg('convert', '-O', 'vmdk', raw, join(dir, 'small.vmdk'));
    sparse = await readFile(join(dir, 'small.vmdk'));
    await ferryOk(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, join(dir, 'small-stream.vmdk')]);
    stream = await readFile(join(dir, 'small-stream.vmdk'));
  });

  /** Writes `files` into a folder (null: made there already), converts `input.vmdk` and checks the refusal. */
  async function expectRefused(name: string, files: Record<string, Buffer | string | null>, pattern: RegExp): Promise<void> {
    const folder = join(dir, name);
    await mkdir(folder, { recursive: true });
    for (const [file, content] of Object.entries(files)) if (content !== null) await writeFile(join(folder, file), content);
    const r = await ferry(['convert', '-O', 'raw', join(folder, 'input.vmdk'), join(folder, 'out.raw')], { timeoutMs: 20_000 });
    expect(r.code, r.stderr).toBe(1);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(pattern);
    expect(lines[0]).toContain(join(folder, 'input.vmdk'));
    expect(lines[0]).not.toMatch(/at .*\.js:\d+/);
    expect(r.maxRssKiB).toBeGreaterThan(0);
    expect(r.maxRssKiB).toBeLessThan(256 * 1024);
    expect((await readdir(folder)).sort()).toEqual(Object.keys(files).sort());
  }

  function patched(base: Buffer, edit: (b: Buffer) => void): Buffer {
    const b = Buffer.from(base);
    edit(b);
    return b;
  }

  /** Byte offset of the first grain table of the sparse image. */
  function firstTable(b: Buffer): number {
    const gd = Number(b.readBigUInt64LE(56)) * SECTOR;
    return b.readUInt32LE(gd) * SECTOR;
  }

  const descriptor = (body: string) => `# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n${body}`;

  it('truncated header', async () => {
    await expectRefused('truncated', { 'input.vmdk': sparse.subarray(0, 40) }, /truncated VMDK sparse header/);
  });

  it('grain size 0, not a power of two, and 2^20 sectors', async () => {
    for (const [i, grain] of [0n, 3n, 1n << 20n].entries()) {
      await expectRefused(`grain-${i}`, { 'input.vmdk': patched(sparse, (b) => b.writeBigUInt64LE(grain, 20)) }, /grain size of \d+ sectors must be a power of two/);
    }
  });

  it('numGTEsPerGT 0 and 2^31', async () => {
    for (const n of [0, 0x80000000]) {
      await expectRefused(`gtes-${n}`, { 'input.vmdk': patched(sparse, (b) => b.writeUInt32LE(n, 44)) }, new RegExp(`numGTEsPerGT ${n} out of range`));
    }
  });

  it('capacity 2^62 and capacity past what a sparse extent can address', async () => {
    await expectRefused('capacity-62', { 'input.vmdk': patched(sparse, (b) => b.writeBigUInt64LE(1n << 62n, 12)) }, /capacity \d+ is out of range/);
    await expectRefused('capacity-40', { 'input.vmdk': patched(sparse, (b) => b.writeBigUInt64LE(1n << 40n, 12)) }, /exceeds the 2 TiB/);
  });

  it('grain directory past the end of the file', async () => {
    await expectRefused('gd-eof', { 'input.vmdk': patched(sparse, (b) => b.writeBigUInt64LE(1n << 30n, 56)) }, /grain directory .* lies outside the file/);
  });

  it('grain directory entry pointing past the end of the file', async () => {
    const edit = (b: Buffer) => b.writeUInt32LE(0x7fffffff, Number(b.readBigUInt64LE(56)) * SECTOR);
    await expectRefused('gde-eof', { 'input.vmdk': patched(sparse, edit) }, /grain table at \d+ lies past the end of the file/);
  });

  it('grain table entry 2^32-1', async () => {
    const edit = (b: Buffer) => b.writeUInt32LE(0xffffffff, firstTable(b));
    await expectRefused('gte-max', { 'input.vmdk': patched(sparse, edit) }, /points to sector 4294967295, past the end of the file/);
  });

  it('grain offset past the end of the file (truncated image)', async () => {
    await expectRefused('truncated-grains', { 'input.vmdk': sparse.subarray(0, 40 * SECTOR) }, /file truncated/);
  });

  it('unknown version and unknown compression', async () => {
    await expectRefused('version', { 'input.vmdk': patched(sparse, (b) => b.writeUInt32LE(4, 4)) }, /version 4 is not supported/);
    await expectRefused('compression', { 'input.vmdk': patched(sparse, (b) => b.writeUInt16LE(7, 77)) }, /unknown VMDK compression algorithm 7/);
  });

  it('stream-optimized: truncated footer, and a footer that defers to itself', async () => {
    await expectRefused('stream-cut', { 'input.vmdk': stream.subarray(0, stream.length - SECTOR) }, /footer marker|end-of-stream/);
    const selfRef = patched(stream, (b) => b.writeBigUInt64LE(GD_AT_END, b.length - 2 * SECTOR + 56));
    await expectRefused('stream-footer-gd', { 'input.vmdk': selfRef }, /footer .* must give the grain directory offset/);
  });

  it('stream-optimized: corrupt compressed grain and an impossible grain marker size', async () => {
    const first = Number(stream.readBigUInt64LE(64)) * SECTOR;
    await expectRefused('stream-zlib', { 'input.vmdk': patched(stream, (b) => b.fill(0xff, first + 12, first + 40)) }, /compressed grain .* cannot be decompressed/);
    await expectRefused('stream-size', { 'input.vmdk': patched(stream, (b) => b.writeUInt32LE(0x7fffffff, first + 8)) }, /invalid compressed size/);
  });

  it('descriptor larger than 1 MiB', async () => {
    const big = descriptor('createType="monolithicFlat"\n') + '#'.repeat(2 * 1024 * 1024);
    await expectRefused('desc-big', { 'input.vmdk': big }, /descriptor file of \d+ bytes exceeds the 1048576-byte limit/);
  });

  it('more extents than the limit', async () => {
    const many = descriptor('createType="monolithicFlat"\n' + 'RW 1 ZERO\n'.repeat(5000));
    await expectRefused('many-extents', { 'input.vmdk': many }, /more than 4096 extents/);
  });

  it('extent sizes and offsets that do not add up', async () => {
    const small = Buffer.alloc(4096, 1);
    const flat = (line: string) => ({ 'input.vmdk': descriptor(`createType="monolithicFlat"\n${line}\n`), 'd.raw': small });
    await expectRefused('flat-short', flat('RW 16 FLAT "d.raw" 0'), /FLAT extent needs 8192 bytes/);
    await expectRefused('flat-offset', flat('RW 8 FLAT "d.raw" 4'), /FLAT extent needs 6144 bytes/);
    await expectRefused(
      'sparse-size',
      { 'input.vmdk': descriptor('createType="twoGbMaxExtentSparse"\nRW 2048 SPARSE "s.vmdk"\n'), 's.vmdk': sparse },
      /descriptor gives 2048 sectors but .* has a capacity of 16384/,
    );
    await expectRefused('zero-sectors', flat('RW 0 FLAT "d.raw" 0'), /invalid extent line 6 \(size of 0 sectors/);
    await expectRefused('huge-sectors', { 'input.vmdk': descriptor('createType="monolithicFlat"\nRW 99999999999999999 ZERO\n') }, /invalid extent line/);
    await expectRefused('no-offset', flat('RW 8 FLAT "d.raw"'), /a FLAT extent needs an offset/);
  });

  it('unsupported image and extent types', async () => {
    await expectRefused('create-type', { 'input.vmdk': descriptor('createType="fullDevice"\nRW 8 FLAT "/dev/sda" 0\n') }, /image type 'fullDevice' is not supported/);
    await expectRefused('no-create-type', { 'input.vmdk': descriptor('RW 8 ZERO\n') }, /no createType/);
    await expectRefused('extent-type', { 'input.vmdk': descriptor('createType="vmfs"\nRW 8 VMFSRDM "x-rdm.vmdk"\n') }, /extent type VMFSRDM is not supported/);
  });

  it('a flat extent named /etc/passwd or ../../etc/passwd is refused without --allow-external', async () => {
    for (const [i, name] of ['/etc/passwd', '../../../../../../../../etc/passwd'].entries()) {
      const files = { 'input.vmdk': descriptor(`createType="monolithicFlat"\nRW 1 FLAT "${name}" 0\n`) };
      await expectRefused(`passwd-${i}`, files, /extent '.*etc\/passwd' resolves to \/etc\/passwd, outside the image's folder.*--allow-external/);
    }
  });

  it('a sparse extent or parent outside the folder is refused, and allowed with --allow-external', async () => {
    const outside = join(dir, 'outside.vmdk');
    await writeFile(outside, sparse);
    const sparseOutside = descriptor('createType="twoGbMaxExtentSparse"\nRW 16384 SPARSE "../outside.vmdk"\n');
    await expectRefused('sparse-outside', { 'input.vmdk': sparseOutside }, /outside the image's folder/);
    const folder = join(dir, 'parent-outside');
    await mkdir(folder);
    const top = join(folder, 'input.vmdk');
    await qemuImg('create', '-q', '-f', 'vmdk', '-b', outside, '-F', 'vmdk', top);
    const refused = await ferry(['convert', '-O', 'raw', top, join(folder, 'out.raw')]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/backing file .* outside the image's folder/);
    expect(await readdir(folder)).toEqual(['input.vmdk']);
    await ferryOk(['convert', '--allow-external', '-O', 'raw', top, join(folder, 'out.raw')]);
    expect(await imagesIdentical(outside, join(folder, 'out.raw'))).toBe(true);
  });

  it('a flat extent outside the folder is read with --allow-external', async () => {
    const folder = join(dir, 'flat-allowed');
    await mkdir(folder);
    const outside = join(dir, 'outside-flat.raw');
    await writeFile(outside, Buffer.alloc(8192, 0x6b));
    await writeFile(join(folder, 'input.vmdk'), descriptor(`createType="monolithicFlat"\nRW 16 FLAT "${outside}" 0\n`));
    await ferryOk(['convert', '--allow-external', '-O', 'raw', join(folder, 'input.vmdk'), join(folder, 'out.raw')]);
    expect((await readFile(join(folder, 'out.raw'))).equals(await readFile(outside))).toBe(true);
  });

  it('a parent that is the image itself', async () => {
    const withParent = Buffer.from(sparse);
    const original = await descriptorOf(join(dir, 'small.vmdk'));
    // Its own CID as parentCID, so that only the loop is wrong.
    const cid = /^CID=([0-9a-f]+)$/m.exec(original)![1];
    const text = original
      .replace('parentCID=ffffffff', `parentCID=${cid}`)
      .replace('createType="monolithicSparse"\n', 'createType="monolithicSparse"\nparentFileNameHint="input.vmdk"\n');
    withParent.fill(0, SECTOR, 21 * SECTOR);
    withParent.write(text, SECTOR);
    await expectRefused('self-parent', { 'input.vmdk': withParent }, /backing chain loops/);
  });

  it('an extent that is a FIFO is refused instead of blocking for ever', async () => {
    const folder = join(dir, 'fifo');
    await mkdir(folder);
    execFileSync('mkfifo', [join(folder, 'pipe.raw')]);
    await expectRefused('fifo', { 'input.vmdk': descriptor('createType="monolithicFlat"\nRW 8 FLAT "pipe.raw" 0\n'), 'pipe.raw': null }, /pipe\.raw is not a regular file/);
  });

  it('a missing extent file', async () => {
    await expectRefused('missing', { 'input.vmdk': descriptor('createType="monolithicFlat"\nRW 8 FLAT "nowhere.raw" 0\n') }, /extent 'nowhere.raw' not found/);
  });

  it('an extent that is not a sparse file, and a sparse extent that is a descriptor', async () => {
    await expectRefused(
      'not-sparse',
      { 'input.vmdk': descriptor('createType="twoGbMaxExtentSparse"\nRW 8 SPARSE "d.raw"\n'), 'd.raw': Buffer.alloc(4096, 7) },
      /is not a VMDK sparse extent/,
    );
    const capacityZero = patched(sparse, (b) => b.writeBigUInt64LE(0n, 12));
    await expectRefused(
      'capacity-zero-extent',
      { 'input.vmdk': descriptor('createType="twoGbMaxExtentSparse"\nRW 8 SPARSE "s.vmdk"\n'), 's.vmdk': capacityZero },
      /has capacity 0/,
    );
  });
});
