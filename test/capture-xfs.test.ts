/**
 * XFS used blocks: free space read from real filesystems made by mkfs.xfs (populated from a protofile,
 * without mounting), checked against xfs_db; a capture that leaves the free space behind and still passes
 * xfs_repair; hostile variants made with xfs_db (checksums recomputed, so only the structure is wrong);
 * and the log: a mounted filesystem's pending changes versus a frozen one's covered log.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ReadAt } from '../src/capture/ranges.js';
import { xfsUsage, type XfsUsage } from '../src/capture/xfs.js';
import { doneLine, ferry, requireTool, tempDir } from './helpers/env.js';
import { startSshd, type TestSshd } from './helpers/sshd.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
/** mkfs.xfs refuses data sections under 300 MB. */
const IMAGE_SIZE = 320 * MiB;

let work: { dir: string; cleanup: () => Promise<void> };

beforeAll(async () => {
  work = await tempDir('ferry-xfs-');
});

afterAll(async () => {
  await work?.cleanup();
});

interface SourceFile {
  name: string;
  data: Buffer;
}

/** An XFS image holding `files`, written by mkfs.xfs from a protofile; free space keeps `garbage` if asked. */
async function makeXfs(name: string, files: SourceFile[], mkfsOptions: string[] = [], garbage = false): Promise<string> {
  requireTool('mkfs.xfs', 'xfsprogs');
  const content = join(work.dir, `${name}.content`);
  await mkdir(content, { recursive: true });
  const lines = ['/dev/null', '0 0', 'd--755 0 0'];
  for (const f of files) {
    await writeFile(join(content, f.name), f.data);
    lines.push(`${f.name} ---644 0 0 ${join(content, f.name)}`);
  }
  lines.push('$', '');
  const proto = join(work.dir, `${name}.proto`);
  await writeFile(proto, lines.join('\n'));
  const image = join(work.dir, name);
  const h = await open(image, 'w');
  await h.truncate(IMAGE_SIZE);
  if (garbage) for (let at = 0; at < IMAGE_SIZE; at += 16 * MiB) await h.write(randomBytes(16 * MiB), 0, 16 * MiB, at);
  await h.close();
  // -K: no discard, so the garbage stays where the filesystem does not write.
  await run('mkfs.xfs', ['-q', '-f', '-K', ...mkfsOptions, '-p', proto, image]);
  return image;
}

/** xfsUsage over a file, counting the reads it makes. */
async function usageOf(image: string, size?: number): Promise<{ usage: XfsUsage | undefined; reads: number }> {
  const h = await open(image, 'r');
  try {
    const end = size ?? (await h.stat()).size;
    let reads = 0;
    const read: ReadAt = async (offset, length) => {
      reads++;
      if (offset + length > end) throw new RangeError(`read past the end: ${offset}+${length}`);
      const buf = Buffer.alloc(length);
      await h.read(buf, 0, length, offset);
      return buf;
    };
    return { usage: await xfsUsage(read, 0, end, 4), reads };
  } finally {
    await h.close();
  }
}

async function xfsDb(image: string, ...commands: string[]): Promise<string> {
  requireTool('xfs_db', 'xfsprogs');
  const { stdout } = await run('xfs_db', ['-r', ...commands.flatMap((c) => ['-c', c]), image]);
  return stdout;
}

/** Writes fields with xfs_db in expert mode; it recomputes the checksums, so the result is well-formed but wrong. */
async function xfsDbWrite(image: string, ...commands: string[]): Promise<void> {
  requireTool('xfs_db', 'xfsprogs');
  await run('xfs_db', ['-x', ...commands.flatMap((c) => ['-c', c]), image]);
}

async function field(image: string, select: string[], name: string): Promise<number> {
  const out = await xfsDb(image, ...select, `print ${name}`);
  const m = new RegExp(`^${name.replace(/[[\]]/g, '\\$&')} = (\\d+)`, 'm').exec(out);
  if (!m) throw new Error(`xfs_db printed no ${name}: ${out}`);
  return Number(m[1]);
}

/** Free bytes as the AGF headers count them, read by xfs_db. */
async function agfFreeBytes(image: string): Promise<number> {
  const agCount = await field(image, ['sb 0'], 'agcount');
  const blockSize = await field(image, ['sb 0'], 'blocksize');
  let blocks = 0;
  for (let ag = 0; ag < agCount; ag++) blocks += await field(image, [`agf ${ag}`], 'freeblks');
  return blocks * blockSize;
}

/** The file's bytes as stored in `image` at the extents xfs_db maps it to. */
async function fileFromExtents(image: string, source: string, name: string, size: number): Promise<Buffer> {
  const agBlocks = await field(source, ['sb 0'], 'agblocks');
  const blockSize = await field(source, ['sb 0'], 'blocksize');
  const out = Buffer.alloc(size);
  const h = await open(image, 'r');
  try {
    for (const m of (await xfsDb(source, `path /${name}`, 'bmap')).matchAll(/offset (\d+) startblock \d+ \((\d+)\/(\d+)\) count (\d+)/g)) {
      const [offset, ag, agbno, count] = m.slice(1).map(Number);
      const length = Math.min(count * blockSize, size - offset * blockSize);
      await h.read(out, offset * blockSize, length, (ag * agBlocks + agbno) * blockSize);
    }
  } finally {
    await h.close();
  }
  return out;
}

const files: SourceFile[] = [
  { name: 'big.bin', data: randomBytes(5 * MiB + 12345) },
  { name: 'small.bin', data: randomBytes(70_000) },
  { name: 'tiny.txt', data: Buffer.from('seven b') },
];

describe('XFS free space from the bnobt', () => {
  it('matches the AGF counters of a real filesystem, and the files account for the used blocks', async () => {
    const empty = await makeXfs('empty.img', []);
    const full = await makeXfs('full.img', files);
    const e = (await usageOf(empty)).usage;
    const { usage: f } = await usageOf(full);
    expect(f?.type).toBe('xfs');
    expect(f!.needsRecovery).toBe(false);
    expect(f!.size).toBe(IMAGE_SIZE);
    const freeBytes = f!.free.reduce((n, [a, b]) => n + b - a, 0);
    expect(freeBytes).toBe(await agfFreeBytes(full));
    expect(f!.usedBytes).toBe(IMAGE_SIZE - freeBytes);
    // Each file takes whole 4 KiB blocks; the directory and inodes fit in blocks mkfs already allocated.
    const fileBytes = files.reduce((n, file) => n + Math.ceil(file.data.length / 4096) * 4096, 0);
    expect(f!.usedBytes - e!.usedBytes).toBeGreaterThanOrEqual(fileBytes);
    expect(f!.usedBytes - e!.usedBytes).toBeLessThan(fileBytes + 256 * 1024);
    // No file block is in a free range.
    const agBlocks = await field(full, ['sb 0'], 'agblocks');
    for (const file of files) {
      for (const m of (await xfsDb(full, `path /${file.name}`, 'bmap')).matchAll(/\((\d+)\/(\d+)\) count (\d+)/g)) {
        const [ag, agbno, count] = m.slice(1).map(Number);
        const from = (ag * agBlocks + agbno) * 4096;
        const to = from + count * 4096;
        expect(f!.free.some(([a, b]) => a < to && from < b)).toBe(false);
      }
    }
  });

  it('walks multi-level trees (V4 and V5) to the same count as the AGFs', async () => {
    // Stripe-aligned 33 KiB files leave a gap after each: hundreds of free extents, a two-level bnobt.
    const many = Array.from({ length: 400 }, (_, i) => ({ name: `f${i}`, data: randomBytes(33 * 1024) }));
    for (const [name, options] of [
      ['v5-deep.img', ['-b', 'size=1024', '-d', 'agcount=2,su=32k,sw=1']],
      ['v4-deep.img', ['-m', 'crc=0', '-b', 'size=1024', '-d', 'agcount=2,su=32k,sw=1']],
    ] as const) {
      const image = await makeXfs(name, many, [...options]);
      expect(await field(image, ['agf 0'], 'bnolevel')).toBeGreaterThanOrEqual(2);
      const { usage } = await usageOf(image);
      expect(usage?.type).toBe('xfs');
      expect(usage!.free.reduce((n, [a, b]) => n + b - a, 0)).toBe(await agfFreeBytes(image));
    }
  });

  it('returns nothing for a filesystem that is not XFS', async () => {
    const zero = join(work.dir, 'zero.img');
    await writeFile(zero, Buffer.alloc(MiB));
    expect((await usageOf(zero)).usage).toBeUndefined();
  });
});

describe('hostile XFS metadata: unknown, after a bounded number of reads', () => {
  let base: string;
  beforeAll(async () => {
    base = await makeXfs('hostile-base.img', Array.from({ length: 400 }, (_, i) => ({ name: `f${i}`, data: randomBytes(33 * 1024) })), [
      '-b',
      'size=1024',
      '-d',
      'agcount=2,su=32k,sw=1',
    ]);
    // Every variant below differs from this by the one change named.
    const { usage } = await usageOf(base);
    expect(usage?.needsRecovery).toBe(false);
  });

  /** A copy of the base image changed by `edit`. */
  async function variant(name: string, edit: (image: string) => Promise<void>): Promise<string> {
    const image = join(work.dir, name);
    await writeFile(image, await readFile(base));
    await edit(image);
    return image;
  }

  /** Each case: the xfs_db commands that break the base image, given a reader of its fields. -d recomputes checksums. */
  const cases: Array<[string, (get: (select: string[], name: string) => Promise<number>) => Promise<string[]>]> = [
    ['a corrupt AGF (checksum left stale)', async () => ['agf 1', 'write -c seqno 7']],
    ['an AGF claiming another AG', async () => ['agf 1', 'write -d seqno 0']],
    ['an absurd AGF tree height', async () => ['agf 0', 'write -d bnolevel 60']],
    ['an AGF root outside its AG', async () => ['agf 0', 'write -d bnoroot 4000000000']],
    ['an absurd agcount', async () => ['sb 0', 'write -d agcount 4000000000']],
    ['agcount that disagrees with the size', async () => ['sb 0', 'write -d agcount 5']],
    ['a block size that is not a power of two', async () => ['sb 0', 'write -d blocksize 3000']],
    ['a child pointer that loops to the root', async (get) => ['agf 0', 'addr bnoroot', `write -d ptrs[2] ${await get(['agf 0'], 'bnoroot')}`]],
    ['two child pointers to one block', async (get) => ['agf 0', 'addr bnoroot', `write -d ptrs[2] ${await get(['agf 0', 'addr bnoroot'], 'ptrs[1]')}`]],
    ['a sibling pointer that loops', async (get) => ['agf 0', 'addr bnoroot', 'addr ptrs[1]', `write -d rightsib ${await get(['agf 0', 'addr bnoroot'], 'ptrs[1]')}`]],
    ['a free extent over the AG headers', async () => ['agf 0', 'addr bnoroot', 'addr ptrs[1]', 'write -d recs[1].startblock 0']],
    ['a free extent past the end of the AG', async () => ['agf 1', 'addr bnoroot', 'addr ptrs[1]', 'write -d recs[1].blockcount 4000000000']],
    ['a tree block of another type', async () => ['agf 0', 'addr bnoroot', 'write -d magic 0x41423343']],
  ];

  it.each(cases)('%s', async (what, commands) => {
    const image = await variant(`hostile-${cases.findIndex((c) => c[0] === what)}.img`, async (img) =>
      xfsDbWrite(img, ...(await commands((select, name) => field(img, select, name)))),
    );
    const { usage, reads } = await usageOf(image);
    expect(usage).toBeUndefined();
    expect(reads).toBeLessThan(100);
  });

  it('a torn log (a block around the head with the wrong cycle) needs recovery', async () => {
    const image = await variant('hostile-log.img', async (img) => {
      const logStart = await field(img, ['sb 0'], 'logstart');
      const agBlocks = await field(img, ['sb 0'], 'agblocks');
      const agBlockLog = await field(img, ['sb 0'], 'agblklog');
      const ag = Math.floor(logStart / 2 ** agBlockLog);
      const logOffset = (ag * agBlocks + (logStart % 2 ** agBlockLog)) * 1024;
      // The fresh log's head is right after mkfs's unmount record: stamp a later block with a newer cycle.
      const h = await open(img, 'r+');
      const word = Buffer.alloc(4);
      word.writeUInt32BE(9);
      await h.write(word, 0, 4, logOffset + 40 * 512);
      await h.close();
    });
    const { usage, reads } = await usageOf(image);
    expect(usage?.needsRecovery).toBe(true);
    expect(reads).toBeLessThan(100);
  });
});

describe('XFS capture over SSH', () => {
  let sshd: TestSshd;
  beforeAll(async () => {
    sshd = await startSshd();
  });
  afterAll(async () => {
    await sshd?.stop();
  });

  it('transfers little more than the used blocks; xfs_repair accepts the copy and the files are intact', async () => {
    requireTool('xfs_repair', 'xfsprogs');
    const content = [{ name: 'data.bin', data: randomBytes(12 * MiB) }, { name: 'notes.txt', data: Buffer.from('hello from the source filesystem\n') }];
    // Old garbage everywhere first: free space that must not travel.
    const source = await makeXfs('capture-src.img', content, [], true);
    const dest = join(work.dir, 'capture-out.raw');
    const url = `ssh://root@127.0.0.1:${sshd.port}${source}`;
    const r = await ferry(['capture', '-i', sshd.userKey, '--known-hosts', sshd.knownHosts, url, dest, '--progress=json'], { timeoutMs: 90_000 });
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const done = doneLine(r.stdout);
    // 12 MiB of incompressible file data plus metadata and the log (mostly repeated headers, compressed).
    expect(done.bytesOnWire as number).toBeLessThan(16 * MiB);
    expect(done.filesystems).toEqual([expect.objectContaining({ type: 'xfs', skippedFree: true })]);
    await run('xfs_repair', ['-n', '-f', dest]);
    for (const f of content) expect((await fileFromExtents(dest, source, f.name, f.data.length)).equals(f.data)).toBe(true);
  });
});

describe('the XFS log of a mounted filesystem', () => {
  let loop = '';
  let mountPoint = '';
  let freeBeforeMount = 0;

  beforeAll(async () => {
    requireTool('losetup', 'util-linux');
    requireTool('blockdev', 'util-linux');
    const device = await makeXfs('mounted.img', files);
    freeBeforeMount = await agfFreeBytes(device);
    try {
      loop = (await run('losetup', ['-f', '--show', device])).stdout.trim();
    } catch (err) {
      throw new Error(`cannot create a loop device (these tests need root and /dev/loop-control): ${(err as Error).message}`);
    }
    mountPoint = join(work.dir, 'mnt');
    await mkdir(mountPoint);
    await run('mount', [loop, mountPoint]);
  });

  afterAll(async () => {
    // Thaw first in case a failed test left it frozen, so umount cannot hang.
    if (mountPoint) await run('fsfreeze', ['-u', mountPoint]).catch(() => undefined);
    if (mountPoint) await run('umount', [mountPoint]).catch(() => undefined);
    if (loop) await run('losetup', ['-d', loop]).catch(() => undefined);
  });

  /** Reads the device as it is now: the block device's page cache may hold what an earlier read saw. */
  async function deviceUsage(): Promise<XfsUsage | undefined> {
    await run('blockdev', ['--flushbufs', loop]);
    return (await usageOf(loop, IMAGE_SIZE)).usage;
  }

  it('pending allocations make it need recovery; frozen, its covered log does not, and the new files are counted', async () => {
    for (let i = 0; i < 8; i++) await writeFile(join(mountPoint, `new${i}`), randomBytes(MiB));
    await run('sync', ['-f', mountPoint]);
    // The log holds the new allocations; the free-space trees on disk need not have them yet.
    expect((await deviceUsage())?.needsRecovery).toBe(true);
    await run('fsfreeze', ['-f', mountPoint]);
    try {
      const frozen = await deviceUsage();
      expect(frozen?.needsRecovery).toBe(false);
      expect(frozen!.free.reduce((n, [a, b]) => n + b - a, 0)).toBeLessThanOrEqual(freeBeforeMount - 8 * MiB);
    } finally {
      await run('fsfreeze', ['-u', mountPoint]);
    }
  });
});
