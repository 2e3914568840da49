/**
 * NTFS used clusters: free space read from real volumes made by mkntfs (files added with ntfscp, nothing
 * mounted), checked against ntfsinfo's free cluster count and each file's runs; a capture of a partitioned
 * disk that leaves the free space behind and still passes ntfsfix; a dirty volume copied whole; hostile
 * variants (fixups, runs, sizes) edited in place with their update sequences reapplied, so only the named
 * field is wrong.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ntfsUsage, type NtfsUsage } from '../src/capture/ntfs.js';
import type { ReadAt } from '../src/capture/ranges.js';
import { doneLine, ferry, imagesIdentical, requireTool, tempDir } from './helpers/env.js';
import { startSshd, type TestSshd } from './helpers/sshd.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const IMAGE_SIZE = 64 * MiB;

let work: { dir: string; cleanup: () => Promise<void> };

beforeAll(async () => {
  work = await tempDir('ferry-ntfs-');
});

afterAll(async () => {
  await work?.cleanup();
});

interface SourceFile {
  name: string;
  data: Buffer;
}

/** An NTFS volume of `size` bytes holding `files` (mkntfs -Q, then ntfscp); free space keeps `garbage` if asked. */
async function makeNtfs(name: string, files: SourceFile[], opts: { size?: number; mkntfs?: string[]; garbage?: boolean } = {}): Promise<string> {
  requireTool('mkntfs', 'ntfs-3g');
  requireTool('ntfscp', 'ntfs-3g');
  const size = opts.size ?? IMAGE_SIZE;
  const image = join(work.dir, name);
  const h = await open(image, 'w');
  await h.truncate(size);
  if (opts.garbage) for (let at = 0; at < size; at += 16 * MiB) await h.write(randomBytes(Math.min(16 * MiB, size - at)), 0, Math.min(16 * MiB, size - at), at);
  await h.close();
  // -Q: no zeroing, so the garbage stays where the volume does not write. -F: a file, not a block device.
  await run('mkntfs', ['-q', '-F', '-Q', ...(opts.mkntfs ?? []), image]);
  for (const f of files) {
    const local = join(work.dir, `${name}.${f.name}`);
    await writeFile(local, f.data);
    await run('ntfscp', [image, local, f.name]);
  }
  return image;
}

/** ntfsUsage over a file (or `length` bytes of it from `start`), counting the reads it makes. */
async function usageOf(image: string, start = 0, length?: number): Promise<{ usage: NtfsUsage | undefined; reads: number }> {
  const h = await open(image, 'r');
  try {
    const end = (await h.stat()).size;
    let reads = 0;
    const read: ReadAt = async (offset, bytes) => {
      reads++;
      if (offset + bytes > end) throw new RangeError(`read past the end: ${offset}+${bytes}`);
      const buf = Buffer.alloc(bytes);
      await h.read(buf, 0, bytes, offset);
      return buf;
    };
    return { usage: await ntfsUsage(read, start, length ?? end - start, 4), reads };
  } finally {
    await h.close();
  }
}

async function ntfsinfo(...args: string[]): Promise<string> {
  requireTool('ntfsinfo', 'ntfs-3g');
  return (await run('ntfsinfo', args)).stdout;
}

/** Cluster size and free clusters as ntfs-3g counts them from $Bitmap. */
async function volumeCounts(image: string): Promise<{ clusterSize: number; freeClusters: number }> {
  const out = await ntfsinfo('-m', image);
  const clusterSize = /Cluster Size: (\d+)/.exec(out);
  const free = /Free Clusters: (\d+)/.exec(out);
  if (!clusterSize || !free) throw new Error(`ntfsinfo -m printed no cluster counts: ${out}`);
  return { clusterSize: Number(clusterSize[1]), freeClusters: Number(free[1]) };
}

/** The [lcn, count] runs of a file's (or, with a number, an MFT record's) data, as ntfsinfo lists them. */
async function runsOf(image: string, file: string | number): Promise<Array<[number, number]>> {
  const out = await ntfsinfo('-v', ...(typeof file === 'number' ? ['-i', String(file)] : ['-F', file]), image);
  return [...out.matchAll(/^\t+0x[0-9a-f]+\t+0x([0-9a-f]+)\t+0x([0-9a-f]+)$/gm)].map((m) => [parseInt(m[1], 16), parseInt(m[2], 16)]);
}

function freeBytes(usage: NtfsUsage): number {
  return usage.free.reduce((n, [a, b]) => n + b - a, 0);
}

function inFree(usage: NtfsUsage, from: number, to: number): boolean {
  return usage.free.some(([a, b]) => a < to && from < b);
}

interface Boot {
  bytesPerSector: number;
  clusterSize: number;
  mftOffset: number;
  recordSize: number;
}

async function bootOf(image: string): Promise<Boot> {
  const boot = (await readFile(image)).subarray(0, 512);
  const bytesPerSector = boot.readUInt16LE(0x0b);
  const spc = boot[0x0d] <= 0x80 ? boot[0x0d] : 2 ** (256 - boot[0x0d]);
  const clusterSize = bytesPerSector * spc;
  const recordField = boot.readInt8(0x40);
  return {
    bytesPerSector,
    clusterSize,
    mftOffset: Number(boot.readBigUInt64LE(0x30)) * clusterSize,
    recordSize: recordField > 0 ? recordField * clusterSize : 2 ** -recordField,
  };
}

async function patch(image: string, offset: number, bytes: Buffer): Promise<void> {
  const h = await open(image, 'r+');
  await h.write(bytes, 0, bytes.length, offset);
  await h.close();
}

/**
 * Edits MFT record `n` (mkntfs keeps the first records contiguous at the boot sector's $MFT cluster) with its
 * update sequence undone, then protects it again, as NTFS does before every write.
 */
async function editRecord(image: string, n: number, edit: (rec: Buffer) => void): Promise<void> {
  const { mftOffset, recordSize } = await bootOf(image);
  const offset = mftOffset + n * recordSize;
  const h = await open(image, 'r+');
  try {
    const rec = Buffer.alloc(recordSize);
    await h.read(rec, 0, recordSize, offset);
    const usa = rec.readUInt16LE(4);
    for (let i = 1; i <= recordSize / 512; i++) rec.copy(rec, i * 512 - 2, usa + 2 * i, usa + 2 * i + 2);
    edit(rec);
    protect(rec);
    await h.write(rec, 0, recordSize, offset);
  } finally {
    await h.close();
  }
}

/** Saves the last word of every 512 bytes into the update sequence array and stamps the sequence number there. */
function protect(rec: Buffer): void {
  const usa = rec.readUInt16LE(4);
  const usn = rec.readUInt16LE(usa);
  for (let i = 1; i <= rec.length / 512; i++) {
    rec.copy(rec, usa + 2 * i, i * 512 - 2, i * 512);
    rec.writeUInt16LE(usn, i * 512 - 2);
  }
}

/** Offset of the first attribute of `type` in an unprotected record. */
function attributeAt(rec: Buffer, type: number): number {
  for (let at = rec.readUInt16LE(0x14); rec.readUInt32LE(at) !== 0xffffffff; at += rec.readUInt32LE(at + 4)) {
    if (rec.readUInt32LE(at) === type) return at;
  }
  throw new Error(`no attribute 0x${type.toString(16)}`);
}

/** Mapping pairs for [lcn, count] runs (lcn null: sparse): the shortest signed encodings of each count and LCN delta, then 0. */
function encodeRuns(runs: Array<[number | null, number]>): Buffer {
  const bytesOf = (value: number): Buffer => {
    const out: number[] = [];
    let v = BigInt(value);
    do {
      out.push(Number(v & 0xffn));
      v >>= 8n;
    } while (!((v === 0n && (out[out.length - 1] & 0x80) === 0) || (v === -1n && (out[out.length - 1] & 0x80) !== 0)));
    return Buffer.from(out);
  };
  const parts: Buffer[] = [];
  let previous = 0;
  for (const [lcn, count] of runs) {
    const length = bytesOf(count);
    const delta = lcn === null ? Buffer.alloc(0) : bytesOf(lcn - previous);
    parts.push(Buffer.from([(delta.length << 4) | length.length]), length, delta);
    if (lcn !== null) previous = lcn;
  }
  return Buffer.concat([...parts, Buffer.from([0])]);
}

/** Replaces the runs of record `n`'s $DATA attribute, growing the attribute (and the record's used bytes) when they need room. */
async function rewriteDataRuns(image: string, n: number, runs: Array<[number | null, number]>): Promise<void> {
  await editRecord(image, n, (rec) => {
    const at = attributeAt(rec, 0x80);
    const length = rec.readUInt32LE(at + 4);
    const pairs = at + rec.readUInt16LE(at + 0x20);
    const encoded = encodeRuns(runs);
    const grow = Math.max(0, Math.ceil((encoded.length - (at + length - pairs)) / 8) * 8);
    const inUse = rec.readUInt32LE(0x18);
    if (inUse + grow > rec.length) throw new Error(`${encoded.length} bytes of runs do not fit in the record`);
    rec.copyWithin(at + length + grow, at + length, inUse);
    rec.writeUInt32LE(length + grow, at + 4);
    rec.writeUInt32LE(inUse + grow, 0x18);
    rec.fill(0, pairs, at + length + grow);
    encoded.copy(rec, pairs);
  });
}

const files: SourceFile[] = [
  { name: 'big.bin', data: randomBytes(5 * MiB + 12345) },
  { name: 'mid.bin', data: randomBytes(70_000) },
  { name: 'small.bin', data: randomBytes(5000) },
  { name: 'tiny.txt', data: Buffer.from('seven b') },
];

describe('NTFS free space from $Bitmap', () => {
  it('matches the free clusters ntfsinfo counts, and no cluster of a file or the backup boot sector is free', async () => {
    const empty = await makeNtfs('empty.img', []);
    const full = await makeNtfs('full.img', files);
    const e = (await usageOf(empty)).usage;
    const { usage: f, reads } = await usageOf(full);
    expect(f?.type).toBe('ntfs');
    expect(f!.needsRecovery).toBe(false);
    expect(f!.size).toBe(IMAGE_SIZE);
    const { clusterSize, freeClusters } = await volumeCounts(full);
    expect(freeBytes(f!)).toBe(freeClusters * clusterSize);
    expect(f!.usedBytes).toBe(IMAGE_SIZE - freeClusters * clusterSize);
    // Boot sector, four MFT records, the bitmap (one cluster here) and the two $LogFile restart pages.
    expect(reads).toBeLessThan(12);
    // Files take whole clusters (the tiny one lives inside its MFT record); the MFT and root index grow a little.
    const fileBytes = files.reduce((n, file) => n + (file.data.length > 700 ? Math.ceil(file.data.length / clusterSize) * clusterSize : 0), 0);
    expect(f!.usedBytes - e!.usedBytes).toBeGreaterThanOrEqual(fileBytes);
    expect(f!.usedBytes - e!.usedBytes).toBeLessThan(fileBytes + 256 * 1024);
    for (const file of files.filter((x) => x.data.length > 700)) {
      const runs = await runsOf(full, `/${file.name}`);
      expect(runs.length).toBeGreaterThan(0);
      for (const [lcn, count] of runs) expect(inFree(f!, lcn * clusterSize, (lcn + count) * clusterSize)).toBe(false);
    }
    expect(inFree(f!, IMAGE_SIZE - 512, IMAGE_SIZE)).toBe(false);
  });

  // Clusters of 128 KiB (sectors per cluster stored as the shift 0xf8), 4 KiB sectors (4 KiB records, nine
  // update sequence words), and 512-byte clusters (each MFT record spans two clusters; a 2 MiB bitmap, read in batches).
  it.each([
    ['128k-clusters.img', ['-c', '131072'], IMAGE_SIZE],
    ['4k-sectors.img', ['-s', '4096'], IMAGE_SIZE],
    ['512-clusters.img', ['-c', '512'], 8 * 1024 * MiB],
  ] as const)('%s: the same count as ntfsinfo', async (name, options, size) => {
    const image = await makeNtfs(name, files.slice(0, 3), { mkntfs: [...options], size });
    const { usage, reads } = await usageOf(image);
    expect(usage?.type).toBe('ntfs');
    const { clusterSize, freeClusters } = await volumeCounts(image);
    expect(freeBytes(usage!)).toBe(freeClusters * clusterSize);
    expect(reads).toBeLessThan(20);
  });

  it('decodes a bitmap in two runs, the second before the first (a negative LCN delta), as ntfs-3g does', async () => {
    const image = await makeNtfs('moved-bitmap.img', files.slice(0, 2), { mkntfs: ['-c', '512'] });
    const { clusterSize } = await volumeCounts(image);
    const [[lcn, count]] = await runsOf(image, 6);
    expect(count).toBeGreaterThanOrEqual(2);
    // Move the bitmap's first half to free clusters far above, marked in use in the bitmap itself.
    const half = count >> 1;
    const target = lcn + 100_000;
    expect(inFree((await usageOf(image)).usage!, target * clusterSize, (target + half) * clusterSize)).toBe(true);
    const bitmap = (await readFile(image)).subarray(lcn * clusterSize, (lcn + count) * clusterSize);
    for (let c = target; c < target + half; c++) bitmap[c >> 3] |= 1 << (c & 7);
    await patch(image, lcn * clusterSize, bitmap);
    await patch(image, target * clusterSize, bitmap.subarray(0, half * clusterSize));
    await rewriteDataRuns(image, 6, [
      [target, half],
      [lcn + half, count - half],
    ]);
    expect(await runsOf(image, 6)).toEqual([
      [target, half],
      [lcn + half, count - half],
    ]);
    const { usage } = await usageOf(image);
    expect(freeBytes(usage!)).toBe((await volumeCounts(image)).freeClusters * clusterSize);
    expect(inFree(usage!, target * clusterSize, (target + half) * clusterSize)).toBe(false);
  });

  it('finds a volume inside a partition-sized area, and nothing where there is no NTFS', async () => {
    const image = await makeNtfs('plain.img', []);
    const disk = join(work.dir, 'offset.img');
    await writeFile(disk, Buffer.concat([Buffer.alloc(MiB), await readFile(image)]));
    const { usage } = await usageOf(disk, MiB, IMAGE_SIZE);
    expect(usage?.free[0][0]).toBeGreaterThan(MiB);
    expect(freeBytes(usage!)).toBe(freeBytes((await usageOf(image)).usage!));
    expect((await usageOf(disk)).usage).toBeUndefined();
  });
});

describe('a dirty NTFS volume needs recovery', () => {
  it('the dirty flag ntfsfix sets (for chkdsk) is seen, and its clearing', async () => {
    requireTool('ntfsfix', 'ntfs-3g');
    const image = await makeNtfs('dirty.img', files.slice(0, 2));
    const clean = (await usageOf(image)).usage!;
    await run('ntfsfix', [image]);
    const dirty = (await usageOf(image)).usage;
    expect(dirty?.needsRecovery).toBe(true);
    expect(dirty!.free).toEqual(clean.free);
    await run('ntfsfix', ['-d', image]);
    expect((await usageOf(image)).usage?.needsRecovery).toBe(false);
  });

  /** A $LogFile restart page (4 KiB, version 1.1) whose restart area has one client, in use or not. */
  function restartPage(lsn: bigint, clientInUse: boolean, cleanFlag: boolean): Buffer {
    const page = Buffer.alloc(4096);
    page.write('RSTR', 0, 'latin1');
    page.writeUInt16LE(0x1e, 4);
    page.writeUInt16LE(9, 6);
    page.writeUInt32LE(4096, 0x10);
    page.writeUInt32LE(4096, 0x14);
    page.writeUInt16LE(0x30, 0x18);
    page.writeInt16LE(1, 0x1a);
    page.writeInt16LE(1, 0x1c);
    page.writeUInt16LE(7, 0x1e);
    page.writeBigInt64LE(lsn, 0x30);
    page.writeUInt16LE(1, 0x38);
    page.writeUInt16LE(clientInUse ? 0xffff : 0, 0x3a);
    page.writeUInt16LE(clientInUse ? 0 : 0xffff, 0x3c);
    page.writeUInt16LE(cleanFlag ? 2 : 0, 0x3e);
    protect(page);
    return page;
  }

  it.each([
    ['the newest restart area has a client in use', [restartPage(90n, false, false), restartPage(100n, true, false)], true],
    ['the newest restart area is clean', [restartPage(100n, false, false), restartPage(90n, true, false)], false],
    ['a client in use, flagged clean', [restartPage(100n, true, true), restartPage(90n, true, true)], false],
    ['a restart page with a torn update sequence', [restartPage(100n, false, false).fill(9, 1022, 1024), Buffer.alloc(4096, 0xff)], true],
  ] as const)('$LogFile: %s', async (what, pages, needsRecovery) => {
    const image = await makeNtfs(`log-${what.replace(/\W+/g, '-')}.img`, []);
    const { clusterSize } = await volumeCounts(image);
    const [[lcn]] = await runsOf(image, 2);
    await patch(image, lcn * clusterSize, Buffer.concat(pages));
    expect((await usageOf(image)).usage?.needsRecovery).toBe(needsRecovery);
  });
});

describe('hostile NTFS metadata: unknown, after a bounded number of reads', () => {
  let base: string;
  beforeAll(async () => {
    base = await makeNtfs('hostile-base.img', files.slice(0, 2));
    expect((await usageOf(base)).usage?.needsRecovery).toBe(false);
  });

  const u16 = (v: number) => Buffer.from([v & 0xff, v >> 8]);
  const u64 = (v: bigint) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(v);
    return b;
  };

  /** Sets the data and initialized sizes of $Bitmap's $DATA attribute. */
  async function shortenBitmap(image: string, bytes: bigint): Promise<void> {
    await editRecord(image, 6, (rec) => {
      const at = attributeAt(rec, 0x80);
      u64(bytes).copy(rec, at + 0x30);
      u64(bytes).copy(rec, at + 0x38);
    });
  }

  /** Clears cluster `lcn`'s bit in the bitmap. */
  async function markFree(image: string, boot: Boot, lcn: number): Promise<void> {
    const [[bitmapLcn]] = await runsOf(image, 6);
    const at = bitmapLcn * boot.clusterSize + (lcn >> 3);
    const h = await open(image, 'r+');
    try {
      const byte = Buffer.alloc(1);
      await h.read(byte, 0, 1, at);
      byte[0] &= ~(1 << (lcn & 7));
      await h.write(byte, 0, 1, at);
    } finally {
      await h.close();
    }
  }

  /** Each case edits a copy of the base image; record edits keep a valid update sequence unless the case is about it. */
  const cases: Array<[string, (image: string, boot: Boot, clusters: number) => Promise<void>]> = [
    ['a torn update sequence in $Bitmap’s record', async (img, boot) => patch(img, boot.mftOffset + 6 * boot.recordSize + 1022, u16(0x5a5a))],
    ['an absurd MFT record size (127 clusters)', async (img) => patch(img, 0x40, Buffer.from([0x7f]))],
    ['an MFT record size of 2^32 bytes', async (img) => patch(img, 0x40, Buffer.from([0xe0]))],
    ['a sectors-per-cluster value that is neither a count nor a shift', async (img) => patch(img, 0x0d, Buffer.from([0x90]))],
    ['a volume larger than its area', async (img) => patch(img, 0x28, u64(BigInt(IMAGE_SIZE / 512) * 2n))],
    ['an $MFT cluster past the volume', async (img) => patch(img, 0x30, u64(1n << 40n))],
    ['$Bitmap runs past the end of the volume', async (img, _boot, clusters) => rewriteDataRuns(img, 6, [[clusters - 1, 2]])],
    ['$Bitmap runs before the start of the volume', async (img, _boot, clusters) => rewriteDataRuns(img, 6, [[clusters - 8, 1], [-4, 1]])],
    ['a bitmap shorter than the volume', async (img) => shortenBitmap(img, 16n)],
    ['a sparse run in the bitmap', async (img) => rewriteDataRuns(img, 6, [[null, 1]])],
    ['an attribute longer than its record', async (img) => editRecord(img, 6, (rec) => rec.writeUInt32LE(0x10000, rec.readUInt16LE(0x14) + 4))],
    ['the first $MFT cluster marked free', async (img, boot) => markFree(img, boot, boot.mftOffset / boot.clusterSize)],
  ];

  it.each(cases)('%s', async (what, edit) => {
    const image = join(work.dir, `hostile-${cases.findIndex((c) => c[0] === what)}.img`);
    await writeFile(image, await readFile(base));
    const { clusterSize } = await volumeCounts(image);
    await edit(image, await bootOf(image), Math.floor((IMAGE_SIZE - 512) / clusterSize));
    const { usage, reads } = await usageOf(image);
    expect(usage).toBeUndefined();
    expect(reads).toBeLessThan(12);
  });
});

describe('NTFS capture over SSH', () => {
  let sshd: TestSshd;
  beforeAll(async () => {
    sshd = await startSshd();
  });
  afterAll(async () => {
    await sshd?.stop();
  });

  function capture(source: string, dest: string) {
    const url = `ssh://root@127.0.0.1:${sshd.port}${source}`;
    return ferry(['capture', '-i', sshd.userKey, '--known-hosts', sshd.knownHosts, url, dest, '--progress=json'], { timeoutMs: 90_000 });
  }

  it('of a partitioned disk transfers little more than the used clusters; ntfsfix accepts the copy and the files read back', async () => {
    requireTool('sfdisk', 'fdisk');
    requireTool('ntfscat', 'ntfs-3g');
    requireTool('ntfsfix', 'ntfs-3g');
    const partitionSize = 192 * MiB;
    const content = [
      { name: 'data.bin', data: randomBytes(12 * MiB) },
      { name: 'small.bin', data: randomBytes(30_000) },
      { name: 'notes.txt', data: Buffer.from('hello from the source volume\n') },
    ];
    // Old garbage everywhere first: free space that must not travel.
    const partition = await makeNtfs('capture-part.img', content, { size: partitionSize, garbage: true, mkntfs: ['-p', '2048', '-H', '16', '-S', '63'] });
    const source = join(work.dir, 'capture-disk.img');
    await writeFile(source, Buffer.concat([Buffer.alloc(MiB), await readFile(partition)]));
    await new Promise<void>((resolve, reject) => {
      const child = execFile('sfdisk', ['-q', source], (err) => (err ? reject(err) : resolve()));
      child.stdin!.end(`label: dos\nstart=2048, size=${partitionSize / 512}, type=7\n`);
    });
    const dest = join(work.dir, 'capture-out.raw');
    const r = await capture(source, dest);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const done = doneLine(r.stdout);
    const used = (await usageOf(partition)).usage!.usedBytes;
    // The used clusters (12 MiB of them incompressible) travel; the garbage in free clusters stays at the source.
    expect(done.filesystems).toEqual([expect.objectContaining({ type: 'ntfs', skippedFree: true, usedBytes: used })]);
    expect(done.bytesOnWire as number).toBeLessThan(used + 2 * MiB);
    const copy = join(work.dir, 'capture-out-part.img');
    await writeFile(copy, (await readFile(dest)).subarray(MiB));
    await run('ntfsfix', ['-n', copy]);
    for (const f of content) {
      const { stdout } = await run('ntfscat', [copy, `/${f.name}`], { encoding: 'buffer', maxBuffer: 64 * MiB });
      expect(stdout.equals(f.data)).toBe(true);
    }
  });

  it('of a dirty volume copies it whole', async () => {
    requireTool('ntfsfix', 'ntfs-3g');
    const source = await makeNtfs('capture-dirty.img', files.slice(0, 1), { garbage: true });
    await run('ntfsfix', [source]);
    const dest = join(work.dir, 'capture-dirty.raw');
    const r = await capture(source, dest);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(doneLine(r.stdout).filesystems).toEqual([expect.objectContaining({ type: 'ntfs', skippedFree: false })]);
    expect(await imagesIdentical(source, dest)).toBe(true);
  });
});
