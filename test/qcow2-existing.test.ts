import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CancelledError } from '../src/errors.js';
import { Qcow2InPlaceWriter } from '../src/convert/formats/qcow2/in-place-writer.js';
import { openDisk } from '../src/convert/open.js';
import { copyDisk } from '../src/convert/pipeline.js';
import { ferry, imagesIdentical, qemuImg, qemuIo, requireTool, tempDir } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';

const run = promisify(execFile);

/** qemu-img check's JSON report; exit 3 (leaks only) still carries one. */
async function qemuCheck(path: string): Promise<{ corruptions: number; leaks: number; errors: number }> {
  requireTool('qemu-img', 'qemu-utils');
  let stdout: string;
  try {
    ({ stdout } = await run('qemu-img', ['check', '--output=json', path]));
  } catch (err) {
    const e = err as { code?: number; stdout?: string };
    if (e.code !== 3 || !e.stdout) throw err;
    stdout = e.stdout;
  }
  const r = JSON.parse(stdout);
  return { corruptions: r.corruptions ?? 0, leaks: r.leaks ?? 0, errors: r['check-errors'] ?? 0 };
}

async function refcountTableClusters(path: string): Promise<number> {
  const h = await open(path, 'r');
  try {
    const buf = Buffer.alloc(4);
    await h.read(buf, 0, 4, 56);
    return buf.readUInt32BE(0);
  } finally {
    await h.close();
  }
}

/**
 * `convert -n` into qcow2 images made by qemu-img with every layout option, empty or already holding
 * data: the result must pass qemu-img check without leaks and compare identical to the source.
 */
describe('convert -n into an existing qcow2', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let rawSource: string;
  let qcow2Source: string;
  let vmdkSource: string;
  /** Data everywhere, different from the source: what must not show through zero ranges. */
  let base: string;
  let other: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir());
    rawSource = await makePatternedRaw(dir);
    // A qcow2 source with zero-flagged clusters inside data and unallocated ranges.
    qcow2Source = join(dir, 'source.qcow2');
    await qemuImg('convert', '-O', 'qcow2', rawSource, qcow2Source);
    await qemuIo(qcow2Source, 'qcow2', 'write -z 5M 1M', 'write -z 30M 2M');
    vmdkSource = join(dir, 'source.vmdk');
    await qemuImg('convert', '-O', 'vmdk', qcow2Source, vmdkSource);
    base = join(dir, 'base.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
    await qemuIo(base, 'qcow2', 'write -P 0x33 0 64M');
    other = join(dir, 'other.raw');
    await qemuImg('create', '-q', '-f', 'raw', other, '64M');
    await qemuIo(other, 'raw', 'write -P 0x44 0 24M', 'write -P 0x45 28M 36M');
  });
  afterAll(() => cleanup());

  const empty = (...opts: string[]) => async (path: string) => {
    await qemuImg('create', '-q', '-f', 'qcow2', ...(opts.length ? ['-o', opts.join(',')] : []), path, '64M');
  };
  const backed = (...opts: string[]) => async (path: string) => {
    await qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', ...(opts.length ? ['-o', opts.join(',')] : []), path, '64M');
  };
  const holding = (...convertArgs: string[]) => async (path: string) => {
    await qemuImg('convert', '-O', 'qcow2', ...convertArgs, other, path);
  };

  const targets: Array<[string, (path: string) => Promise<void>]> = [
    ['v3', empty()],
    ['v2 (compat=0.10)', empty('compat=0.10')],
    ['4 KiB clusters', empty('cluster_size=4k')],
    ['2 MiB clusters', empty('cluster_size=2M')],
    ['extended L2', empty('extended_l2=on')],
    ['refcount_bits=1', empty('refcount_bits=1')],
    ['refcount_bits=16 with 512-byte clusters', empty('refcount_bits=16', 'cluster_size=512')],
    ['v3 over a backing file', backed()],
    ['v2 over a backing file', backed('compat=0.10')],
    ['extended L2 over a backing file', backed('extended_l2=on')],
    ['v3 holding data', holding()],
    ['v2 holding data', holding('-o', 'compat=0.10')],
    [
      'v3 holding data and zero-flagged allocated clusters',
      async (path) => {
        await holding()(path);
        await qemuIo(path, 'qcow2', 'write -z 0 8M', 'write -z 20M 4M');
      },
    ],
    ['extended L2 holding data', holding('-o', 'extended_l2=on,cluster_size=32k')],
    ['compressed (convert -c)', holding('-c')],
    ['compressed v2 with 4 KiB clusters', holding('-c', '-o', 'compat=0.10,cluster_size=4k')],
  ];

  async function convertInto(name: string, source: string, make: (path: string) => Promise<void>): Promise<string> {
    const target = join(dir, `${name.replace(/\W+/g, '_')}.qcow2`);
    await make(target);
    const r = await ferry(['convert', '-n', '-O', 'qcow2', source, target]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(await qemuCheck(target)).toEqual({ corruptions: 0, leaks: 0, errors: 0 });
    expect(await imagesIdentical(source, target)).toBe(true);
    return target;
  }

  for (const [name, make] of targets) {
    it(`raw source into ${name}: check clean, compares identical`, async () => {
      const target = await convertInto(`raw-${name}`, rawSource, make);
      const ours = await ferry(['check', target]);
      expect(ours.stdout).toContain('No errors were found on the image.');
    });
  }

  for (const [name, make] of targets.filter(([n]) => /^(v3|v2 over a backing file|extended L2 over a backing file|compressed \(convert -c\))$/.test(n))) {
    it(`qcow2 and vmdk sources into ${name}`, async () => {
      await convertInto(`qcow2-${name}`, qcow2Source, make);
      await convertInto(`vmdk-${name}`, vmdkSource, make);
    });
  }

  it('--target-is-zero into an empty target', async () => {
    const target = join(dir, 'target-is-zero.qcow2');
    await empty('cluster_size=4k')(target);
    const r = await ferry(['convert', '-n', '--target-is-zero', '-O', 'qcow2', rawSource, target]);
    expect(r.stderr).toBe('');
    expect(await qemuCheck(target)).toEqual({ corruptions: 0, leaks: 0, errors: 0 });
    expect(await imagesIdentical(rawSource, target)).toBe(true);
  });

  it('grows the refcount table when the data needs more refcount blocks than it can point to', async () => {
    const target = join(dir, 'grow.qcow2');
    await empty('cluster_size=512', 'refcount_bits=64')(target);
    const before = await refcountTableClusters(target);
    const grown = await convertInto('grown', rawSource, async (path) => {
      const { copyFile } = await import('node:fs/promises');
      await copyFile(target, path);
    });
    expect(await refcountTableClusters(grown)).toBeGreaterThan(before);
  });

  it('a target larger than the source keeps what lies past the source, as qemu-img convert -n does', async () => {
    // The source ends inside a cluster: the rest of that cluster comes from the target's old view.
    const source = join(dir, 'short.raw');
    await qemuImg('create', '-q', '-f', 'raw', source, String(5 * 1024 * 1024 + 512));
    await qemuIo(source, 'raw', 'write -P 0x61 4M 1M', 'write -P 0x62 5M 512');
    for (const make of [backed(), holding('-c'), holding('-o', 'extended_l2=on')]) {
      const ours = join(dir, 'larger-ours.qcow2');
      const theirs = join(dir, 'larger-theirs.qcow2');
      const { rm } = await import('node:fs/promises');
      await rm(ours, { force: true });
      await rm(theirs, { force: true });
      await make(ours);
      await make(theirs);
      const r = await ferry(['convert', '-n', '-O', 'qcow2', source, ours]);
      expect(r.stderr).toBe('');
      await qemuImg('convert', '-n', '-O', 'qcow2', source, theirs);
      expect(await qemuCheck(ours)).toEqual({ corruptions: 0, leaks: 0, errors: 0 });
      expect(await imagesIdentical(ours, theirs)).toBe(true);
    }
  });

  it('refuses a target smaller than the source in one line and leaves it untouched', async () => {
    const target = join(dir, 'small.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', target, '32M');
    await qemuIo(target, 'qcow2', 'write -P 0x12 0 1M');
    const digest = async () => createHash('sha256').update(await readFile(target)).digest('hex');
    const before = await digest();
    const r = await ferry(['convert', '-n', '-O', 'qcow2', rawSource, target]);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/33554432 bytes, smaller than the source \(67108864 bytes\)/);
    expect(await digest()).toBe(before);
  });

  it('refuses, untouched, what it cannot keep consistent: dirty, corrupt, encrypted, data file, bitmaps, snapshots, -c', async () => {
    const setIncompatibleBit = async (path: string, bit: number) => {
      const h = await open(path, 'r+');
      try {
        const b = Buffer.alloc(1);
        await h.read(b, 0, 1, 79);
        b[0] |= 1 << bit;
        await h.write(b, 0, 1, 79);
      } finally {
        await h.close();
      }
    };
    const cases: Array<[string, (path: string) => Promise<void>, RegExp]> = [
      ['dirty', async (p) => { await empty('lazy_refcounts=on')(p); await setIncompatibleBit(p, 0); }, /the image is dirty/],
      ['corrupt', async (p) => { await empty()(p); await setIncompatibleBit(p, 1); }, /flagged corrupt/],
      [
        'encrypted',
        (p) => qemuImg('create', '-q', '-f', 'qcow2', '--object', 'secret,id=sec0,data=secret', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', p, '64M').then(() => undefined),
        /encrypted qcow2 images .* not supported/,
      ],
      ['data-file', (p) => qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${p}.data`, p, '64M').then(() => undefined), /external data file are not supported/],
      ['bitmap', async (p) => { await empty()(p); await qemuImg('bitmap', '--add', p, 'b0'); }, /persistent dirty bitmaps are not supported/],
      ['snapshot', async (p) => { await empty()(p); await qemuImg('snapshot', '-c', 'before', p); }, /internal snapshots \(1\) are not supported/],
    ];
    for (const [name, make, message] of cases) {
      const target = join(dir, `refused-${name}.qcow2`);
      await make(target);
      const before = createHash('sha256').update(await readFile(target)).digest('hex');
      const r = await ferry(['convert', '-n', '-O', 'qcow2', rawSource, target]);
      expect(r.code).not.toBe(0);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(message);
      expect(createHash('sha256').update(await readFile(target)).digest('hex')).toBe(before);
    }
    const c = await ferry(['convert', '-n', '-c', '-O', 'qcow2', rawSource, join(dir, 'v3.qcow2')]);
    expect(c.code).not.toBe(0);
    expect(c.stderr).toMatch(/-c cannot be combined with -n/);
  });

  describe('with caches small enough to write the metadata out many times', () => {
    const tiny = { l2CacheBytes: 4096, refcountCacheBytes: 4096 };

    it('a complete run is clean and identical', async () => {
      const target = join(dir, 'tiny-cache.qcow2');
      await holding('-o', 'cluster_size=512')(target);
      const source = await openDisk(rawSource);
      try {
        const writer = await Qcow2InPlaceWriter.open(target, source.virtualSize, tiny);
        await copyDisk(source, writer, { chunkSize: 256 * 1024 });
        await writer.finish();
      } finally {
        await source.close();
      }
      expect(await qemuCheck(target)).toEqual({ corruptions: 0, leaks: 0, errors: 0 });
      expect(await imagesIdentical(rawSource, target)).toBe(true);
    });

    it('a run stopped midway may leak clusters but leaves no table pointing at wrong or uncounted data', async () => {
      for (const make of [holding('-o', 'cluster_size=512'), backed('cluster_size=512')]) {
        const target = join(dir, 'stopped.qcow2');
        const { rm } = await import('node:fs/promises');
        await rm(target, { force: true });
        await make(target);
        const source = await openDisk(rawSource);
        const stop = new AbortController();
        let chunks = 0;
        try {
          const writer = await Qcow2InPlaceWriter.open(target, source.virtualSize, tiny);
          const copy = copyDisk(source, writer, {
            chunkSize: 256 * 1024,
            signal: stop.signal,
            onProgress: () => {
              if (++chunks === 15) stop.abort();
            },
          });
          await expect(copy).rejects.toBeInstanceOf(CancelledError);
          await writer.abort();
        } finally {
          await source.close();
        }
        const check = await qemuCheck(target);
        expect(check.corruptions).toBe(0);
        expect(check.errors).toBe(0);
      }
    });
  });
});
