/**
 * Simulated migrations: Ferry's engine and policy, unchanged, driving a synthetic VM over a modelled link
 * on a virtual clock, so VMs far larger than this machine (64 GiB at 10 Gbit/s) can be tabulated in seconds.
 *
 * The link model: wire time = bytes / bandwidth, plus round trips for flush, verify, device state and
 * resume. Page encoding is modelled with the ratios the real encoder reaches (measure them with
 * measureEncoding on the synthetic content): zero pages cost their header, a page sent for the first time
 * compressRatio × page, a page whose previous version is in the delta cache deltaRatio × page. The cache
 * is modelled exactly as the real one (direct-mapped by page number, filled from the second round).
 * Encoding is assumed to keep up with the link. The destination checks, at verify, that it holds the
 * current version of every page — the same proof the real listener makes with digests.
 */
import { VirtualClock } from './clock.js';
import { FerryMigration } from './engine.js';
import { MigrationError } from './errors.js';
import { SyntheticVm } from './backends/synthetic.js';
import type { MigrationLimits } from './policy.js';
import type { WorkingSetModel } from './workloads.js';
import type { MigrationReport, PageTransport, SendContext, SendCounters } from './types.js';
import { CacheMode, native } from '../native.js';
import { PAGE_HEADER_BYTES, FRAME_HEADER_BYTES, LivePageKind } from './protocol.js';

export interface LinkModel {
  /** Bytes per second. */
  bandwidth: number;
  rttMs: number;
  /** Wire size of a first-sent non-zero page, as a fraction of the page. */
  compressRatio: number;
  /** Wire size of a page sent as a delta against its cached previous version, as a fraction of the page. */
  deltaRatio: number;
  /** Delta cache size, bytes (0: no deltas). */
  cacheBytes: number;
  /** Destination time to load the device state and resume, ms. */
  deviceLoadMs: number;
}

const BATCH_PAGES = 1024;

export class SimulatedLink implements PageTransport {
  readonly rttMs: number;
  private readonly sentVersion: Int32Array;
  private readonly cacheTags: Int32Array;

  constructor(
    private readonly clock: VirtualClock,
    private readonly vm: SyntheticVm,
    private readonly model: LinkModel,
  ) {
    this.rttMs = model.rttMs;
    this.sentVersion = new Int32Array(vm.pageCount).fill(-1);
    this.cacheTags = new Int32Array(Math.floor(model.cacheBytes / vm.pageSize)).fill(-1);
  }

  async sendPages(pages: Uint32Array, count: number, { round, final, pacer, stop }: SendContext) {
    const counters: SendCounters = { pages: 0, zeroPages: 0, deltaPages: 0, compressedPages: 0, rawPages: 0, wireBytes: 0 };
    const { pageSize } = this.vm;
    const slots = this.cacheTags.length;
    for (let first = 0; first < count; first += BATCH_PAGES) {
      if (stop()) return { counters, unsent: pages.slice(first, count) };
      const end = Math.min(count, first + BATCH_PAGES);
      let bytes = FRAME_HEADER_BYTES;
      for (let i = first; i < end; i++) {
        const page = pages[i];
        bytes += PAGE_HEADER_BYTES;
        const slot = slots ? page % slots : -1;
        const cached = slots > 0 && this.cacheTags[slot] === page;
        if (this.vm.isZeroPage(page)) {
          counters.zeroPages++;
          if (cached) this.cacheTags[slot] = -1;
        } else {
          if (cached) {
            bytes += Math.ceil(pageSize * this.model.deltaRatio);
            counters.deltaPages++;
          } else {
            bytes += Math.ceil(pageSize * this.model.compressRatio);
            counters.compressedPages++;
          }
          // As the encoder does: cached from the second round on; the stop-and-copy evicts what it sends.
          if (slots > 0 && final) {
            if (cached) this.cacheTags[slot] = -1;
          } else if (slots > 0 && (cached || round >= 2)) this.cacheTags[slot] = page;
        }
        this.sentVersion[page] = this.vm.versions[page];
      }
      counters.pages += end - first;
      counters.wireBytes += bytes;
      this.clock.advance((bytes / this.model.bandwidth) * 1000);
      await pacer.consume(bytes);
    }
    return { counters, unsent: new Uint32Array(0) };
  }

  async flush(): Promise<void> {
    // Everything sent so far is applied only once the collection that found it has ended too.
    this.clock.settle();
    this.clock.advance(this.rttMs);
  }

  async verify(): Promise<void> {
    this.clock.advance(this.rttMs);
    let stale = 0;
    for (let p = 0; p < this.vm.pageCount; p++) if (this.sentVersion[p] !== this.vm.versions[p]) stale++;
    if (stale) throw new MigrationError(`destination memory differs from the source in ${stale} pages`);
  }

  sendDeviceState = async (chunk: Buffer): Promise<void> => {
    this.clock.advance((chunk.length / this.model.bandwidth) * 1000);
  };

  async endDeviceState(): Promise<void> {
    this.clock.advance(this.rttMs + this.model.deviceLoadMs);
  }

  async commit(): Promise<void> {
    this.clock.advance(this.rttMs);
  }

  async abort(): Promise<void> {
    this.clock.advance(this.rttMs / 2);
  }

  async close(): Promise<void> {}
}

export interface SimulationOptions {
  ramBytes: number;
  pageSize?: number;
  model: WorkingSetModel;
  link: LinkModel;
  limits?: Partial<MigrationLimits>;
  /** Dirty collection cost per GiB of RAM, ms (0.5: pagemap scan with soft-dirty or KVM's dirty log). */
  collectMsPerGiB?: number;
  seed?: number;
  /** Called with the migration before it starts (tests use it to force-complete or abort). */
  onStart?: (migration: FerryMigration, vm: SyntheticVm) => void;
}

export interface SimulationResult {
  report: MigrationReport;
  vm: SyntheticVm;
}

/** Runs one simulated migration to its end. */
export async function simulateMigration(options: SimulationOptions): Promise<SimulationResult> {
  const clock = new VirtualClock();
  const pageSize = options.pageSize ?? 4096;
  const vm = new SyntheticVm({
    pageCount: Math.floor(options.ramBytes / pageSize),
    pageSize,
    model: options.model,
    clock,
    seed: options.seed,
    collectMsPerGiB: options.collectMsPerGiB ?? 0.5,
  });
  const link = new SimulatedLink(clock, vm, options.link);
  const migration = new FerryMigration({ backend: vm, transport: link, clock, limits: options.limits, deviceStateMs: options.link.deviceLoadMs });
  // Let the guest run for a moment first, so memory is not pristine.
  clock.advance(1000);
  options.onStart?.(migration, vm);
  const report = await migration.start();
  return { report, vm };
}

/**
 * The ratios the real encoder (native encodePages) reaches on the synthetic VM's pages: first sends
 * (compressed or raw) and deltas after one more write, as fractions of a page. Feeds LinkModel.
 */
export async function measureEncoding(pageSize = 4096, pages = 2048): Promise<{ compressRatio: number; deltaRatio: number }> {
  const vm = new SyntheticVm({ pageCount: pages, pageSize, model: { name: 'none', regions: [] }, clock: new VirtualClock(), zeroFraction: 0 });
  const indices = Uint32Array.from({ length: pages }, (_, i) => i);
  const src = Buffer.alloc(pages * pageSize);
  const out = Buffer.alloc(pages * pageSize);
  const meta = new Uint32Array(pages * 4);
  const cache = Buffer.alloc(pages * pageSize);
  const tags = new Int32Array(pages).fill(-1);
  for (let i = 0; i < pages; i++) vm.fillPage(i, 1, src, i * pageSize);
  const first = await native.encodePages(src, -1, pageSize, pages, indices, cache, tags, CacheMode.Insert, 1, out, meta);
  for (let i = 0; i < pages; i++) vm.fillPage(i, 2, src, i * pageSize);
  const second = await native.encodePages(src, -1, pageSize, pages, indices, cache, tags, CacheMode.Insert, 1, out, meta);
  let deltas = 0;
  for (let i = 0; i < pages; i++) if (meta[i * 4] === LivePageKind.Delta) deltas++;
  if (deltas !== pages) throw new Error(`expected every page of the second pass to be a delta, got ${deltas} of ${pages}`);
  return { compressRatio: first / (pages * pageSize), deltaRatio: second / (pages * pageSize) };
}
