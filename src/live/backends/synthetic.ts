/**
 * A synthetic VM: memory whose writes follow a working-set model (workloads.ts) as time passes on a clock.
 * It runs the same engine as a real VM, over the real network to a listener (tests) or over a modelled
 * link on a virtual clock (simulate.ts: VMs far larger than this machine).
 *
 * Page content is a pure function of (page number, version), so nothing is stored per page but a version
 * counter: a 64 GiB VM costs 64 MiB. Writes land when time is accounted (collection, pause, resume,
 * throttle change), which is a valid schedule of the same writes; dirty tracking is exact.
 */
import { open, rm, type FileHandle } from 'node:fs/promises';
import { VirtualClock } from '../clock.js';
import type { PageLedger } from '../ledger.js';
import { writePages, type WorkingSetModel } from '../workloads.js';
import type { Clock, DestinationVm, DeviceStateSink, DirtySliceSink, MemoryBackend } from '../types.js';

export interface SyntheticVmOptions {
  pageCount: number;
  pageSize?: number;
  model: WorkingSetModel;
  clock: Clock;
  /** Share of pages that start out zero (never written before the migration). */
  zeroFraction?: number;
  seed?: number;
  /** Time one dirty collection takes on a virtual clock, per GiB of RAM, ms (a real tracker's cost). */
  collectMsPerGiB?: number;
}

/** Bytes of synthetic device state (CPU registers, device models) sent at switchover. */
const DEVICE_STATE_BYTES = 256 * 1024;

export class SyntheticVm implements MemoryBackend {
  readonly pageSize: number;
  readonly pageCount: number;
  readonly description: string;
  /** Tracking is exact: the VM knows what it wrote. */
  readonly collectsByContent = false;
  /** How many times each page has been written. */
  readonly versions: Uint32Array;
  private readonly dirty: Uint8Array;
  private readonly zeroThreshold: number;
  private readonly seed: number;
  private readonly random: () => number;
  private lastAccounted: number;
  private paused = false;
  private throttle = 0;
  private tracking = false;
  /** Guest run time so far (seconds), slowed by throttling, stopped while paused. */
  runSeconds = 0;
  /** Everything the VM saw, for tests: "pause", "resume", "throttle:0.2", "handed-over". */
  readonly events: string[] = [];

  constructor(private readonly options: SyntheticVmOptions) {
    this.pageSize = options.pageSize ?? 4096;
    this.pageCount = options.pageCount;
    this.versions = new Uint32Array(this.pageCount);
    this.dirty = new Uint8Array(this.pageCount);
    this.zeroThreshold = Math.round((options.zeroFraction ?? 0.3) * 0x10000);
    this.seed = options.seed ?? 1;
    this.random = mulberry32(this.seed);
    this.lastAccounted = options.clock.now();
    this.description = `synthetic ${((this.pageCount * this.pageSize) / 2 ** 20).toFixed(0)} MiB, ${options.model.name}`;
  }

  get isPaused(): boolean {
    return this.paused;
  }

  get currentThrottle(): number {
    return this.throttle;
  }

  async startTracking(_ledger: PageLedger): Promise<void> {
    this.account();
    this.dirty.fill(0);
    this.tracking = true;
  }

  async collectDirty(onSlice?: DirtySliceSink): Promise<Uint32Array> {
    this.account();
    const out: number[] = [];
    for (let p = 0; p < this.pageCount; p++) if (this.dirty[p]) out.push(p);
    this.dirty.fill(0);
    const { clock, collectMsPerGiB } = this.options;
    if (clock instanceof VirtualClock && collectMsPerGiB) {
      const ms = (collectMsPerGiB * this.pageCount * this.pageSize) / 2 ** 30;
      // Paused, the engine sends the pages it knows are dirty while the last collection runs.
      if (this.paused) clock.alongside(ms);
      else clock.advance(ms);
    }
    const dirty = Uint32Array.from(out);
    onSlice?.(dirty, this.pageCount);
    return dirty;
  }

  async readPages(pages: Uint32Array, count: number, out: Buffer): Promise<void> {
    for (let i = 0; i < count; i++) this.fillPage(pages[i], this.versions[pages[i]], out, i * this.pageSize);
  }

  /** True when the page reads as zeroes now. */
  isZeroPage(page: number): boolean {
    return this.versions[page] === 0 && this.startsZero(page);
  }

  /** Writes the content of `page` at `version` into out at offset. */
  fillPage(page: number, version: number, out: Buffer, offset: number): void {
    const words = this.pageSize / 4;
    const view = new Uint32Array(out.buffer, out.byteOffset + offset, words);
    if (version === 0 && this.startsZero(page)) {
      view.fill(0);
      return;
    }
    // Half incompressible, half a repeating pattern: compresses about 2:1, like typical guest memory.
    let x = (Math.imul(page + 1, 0x9e3779b1) ^ this.seed) >>> 0 || 1;
    const half = words >>> 1;
    for (let w = 0; w < half; w++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      view[w] = x >>> 0;
    }
    const pattern = Math.imul(page, 0x01010101) >>> 0;
    for (let w = half; w < words; w++) view[w] = pattern + (w & 7);
    // Each write rewrites one 64-byte line of the page, as guests mostly touch part of a page.
    const lines = this.pageSize / 64;
    for (let v = 1; v <= version; v++) {
      const line = (Math.imul(page, 7) + Math.imul(v, 13)) % lines >>> 0;
      const value = Math.imul(page ^ Math.imul(v, 0x85ebca6b), 0xc2b2ae35) >>> 0;
      view.fill(value, line * 16, line * 16 + 16);
    }
  }

  async pause(): Promise<void> {
    this.account();
    this.paused = true;
    this.events.push('pause');
  }

  async resume(): Promise<void> {
    this.account();
    this.paused = false;
    this.events.push('resume');
  }

  async setThrottle(fraction: number): Promise<void> {
    this.account();
    this.throttle = fraction;
    this.events.push(`throttle:${fraction.toFixed(2)}`);
  }

  async saveDeviceState(sink: DeviceStateSink): Promise<void> {
    for (const chunk of this.deviceState()) await sink(chunk);
  }

  /** The device state this VM would send now, in the chunks it sends it in. */
  deviceState(): Buffer[] {
    const header = Buffer.from(JSON.stringify({ pageCount: this.pageCount, runSeconds: this.runSeconds, seed: this.seed }) + '\n');
    const body = Buffer.alloc(DEVICE_STATE_BYTES);
    this.fillPage(0, 1, body, 0);
    return [header, body];
  }

  async handedOver(): Promise<void> {
    this.events.push('handed-over');
  }

  async close(): Promise<void> {
    this.tracking = false;
  }

  /** Applies the writes of the guest run time since the last call. */
  private account(): void {
    const now = this.options.clock.now();
    const seconds = ((now - this.lastAccounted) / 1000) * (this.paused ? 0 : 1 - this.throttle);
    this.lastAccounted = now;
    if (seconds <= 0) return;
    this.runSeconds += seconds;
    writePages(this.options.model, seconds, this.pageCount, this.pageSize, this.random, (page) => {
      this.versions[page]++;
      if (this.tracking) this.dirty[page] = 1;
    });
  }

  private startsZero(page: number): boolean {
    return (Math.imul(page + 0x3c6ef372, 0x2545f491) >>> 16) < this.zeroThreshold;
  }
}

/** A small seeded PRNG, so synthetic runs are reproducible. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * The destination of a synthetic VM: a RAM file, the device state kept in memory, and what happened to it
 * (resumed or discarded), so tests can compare it with the source.
 */
export class SyntheticDestination implements DestinationVm {
  readonly description: string;
  deviceState?: Buffer;
  state: 'waiting' | 'loaded' | 'running' | 'discarded' = 'waiting';
  private handle?: FileHandle;

  constructor(readonly ramPath: string) {
    this.description = `synthetic destination ${ramPath}`;
  }

  async openMemory(pageSize: number, pageCount: number): Promise<number> {
    this.handle = await open(this.ramPath, 'w+');
    await this.handle.truncate(pageSize * pageCount);
    return this.handle.fd;
  }

  async loadDeviceState(chunks: AsyncIterable<Buffer>): Promise<void> {
    const parts: Buffer[] = [];
    for await (const c of chunks) parts.push(c);
    this.deviceState = Buffer.concat(parts);
    this.state = 'loaded';
  }

  async resume(): Promise<void> {
    this.state = 'running';
  }

  async discard(): Promise<void> {
    this.state = 'discarded';
    await this.handle?.close();
    this.handle = undefined;
    await rm(this.ramPath, { force: true });
  }

  async close(): Promise<void> {
    await this.handle?.close();
    this.handle = undefined;
  }
}
