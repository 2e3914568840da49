import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { CacheMode, PAGE_HELD_DATA, native } from '../src/native.js';
import { MigrationPolicy, type RoundObservation } from '../src/live/policy.js';
import { simulateMigration, measureEncoding, type LinkModel } from '../src/live/simulate.js';
import { CLARK_WORKLOADS, hotSetModel, uniformModel, writePages } from '../src/live/workloads.js';
import { LivePageKind } from '../src/live/protocol.js';
import { PageLedger, digestFilePages, subtractPages, unionPages } from '../src/live/ledger.js';
import { PageHashTracker } from '../src/live/dirty/page-hash.js';
import { RateLimiter, VirtualClock } from '../src/live/clock.js';
import { mkdtemp, open, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const PAGE = 4096;

function observation(o: Partial<RoundObservation>): RoundObservation {
  return {
    round: 2,
    ramBytes: GiB,
    pageSize: PAGE,
    dirtyRate: 10 * MiB,
    remainingPages: 10_000,
    wireBytesPerPage: 2048,
    roundWireBytes: 100 * MiB,
    roundSeconds: 1,
    busySeconds: 1,
    rate: 100 * MiB,
    totalWireBytes: GiB,
    collectSeconds: 0.001,
    switchoverOverheadSeconds: 0.02,
    ...o,
  };
}

describe('migration policy', () => {
  it('switches over when the remaining pages fit the downtime limit at the measured bandwidth', () => {
    const policy = new MigrationPolicy({ maxDowntimeMs: 300 });
    // 10 000 pages × 2 KiB on the wire at 100 MiB/s (sent during the 1 ms collection) + 20 ms fixed: about 215 ms, fits.
    const fits = policy.decide(observation({ remainingPages: 10_000 }));
    expect(fits.action).toBe('switchover');
    // (plus the pages the guest dirties during one more collection: 10 MiB/s × 1 ms)
    const pages = 10_000 + (10 * MiB * 0.001) / PAGE;
    expect(fits.expectedDowntimeMs).toBeCloseTo(((pages * 2048) / (100 * MiB) + 0.02) * 1000, 6);
    // Twice as many pages do not.
    expect(new MigrationPolicy({ maxDowntimeMs: 300 }).decide(observation({ remainingPages: 20_000 })).action).toBe('continue');
  });

  it('counts the final collection and the pages sent during it as overlapping, the longer of the two', () => {
    const policy = new MigrationPolicy({ maxDowntimeMs: 300 });
    // 100 pages (2 ms on the wire) during a 250 ms collection: the collection sets the pause.
    const slowPass = policy.expectedDowntimeMs(observation({ remainingPages: 100, dirtyRate: 0, collectSeconds: 0.25 }));
    expect(slowPass).toBeCloseTo((0.25 + 0.02) * 1000, 6);
    // 12 000 pages (about 234 ms) during a 100 ms collection: the pages do.
    const manyPages = policy.expectedDowntimeMs(observation({ remainingPages: 12_000, dirtyRate: 0, collectSeconds: 0.1 }));
    expect(manyPages).toBeCloseTo(((12_000 * 2048) / (100 * MiB) + 0.02) * 1000, 6);
  });

  it('measures the link while busy, not the imposed rate, and never counts on more than maxBandwidth', () => {
    const policy = new MigrationPolicy({ maxDowntimeMs: 300, maxBandwidth: 50 * MiB });
    // The round sent 100 MiB in 1 s but was busy only 0.25 s: the link does 400 MiB/s, capped at 50 MiB/s.
    const o = observation({ busySeconds: 0.25, remainingPages: 5000 });
    expect(policy.linkBandwidth(o)).toBe(50 * MiB);
    expect(new MigrationPolicy({}).linkBandwidth(o)).toBe(400 * MiB);
  });

  it('raises the rate above the dirty rate (Xen), never above maxBandwidth, and never lowers it', () => {
    const policy = new MigrationPolicy({ initialBandwidth: 64 * MiB, maxBandwidth: 256 * MiB, maxDowntimeMs: 1 });
    expect(policy.currentRate).toBe(64 * MiB);
    // 100 MiB/s of RAM dirtied at 2 KiB per 4 KiB page on the wire: 50 MiB/s of wire, × 1.5 headroom = 75.
    const d1 = policy.decide(observation({ dirtyRate: 100 * MiB, wireBytesPerPage: 2048, rate: 64 * MiB }));
    expect(d1.action).toBe('continue');
    expect(policy.currentRate).toBeCloseTo(75 * MiB, -3);
    // The limiter ramped the round up to 90 MiB/s: the next round starts there.
    policy.decide(observation({ dirtyRate: 10 * MiB, rate: 90 * MiB }));
    expect(policy.currentRate).toBe(90 * MiB);
    policy.decide(observation({ dirtyRate: 1000 * MiB, wireBytesPerPage: 4096, rate: 90 * MiB }));
    expect(policy.currentRate).toBe(256 * MiB);
    policy.decide(observation({ dirtyRate: 1 * MiB, rate: 256 * MiB }));
    expect(policy.currentRate).toBe(256 * MiB);
    policy.update({ maxBandwidth: 32 * MiB });
    expect(policy.currentRate).toBe(32 * MiB);
  });

  it('doubles the rate when a round held back by it left about as much dirty as it sent', () => {
    const policy = new MigrationPolicy({ initialBandwidth: 64 * MiB, maxBandwidth: 200 * MiB, maxDowntimeMs: 1 });
    // 25 600 pages sent in a round that mostly waited for the rate, 25 000 dirty again: the guest rewrites a
    // working set whole within a round, so its measured dirty rate (10 MiB/s) understates it.
    const stalled = observation({ roundWireBytes: 100 * MiB, wireBytesPerPage: PAGE, remainingPages: 25_000, roundSeconds: 2, busySeconds: 0.5, dirtyRate: 10 * MiB, rate: 64 * MiB });
    policy.decide(stalled);
    expect(policy.currentRate).toBe(128 * MiB);
    policy.decide({ ...stalled, rate: 128 * MiB });
    expect(policy.currentRate).toBe(200 * MiB);
    // A round that made headway keeps the rate.
    const progressing = new MigrationPolicy({ initialBandwidth: 64 * MiB, maxDowntimeMs: 1 });
    progressing.decide({ ...stalled, remainingPages: 5_000 });
    expect(progressing.currentRate).toBe(64 * MiB);
  });

  it('takes a fitting switchover only once the dirty set stops halving', () => {
    const policy = new MigrationPolicy({ maxDowntimeMs: 300 });
    // The first fit has nothing to compare with: taken, as QEMU does.
    expect(policy.decide(observation({ remainingPages: 10_000 })).action).toBe('switchover');
    const shrinking = new MigrationPolicy({ maxDowntimeMs: 300 });
    expect(shrinking.decide(observation({ remainingPages: 200_000 })).action).toBe('continue');
    // 200 000 → 10 000 fits, but another round of those 10 000 may well leave far fewer.
    const d = shrinking.decide(observation({ remainingPages: 10_000 }));
    expect(d.action).toBe('continue');
    expect(d.reason).toMatch(/still shrinking/);
    // 10 000 → 8 000: the guest keeps up with the sender; switch over.
    expect(shrinking.decide(observation({ remainingPages: 8_000 })).action).toBe('switchover');
  });

  it('gives up after the round cap and after sending 3× RAM', () => {
    const far = { remainingPages: 200_000 };
    expect(new MigrationPolicy({ maxRounds: 5 }).decide(observation({ ...far, round: 5 })).action).toBe('give-up');
    expect(new MigrationPolicy({ maxRounds: 5 }).decide(observation({ ...far, round: 4 })).action).toBe('continue');
    expect(new MigrationPolicy({}).decide(observation({ ...far, totalWireBytes: 3.1 * GiB })).action).toBe('give-up');
    expect(new MigrationPolicy({}).decide(observation({ ...far, totalWireBytes: 2.9 * GiB })).action).toBe('continue');
    // With auto-converge the 3× cap waits for the throttle to reach its maximum; the round cap does not.
    const throttled = new MigrationPolicy({ autoConverge: true });
    expect(throttled.decide(observation({ ...far, totalWireBytes: 3.1 * GiB })).action).toBe('continue');
    expect(new MigrationPolicy({ autoConverge: true, maxRounds: 5 }).decide(observation({ ...far, round: 5, totalWireBytes: 3.1 * GiB })).action).toBe('give-up');
  });

  it('throttles the guest (auto-converge) only when the link is saturated and the guest outpaces it twice in a row', () => {
    const notConverging = observation({ remainingPages: 200_000, dirtyRate: 400 * MiB, wireBytesPerPage: 4096, roundWireBytes: 100 * MiB, rate: 100 * MiB, busySeconds: 1 });
    const off = new MigrationPolicy({ maxBandwidth: 100 * MiB });
    off.decide(notConverging);
    off.decide(notConverging);
    expect(off.currentThrottle).toBe(0);

    const on = new MigrationPolicy({ maxBandwidth: 100 * MiB, autoConverge: true });
    const throttles = [1, 2, 3, 4, 5, 6].map(() => (on.decide(notConverging) as { throttle: number }).throttle);
    expect(throttles).toEqual([0, 0.2, 0.2, 0.3, 0.3, 0.4].map((x) => expect.closeTo(x, 5)));

    // A link that is not the bottleneck (the sender mostly waited for the rate) is no reason to throttle.
    const idleLink = new MigrationPolicy({ autoConverge: true });
    idleLink.decide({ ...notConverging, busySeconds: 0.2 });
    idleLink.decide({ ...notConverging, busySeconds: 0.2 });
    expect(idleLink.currentThrottle).toBe(0);
  });

  it('switches over on force-complete whatever the downtime', () => {
    const policy = new MigrationPolicy({ maxDowntimeMs: 10 });
    policy.forceComplete();
    const d = policy.decide(observation({ remainingPages: 1_000_000 }));
    expect(d).toMatchObject({ action: 'switchover', forced: true });
  });
});

describe('working-set models', () => {
  it('writes about the expected number of distinct pages, only inside their regions', () => {
    const pages = 100_000;
    const hit = new Uint8Array(pages);
    let seed = 7;
    const random = () => ((seed = (seed * 16807) % 2147483647) / 2147483647);
    // 10 % hot set, 1 write per hot page on average in one second: 1 - 1/e of the hot pages.
    writePages(hotSetModel(0.1, 10_000 * PAGE), 1, pages, PAGE, random, (p) => (hit[p] = 1));
    const inside = hit.subarray(0, 10_000).reduce((a, b) => a + b, 0);
    const outside = hit.subarray(10_000).reduce((a, b) => a + b, 0);
    expect(outside).toBe(0);
    expect(inside / 10_000).toBeGreaterThan(0.6);
    expect(inside / 10_000).toBeLessThan(0.66);
  });
});

describe('page encoding (native)', () => {
  it('flags zero pages, compresses, deltas against the cached version, and decodes to the same bytes', async () => {
    const count = 4;
    const src = Buffer.alloc(count * PAGE);
    // page 0 zero; page 1 text (compressible); page 2 random (incompressible); page 3 random then changed slightly.
    src.fill('migration ', PAGE, 2 * PAGE);
    randomFillSync(src, 2 * PAGE, 2 * PAGE);
    const indices = Uint32Array.of(0, 1, 2, 3);
    const cache = Buffer.alloc(8 * PAGE);
    const tags = new Int32Array(8).fill(-1);
    const out = Buffer.alloc(count * PAGE);
    const meta = new Uint32Array(count * 4);
    const first = await native.encodePages(src, -1, PAGE, count, indices, cache, tags, CacheMode.Insert, 1, out, meta);
    const kinds = (m: Uint32Array) => Array.from({ length: count }, (_, i) => m[i * 4]);
    expect(kinds(meta)).toEqual([LivePageKind.Zero, LivePageKind.Zstd, LivePageKind.Raw, LivePageKind.Raw]);
    expect(meta[1 * 4 + 1]).toBeLessThan(200);
    for (let i = 0; i < count; i++) {
      const d = native.xxh64(src.subarray(i * PAGE, (i + 1) * PAGE));
      expect(BigInt(meta[i * 4 + 2]) | (BigInt(meta[i * 4 + 3]) << 32n)).toBe(d);
    }

    const { mkdtemp, rm, open } = await import('node:fs/promises');
    const { join } = await import('node:path');
    const { tmpdir } = await import('node:os');
    const dir = await mkdtemp(join(tmpdir(), 'ferry-encode-'));
    try {
      const file = await open(join(dir, 'ram'), 'w+');
      await file.write(Buffer.alloc(count * PAGE, 0xaa), 0, count * PAGE, 0); // stale content everywhere
      const memory = new Uint8Array(native.mapShared(file.fd, count * PAGE, true));
      const applyMeta = meta.slice();
      await native.applyPages(memory, PAGE, count, indices, out.subarray(0, first), applyMeta);
      const back = Buffer.alloc(count * PAGE);
      await file.read(back, 0, count * PAGE, 0);
      expect(back.equals(src)).toBe(true);

      // Second version: 16 bytes of page 3 change; page 3 is cached, so it travels as a small delta.
      src.writeUInt32LE(0xdeadbeef, 3 * PAGE + 100);
      src.writeUInt32LE(0xfeedface, 3 * PAGE + 2000);
      const again = await native.encodePages(src.subarray(3 * PAGE), -1, PAGE, 1, Uint32Array.of(3), cache, tags, CacheMode.Insert, 1, out, meta);
      expect(meta[0]).toBe(LivePageKind.Delta);
      expect(again).toBeLessThan(64);
      await native.applyPages(memory, PAGE, 1, Uint32Array.of(3), out.subarray(0, again), meta);
      await file.read(back, 0, count * PAGE, 0);
      expect(back.equals(src)).toBe(true);
      await file.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('stops trying zstd on a page that keeps going raw, and tries again after 8 raw sends', async () => {
    const src = randomFillSync(Buffer.alloc(PAGE));
    const out = Buffer.alloc(PAGE);
    const meta = new Uint32Array(4);
    const states = new Uint8Array(16);
    const encode = () => native.encodePages(src, -1, PAGE, 1, Uint32Array.of(5), Buffer.alloc(0), new Int32Array(0), CacheMode.Refresh, 1, out, meta, states);
    for (let sends = 1; sends <= 3; sends++) {
      await encode();
      expect(meta[0]).toBe(LivePageKind.Raw);
      expect(states[5]).toBe(PAGE_HELD_DATA | sends);
    }
    // Compressible from now on, but in a run of raw sends it goes raw without an attempt…
    src.fill('migration ');
    for (let sends = 4; sends <= 8; sends++) {
      await encode();
      expect(meta[0]).toBe(LivePageKind.Raw);
    }
    // …until the send after 8 raw ones tries zstd again; the run ends.
    await encode();
    expect(meta[0]).toBe(LivePageKind.Zstd);
    expect(states[5]).toBe(PAGE_HELD_DATA);
    expect(Array.from(states).filter((_, page) => page !== 5)).toEqual(new Array(15).fill(0));
  });

  it('evicts a cached page that went raw twice in a row, and caches it again on its retry turn', async () => {
    const cache = Buffer.alloc(4 * PAGE);
    const tags = new Int32Array(4).fill(-1);
    const out = Buffer.alloc(PAGE);
    const meta = new Uint32Array(4);
    const states = new Uint8Array(16);
    const send = () => native.encodePages(randomFillSync(Buffer.alloc(PAGE)), -1, PAGE, 1, Uint32Array.of(5), cache, tags, CacheMode.Insert, 1, out, meta, states);
    await send();
    expect(tags[1]).toBe(5); // cached on its first raw send
    await send();
    expect(meta[0]).toBe(LivePageKind.Raw);
    expect(tags[1]).toBe(-1); // rewritten whole twice: its delta will not pay
    for (let sends = 3; sends < 8; sends++) await send();
    expect(tags[1]).toBe(-1);
    await send(); // the 8th raw send in a row is a retry turn
    expect(states[5]).toBe(PAGE_HELD_DATA | 8);
    expect(tags[1]).toBe(5);
  });

  it('in the stop-and-copy, takes deltas from the cache but writes nothing to it: a cached page sent is evicted', async () => {
    const cache = Buffer.alloc(4 * PAGE);
    const tags = new Int32Array(4).fill(-1);
    const out = Buffer.alloc(2 * PAGE);
    const meta = new Uint32Array(8);
    const src = randomFillSync(Buffer.alloc(2 * PAGE));
    await native.encodePages(src, -1, PAGE, 1, Uint32Array.of(1), cache, tags, CacheMode.Insert, 1, out, meta);
    expect(tags[1]).toBe(1);
    src.writeUInt32LE(0xdeadbeef, 100); // page 1 changes a little; page 2 was never sent
    await native.encodePages(src, -1, PAGE, 2, Uint32Array.of(1, 2), cache, tags, CacheMode.Lookup, 1, out, meta);
    expect([meta[0], meta[4]]).toEqual([LivePageKind.Delta, LivePageKind.Raw]);
    expect(Array.from(tags)).toEqual([-1, -1, -1, -1]);
  });

  it('gathers pages from a mapping of the RAM file; a page not known to hold data is read, so a hole stays a hole', async () => {
    await withTmpfsRam(64, [7], async (file, memory, [data]) => {
      const states = new Uint8Array(64);
      const out = Buffer.alloc(3 * PAGE);
      const meta = new Uint32Array(12);
      const encode = (pages: Uint32Array) =>
        native.encodePages(memory, file.fd, PAGE, pages.length, pages, Buffer.alloc(0), new Int32Array(0), CacheMode.Refresh, 1, out, meta, states);
      // Page 7 was never seen: read from the file; page 30 is a hole, read as zeroes without allocating it.
      await encode(Uint32Array.of(7, 30));
      expect([meta[0], meta[4]]).toEqual([LivePageKind.Raw, LivePageKind.Zero]);
      expect(out.subarray(0, PAGE).equals(data)).toBe(true);
      expect([states[7], states[30]]).toEqual([PAGE_HELD_DATA | 1, 0]);
      // Now known to hold data, page 7 comes from the mapping: its current content.
      data.writeUInt32LE(0x5eed, 0);
      await file.write(data, 0, PAGE, 7 * PAGE);
      await encode(Uint32Array.of(7));
      expect(out.subarray(0, PAGE).equals(data)).toBe(true);
      expect(BigInt(meta[2]) | (BigInt(meta[3]) << 32n)).toBe(native.xxh64(data));
      expect(Array.from(native.dataSegments(file.fd, 0, 64 * PAGE, 16))).toEqual([7 * PAGE, 8 * PAGE, 64 * PAGE]);
      expect(() => encode(Uint32Array.of(64))).toThrow(/beyond the mapped memory/);
      expect(() => native.applyPages(new Uint8Array(native.mapShared(file.fd, 64 * PAGE, true)), PAGE, 1, Uint32Array.of(64), out, meta)).toThrow(/beyond the memory/);
    });
  });

  it('leaves a zero page unwritten where the memory already holds zeroes: the hole stays one', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-apply-'));
    const file = await open(join(dir, 'ram'), 'w+');
    try {
      await file.truncate(64 * PAGE);
      const held = new Uint32Array(64 * 2);
      await digestFilePages(file.fd, PAGE, 64, held);
      const pages = Uint32Array.of(10, 11, 12, 40);
      const src = Buffer.alloc(4 * PAGE);
      randomFillSync(src, 0, 3 * PAGE); // 10, 11, 12 random: raw, consecutive; 40 zero
      const out = Buffer.alloc(4 * PAGE);
      const meta = new Uint32Array(16);
      const bytes = await native.encodePages(src, -1, PAGE, 4, pages, Buffer.alloc(0), new Int32Array(0), CacheMode.Refresh, 1, out, meta);
      expect([meta[0], meta[4], meta[8], meta[12]]).toEqual([LivePageKind.Raw, LivePageKind.Raw, LivePageKind.Raw, LivePageKind.Zero]);
      const applyMeta = meta.slice();
      const memory = new Uint8Array(native.mapShared(file.fd, 64 * PAGE, true));
      await native.applyPages(memory, PAGE, 4, pages, out.subarray(0, bytes), applyMeta, held);
      expect(applyMeta).toEqual(meta); // same digests on both sides
      const back = Buffer.alloc(3 * PAGE);
      await file.read(back, 0, 3 * PAGE, 10 * PAGE);
      expect(back.equals(src.subarray(0, 3 * PAGE))).toBe(true);
      // Only pages 10–12 hold data: page 40 stayed a hole.
      expect(Array.from(native.dataSegments(file.fd, 0, 64 * PAGE, 16))).toEqual([10 * PAGE, 13 * PAGE, 64 * PAGE]);
    } finally {
      await file.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('measures encoding ratios on synthetic pages: first sends about half a page, deltas far less', async () => {
    const { compressRatio, deltaRatio } = await measureEncoding(PAGE, 256);
    expect(compressRatio).toBeGreaterThan(0.3);
    expect(compressRatio).toBeLessThan(0.8);
    expect(deltaRatio).toBeLessThan(0.05);
  });

  it('merges and subtracts sorted page sets', () => {
    expect(Array.from(unionPages(Uint32Array.of(1, 3, 5), Uint32Array.of(2, 3, 6)))).toEqual([1, 2, 3, 5, 6]);
    expect(Array.from(subtractPages(Uint32Array.of(1, 3, 5, 8), Uint32Array.of(0, 3, 6, 8, 9)))).toEqual([1, 5]);
    expect(Array.from(subtractPages(Uint32Array.of(1, 2), Uint32Array.of()))).toEqual([1, 2]);
  });
});

/**
 * A RAM file of `pageCount` pages on tmpfs, holes but for random pages written at `written` (given to `use`, in
 * that order), mapped read-only, for `use`; removed afterwards.
 */
async function withTmpfsRam(pageCount: number, written: number[], use: (file: FileHandle, memory: Uint8Array, data: Buffer[]) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join('/dev/shm', 'ferry-ram-'));
  const file = await open(join(dir, 'ram'), 'w+');
  try {
    await file.truncate(pageCount * PAGE);
    const data = written.map(() => randomFillSync(Buffer.alloc(PAGE)));
    for (let i = 0; i < written.length; i++) await file.write(data[i], 0, PAGE, written[i] * PAGE);
    await use(file, new Uint8Array(native.mapShared(file.fd, pageCount * PAGE)), data);
  } finally {
    await file.close();
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * A RAM file of `pageCount` zero pages under `base`, its ledger (the destination holds zeroes) and a started
 * page-hash tracker over it, for `use`; everything is removed afterwards.
 */
async function withTrackedRam(base: string, pageCount: number, use: (file: FileHandle, ledger: PageLedger, tracker: PageHashTracker) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(base, 'ferry-page-hash-'));
  const file = await open(join(dir, 'ram'), 'w+');
  try {
    await file.truncate(pageCount * PAGE);
    const ledger = new PageLedger(pageCount);
    await digestFilePages(file.fd, PAGE, pageCount, ledger.digests);
    const tracker = new PageHashTracker(file.fd, new Uint8Array(native.mapShared(file.fd, pageCount * PAGE)), PAGE, pageCount);
    await tracker.start(ledger);
    await use(file, ledger, tracker);
    await tracker.close();
  } finally {
    await file.close();
    await rm(dir, { recursive: true, force: true });
  }
}

describe('dirty tracking by page hashes', () => {
  it('looks for holes only where a pass has not found data yet, and finds pages written into them later', async () => {
    await withTmpfsRam(64, [5], async (file, memory, [page5]) => {
      const digests = new Uint32Array(128);
      const knownData = new Uint8Array(64);
      const digest = (p: number) => BigInt(digests[p * 2]) | (BigInt(digests[p * 2 + 1]) << 32n);
      const zero = native.xxh64(Buffer.alloc(PAGE));
      expect(await native.hashMappedPages(memory, file.fd, 0, PAGE, 64, digests, undefined, knownData)).toBe(1);
      expect(Array.from(knownData.entries()).filter(([, f]) => f).map(([p]) => p)).toEqual([5]);
      expect([digest(5), digest(6)]).toEqual([native.xxh64(page5), zero]);
      // Page 40, a hole so far, is written: the next pass finds it in the range it still asks the file about.
      const page40 = randomFillSync(Buffer.alloc(PAGE));
      await file.write(page40, 0, PAGE, 40 * PAGE);
      expect(await native.hashMappedPages(memory, file.fd, 0, PAGE, 64, digests, undefined, knownData)).toBe(2);
      expect(Array.from(knownData.entries()).filter(([, f]) => f).map(([p]) => p)).toEqual([5, 40]);
      expect([digest(5), digest(40), digest(41)]).toEqual([native.xxh64(page5), native.xxh64(page40), zero]);
      // Nothing was allocated by reading.
      expect(Array.from(native.dataSegments(file.fd, 0, 64 * PAGE, 16))).toEqual([5 * PAGE, 6 * PAGE, 40 * PAGE, 41 * PAGE, 64 * PAGE]);
    });
  });

  it('reports changed pages slice by slice in page order; a page sent during the pass is not reported', async () => {
    const pageCount = 2 * 8192 + 100; // two whole slices and a short one
    await withTrackedRam(tmpdir(), pageCount, async (file, ledger, tracker) => {
      const written = randomFillSync(Buffer.alloc(PAGE));
      for (const page of [3, 9000, 16_400]) await file.write(written, 0, PAGE, page * PAGE);
      const slices: Array<{ pages: number[]; end: number }> = [];
      const all = await tracker.collect((pages, end) => {
        slices.push({ pages: Array.from(pages), end });
        if (slices.length === 1) {
          // The sender records page 16 400 as sent while the pass is still going.
          const digest = native.xxh64(written);
          ledger.digests[16_400 * 2] = Number(digest & 0xffffffffn);
          ledger.digests[16_400 * 2 + 1] = Number(digest >> 32n);
        }
      });
      expect(slices).toEqual([
        { pages: [3], end: 8192 },
        { pages: [9000], end: 16_384 },
        { pages: [], end: pageCount },
      ]);
      expect(Array.from(all)).toEqual([3, 9000]);
    });
  });

  // On tmpfs, as guest RAM files are: reading a hole through a shared mapping there would allocate it.
  it('digests holes as zero pages without allocating them, and leaves known pages out', async () => {
    const pageCount = 1024;
    await withTrackedRam('/dev/shm', pageCount, async (file, _ledger, tracker) => {
      for (const page of [5, 7, 900]) await file.write(randomFillSync(Buffer.alloc(PAGE)), 0, PAGE, page * PAGE);
      // Page 5 is known dirty: not read, not reported.
      expect(Array.from(await tracker.collect(undefined, Uint32Array.of(5)))).toEqual([7, 900]);
      // The pass read no hole: the file holds data only where it was written.
      expect(Array.from(native.dataSegments(file.fd, 0, pageCount * PAGE, 16))).toEqual([5 * PAGE, 6 * PAGE, 7 * PAGE, 8 * PAGE, 900 * PAGE, 901 * PAGE, pageCount * PAGE]);
      // Not sent, so still dirty once it is examined.
      expect(Array.from(await tracker.collect())).toEqual([5, 7, 900]);
    });
  });
});

describe('rate limiter', () => {
  it('ramps a rate that holds the sender back up to its ceiling, and holds a rate without one', async () => {
    const clock = new VirtualClock();
    const limiter = new RateLimiter(clock);
    limiter.setRate(64 * MiB, 256 * MiB);
    for (let i = 0; i < 2000; i++) await limiter.consume(MiB);
    expect(limiter.currentRate).toBe(256 * MiB);
    // 2000 MiB at a rate rising 1.25× per 100 ms from 64 to 256 MiB/s: well under 2000/64 s.
    expect(clock.now()).toBeLessThan(10_000);
    expect(clock.now()).toBeGreaterThan((2000 / 256) * 1000);
    limiter.setRate(64 * MiB);
    for (let i = 0; i < 100; i++) await limiter.consume(MiB);
    expect(limiter.currentRate).toBe(64 * MiB);
  });
});

describe('simulated migrations (the engine on a virtual clock)', () => {
  const gigabit: LinkModel = { bandwidth: 125e6, rttMs: 0.2, compressRatio: 0.55, deltaRatio: 0.03, cacheBytes: 64 * MiB, deviceLoadMs: 20 };

  it('converges for a hot-set workload, within the downtime limit, with the destination holding every current page', async () => {
    const { report, vm } = await simulateMigration({ ramBytes: 2 * GiB, model: hotSetModel(0.05, 200 * MiB, 2 * MiB), link: gigabit, limits: { maxDowntimeMs: 300 } });
    expect(report.outcome).toBe('completed');
    expect(report.memoryVerified).toBe(true);
    expect(report.rounds).toBeGreaterThan(1);
    expect(report.downtimeMs).toBeLessThanOrEqual(300);
    expect(report.pages.delta).toBeGreaterThan(0);
    expect(vm.events).toEqual(['pause', 'handed-over']);
  });

  it('gives up on a workload that outruns the link and leaves the source running', async () => {
    const { report, vm } = await simulateMigration({ ramBytes: 1 * GiB, model: CLARK_WORKLOADS.mmuncher, link: gigabit, limits: { maxBandwidth: 125e6 } });
    expect(report.outcome).toBe('failed');
    expect(report.reason).toMatch(/RAM without converging|did not converge/);
    expect(report.sourceRunning).toBe(true);
    expect(vm.isPaused).toBe(false);
    // The cap is checked at the end of each round, as Xen does: it stops in the round that crossed 3× RAM.
    expect(report.transferredBytes).toBeGreaterThan(3 * GiB);
    expect(report.transferredBytes).toBeLessThan(4 * GiB);
  });

  it('converges the same workload with auto-converge by throttling the guest', async () => {
    const { report, vm } = await simulateMigration({
      ramBytes: 1 * GiB,
      model: uniformModel(400 * MiB),
      link: gigabit,
      limits: { maxBandwidth: 125e6, autoConverge: true, maxTransferFactor: 10 },
    });
    expect(report.outcome).toBe('completed');
    expect(vm.events.some((e) => e.startsWith('throttle:0.2'))).toBe(true);
    // The throttle ends before the pause.
    expect(vm.events.slice(-3)).toEqual(['throttle:0.00', 'pause', 'handed-over']);
  });

  it('switches over on force-complete, sending whatever is left, still verified', async () => {
    const { report } = await simulateMigration({
      ramBytes: 1 * GiB,
      model: CLARK_WORKLOADS.mmuncher,
      link: gigabit,
      onStart: (m) => m.on('stats', (s) => s.round >= 2 && m.forceComplete()),
    });
    expect(report).toMatchObject({ outcome: 'completed', forced: true, memoryVerified: true });
    expect(report.downtimeMs).toBeGreaterThan(300);
  });

  it('abort mid-migration leaves the source running', async () => {
    const { report, vm } = await simulateMigration({
      ramBytes: 1 * GiB,
      model: hotSetModel(0.05, 100 * MiB),
      link: gigabit,
      onStart: (m) => m.on('stats', (s) => s.transferredBytes > 100 * MiB && m.abort()),
    });
    expect(report).toMatchObject({ outcome: 'cancelled', sourceRunning: true });
    expect(vm.events).toEqual([]);
  });
});
