/**
 * The roles of live migration. The engine (engine.ts) only sees these interfaces, so the same pre-copy loop
 * and policy drive a real QEMU VM over the network and a synthetic VM over a modelled link.
 */
import type { PageLedger } from './ledger.js';

/** Time as the engine sees it: the wall clock, or a virtual clock when simulating. */
export interface Clock {
  /** Milliseconds since an arbitrary origin. */
  now(): number;
  sleep(ms: number): Promise<void>;
}

/** Receives the device state (everything but guest RAM) in order, chunk by chunk. */
export type DeviceStateSink = (chunk: Buffer) => Promise<void>;

/**
 * Receives a collection's dirty pages slice by slice as they are found, so they can be sent while the rest
 * of memory is still being examined: `pages` (sorted) are those below page `end` not reported before;
 * slices come in page order and the last one ends at pageCount.
 */
export type DirtySliceSink = (pages: Uint32Array, end: number) => void;

/**
 * The source VM's memory and run state. Pages are numbered 0..pageCount-1; a page set is a sorted
 * Uint32Array of page numbers.
 */
export interface MemoryBackend {
  /** For logs and reports, e.g. "qemu-shared-file /dev/shm/vm.ram (page-hash)". */
  readonly description: string;
  readonly pageSize: number;
  readonly pageCount: number;
  /**
   * True when every collection digests the content of every page and compares it with the ledger (the
   * page-hash tracker): after the final collection the ledger is then the digest of the paused memory itself,
   * so the switchover digest check proves the destination equal to the source end to end. Otherwise it
   * proves the destination holds exactly what was sent, and dirty tracking is trusted for the rest.
   */
  readonly collectsByContent: boolean;
  /**
   * Starts dirty tracking. `ledger` holds the digest of the version of each page the destination holds;
   * trackers that compare content compare against it.
   */
  startTracking(ledger: PageLedger): Promise<void>;
  /**
   * The pages that may have changed since the previous collection (or since startTracking); also to `onSlice`
   * as found. `known` (sorted) are pages the caller already counts as dirty: a tracker may skip examining
   * them and leave them out.
   */
  collectDirty(onSlice?: DirtySliceSink, known?: Uint32Array): Promise<Uint32Array>;
  /** Copies pages[0..count) back to back into out. */
  readPages(pages: Uint32Array, count: number, out: Buffer): Promise<void>;
  /**
   * All guest RAM as one shared read-only mapping of `fd` (mapShared), when the backend has it: the pages of the
   * rounds after the first are then encoded straight from it, with no read per page.
   */
  readonly mappedMemory?: { memory: Uint8Array; fd: number };
  /** Stops the vCPUs; guest memory and device state no longer change until resume(). */
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Takes `fraction` (0 to 0.99) of the VM's CPU time away to slow its dirtying (auto-converge); 0 ends it. */
  setThrottle(fraction: number): Promise<void>;
  /** Streams the device state while paused (the engine sends the last pages meanwhile); resolves once all of it went into `sink`. */
  saveDeviceState(sink: DeviceStateSink): Promise<void>;
  /** The destination resumed: the source stays stopped for good. */
  handedOver(): Promise<void>;
  close(): Promise<void>;
}

/** How a MemoryBackend finds the pages written since the previous collection. */
export interface DirtyTracker {
  /** "soft-dirty", "page-hash" or "exact" (the synthetic VM knows what it wrote). */
  readonly method: string;
  start(ledger: PageLedger): Promise<void>;
  collect(onSlice?: DirtySliceSink, known?: Uint32Array): Promise<Uint32Array>;
  close(): Promise<void>;
}

/** The destination VM as the listener sees it: a RAM file to fill, then device state, then resume. */
export interface DestinationVm {
  readonly description: string;
  /** Opens the RAM file for pageCount pages of pageSize bytes (read-write) and returns its descriptor. */
  openMemory(pageSize: number, pageCount: number): Promise<number>;
  /**
   * Loads the device state; resolves when the VM is ready to resume (still paused). Called when the migration
   * starts, so any preparation is done by the switchover; the chunks arrive then, possibly before the memory
   * is verified (resume() comes only after).
   */
  loadDeviceState(chunks: AsyncIterable<Buffer>): Promise<void>;
  resume(): Promise<void>;
  /** The migration failed: throw the destination VM away. */
  discard(): Promise<void>;
  close(): Promise<void>;
}

/** What one batch of pages cost on the wire. */
export interface SendCounters {
  pages: number;
  zeroPages: number;
  deltaPages: number;
  compressedPages: number;
  rawPages: number;
  /** Bytes on the wire, framing included. */
  wireBytes: number;
}

/** Paces the sender: resolves once `bytes` more may go on the wire at the current rate. */
export interface Pacer {
  consume(bytes: number): Promise<void>;
}

/** One call's circumstances, for PageTransport.sendPages. */
export interface SendContext {
  round: number;
  /** The stop-and-copy: the VM is paused and no round follows. */
  final: boolean;
  pacer: Pacer;
  stop: () => boolean;
  ledger: PageLedger;
}

/** The source side of the link to a destination: the network protocol, or a modelled link in simulation. */
export interface PageTransport {
  /**
   * Reads, encodes and sends pages[0..count), pacing each batch through `pacer` and recording the digest
   * of each page as sent in `ledger`. Stops dispatching batches once `stop()` returns true and resolves
   * with the pages it did not send.
   */
  sendPages(pages: Uint32Array, count: number, send: SendContext): Promise<{ counters: SendCounters; unsent: Uint32Array }>;
  /** Resolves when the destination has applied every page sent so far. */
  flush(): Promise<void>;
  /** The destination compares the digest of its whole memory with `digest`; rejects when they differ. */
  verify(digest: bigint): Promise<void>;
  sendDeviceState: DeviceStateSink;
  /** Ends the device state; resolves when the destination loaded it and is ready to resume. May overlap sendPages, flush and verify. */
  endDeviceState(): Promise<void>;
  /** Tells the destination to resume; resolves when it reports running. */
  commit(): Promise<void>;
  /** Tells the destination to discard what it received (best effort). */
  abort(reason: string): Promise<void>;
  /** Round-trip time of the link, for the downtime estimate. */
  readonly rttMs: number;
  close(): Promise<void>;
}

export type MigrationState = 'setup' | 'active' | 'switchover' | 'completed' | 'failed' | 'cancelled';

/** Live figures of a migration, as the job API reports them. Rates in bytes per second. */
export interface MigrationStats {
  id: string;
  engine: 'ferry' | 'qemu';
  state: MigrationState;
  round: number;
  ramBytes: number;
  pageSize: number;
  elapsedMs: number;
  /** Bytes on the wire so far. */
  transferredBytes: number;
  /** Guest RAM still to send (dirty pages × page size). */
  remainingBytes: number;
  /** Guest RAM dirtied per second, measured over the last round. */
  dirtyRate: number;
  /** Wire bytes per second over the last round. */
  bandwidth: number;
  /** The rate the sender is held to now (Infinity: unlimited). */
  rateLimit: number;
  /** Downtime the switchover would cost now, by the policy's estimate. */
  expectedDowntimeMs: number;
  /** CPU fraction taken from the VM by auto-converge. */
  throttle: number;
  maxDowntimeMs: number;
  maxBandwidth: number;
  pages: { sent: number; zero: number; delta: number; compressed: number; raw: number };
}

/** The outcome of a finished migration. */
export interface MigrationReport {
  id: string;
  engine: 'ferry' | 'qemu';
  outcome: 'completed' | 'failed' | 'cancelled';
  /** Why it failed or was cancelled. */
  reason?: string;
  totalMs: number;
  /** From the source pausing to the destination running, measured (0 when it never switched over). */
  downtimeMs: number;
  /**
   * Where the downtime went: stopping the source; the last dirty collection and the last pages, sent as the
   * collection finds them (finalPages, flush included; finalCollect is the part of it the collection took);
   * the digest comparison; waiting for the device state, which crosses alongside the pages; the destination's resume.
   */
  downtimeBreakdownMs?: { pause: number; finalCollect: number; finalPages: number; verify: number; deviceState: number; resume: number };
  transferredBytes: number;
  ramBytes: number;
  rounds: number;
  /** Whether the digest of the destination's whole memory was compared with the source's and matched. */
  memoryVerified: boolean;
  /** What the match proves: "content" (the paused source's memory itself) or "sent-pages" (see MemoryBackend.collectsByContent). */
  verification: 'content' | 'sent-pages';
  /** Whether the migration was switched over by force-complete. */
  forced: boolean;
  pages: MigrationStats['pages'];
  /** The source is still running (true for every outcome but completed, unless the handover was in doubt). */
  sourceRunning: boolean;
}
