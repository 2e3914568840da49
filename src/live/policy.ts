/**
 * The pre-copy policy: one decision per round, from what the round measured. Pure (no I/O, no clock),
 * so it is tested on its own and shared by Ferry's engine and the QEMU-native mode.
 *
 * - Rate (Xen): start moderate so the host is not flooded, then raise the rate above the measured dirty
 *   rate each round, never above maxBandwidth; it never falls, so progress made is kept. Within a round the
 *   engine's limiter ramps it up too while it holds the sender back (clock.ts); the next round starts from
 *   the rate reached. A working set the
 *   guest rewrites whole within a round hides its real dirty rate (a page counts once per round however
 *   often it is written), so a round held back by the rate that left about as much as it sent doubles the
 *   rate instead (TCP's slow start).
 * - Switchover (QEMU): when the remaining dirty set (sent while the final collection runs) and the fixed
 *   switchover work fit maxDowntime at the link bandwidth measured while the sender was busy. Unlike QEMU, a fit is not taken
 *   while rounds still pay: when the dirty set at least halved over the last round, one more round (of that
 *   smaller set) shortens the pause for few bytes; when it did not, the guest rewrites its working set about
 *   as fast as it is sent and another round only adds traffic.
 * - Give up (Xen's limits): after maxRounds, or when the wire total passes maxTransferFactor × RAM (with
 *   auto-converge, only once the throttle is at its maximum); the source keeps running.
 * - Auto-converge (QEMU's cpu-throttle): when the link is already the bottleneck and the guest dirtied more
 *   than half of what the round sent in two consecutive rounds, take CPU time away from the guest: 20 %
 *   first, then 10 % more each round, at most 99 %.
 */

export interface MigrationLimits {
  /** Longest acceptable pause, ms (QEMU's downtime-limit; default 300 as QEMU). */
  maxDowntimeMs: number;
  /** Wire bytes per second at most (Infinity: unlimited). */
  maxBandwidth: number;
  /** Rate of the first round, bytes per second (capped by maxBandwidth). */
  initialBandwidth: number;
  autoConverge: boolean;
  /** Rounds before giving up (Xen: 30). */
  maxRounds: number;
  /** Give up when the wire total exceeds this many times RAM (Xen: 3). */
  maxTransferFactor: number;
}

export const DEFAULT_LIMITS: MigrationLimits = {
  maxDowntimeMs: 300,
  maxBandwidth: Infinity,
  initialBandwidth: 128 * 1024 * 1024,
  autoConverge: false,
  maxRounds: 30,
  maxTransferFactor: 3,
};

const THROTTLE_INITIAL = 0.2;
const THROTTLE_STEP = 0.1;
const THROTTLE_MAX = 0.99;
/** Dirtied/sent ratio above which a round counts as not converging (QEMU's throttle-trigger-threshold). */
const THROTTLE_TRIGGER = 0.5;
/** Headroom over the dirty rate when raising the rate. */
const RATE_HEADROOM = 1.5;
/** Share of a round the sender must be busy (not held back by the rate) for the link to count as saturated. */
const SATURATED_BUSY_SHARE = 0.9;
/** A round that leaves this share of the pages it sent (or more) dirty again made no headway. */
const STALLED_SHARE = 0.9;
/** A dirty set that shrank to less than this share of the previous one over a round is worth another round even when the switchover fits. */
const SHRINKING_SHARE = 0.5;

/** What the engine measured over one round. Rates in bytes per second. */
export interface RoundObservation {
  round: number;
  ramBytes: number;
  pageSize: number;
  /** Guest RAM bytes dirtied since the previous collection, per second. */
  dirtyRate: number;
  /** Pages left to send (dirty or unsent). */
  remainingPages: number;
  /** Wire bytes per page sent in this round (encoding included). */
  wireBytesPerPage: number;
  /** Wire bytes sent in this round and the round's duration. */
  roundWireBytes: number;
  roundSeconds: number;
  /** Of roundSeconds, the time the sender was working rather than waiting for the rate limit. */
  busySeconds: number;
  /** The rate the round was held to. */
  rate: number;
  totalWireBytes: number;
  /** How long the last dirty collection took, s (it is repeated while paused). */
  collectSeconds: number;
  /** Fixed cost of a switchover besides pages: round trips, device state, resume, s. */
  switchoverOverheadSeconds: number;
}

export type Decision =
  | { action: 'continue'; rate: number; throttle: number; expectedDowntimeMs: number; reason: string }
  | { action: 'switchover'; expectedDowntimeMs: number; forced: boolean; reason: string }
  | { action: 'give-up'; expectedDowntimeMs: number; reason: string };

export class MigrationPolicy {
  private limits: MigrationLimits;
  private rate: number;
  private throttle = 0;
  private slowRounds = 0;
  private forced = false;
  /** The dirty set left by the previous round, pages. */
  private previousRemaining?: number;

  constructor(limits: Partial<MigrationLimits> = {}) {
    this.limits = { ...DEFAULT_LIMITS, ...limits };
    this.rate = Math.min(this.limits.initialBandwidth, this.limits.maxBandwidth);
  }

  get current(): Readonly<MigrationLimits> {
    return this.limits;
  }

  get currentRate(): number {
    return this.rate;
  }

  get currentThrottle(): number {
    return this.throttle;
  }

  get forceRequested(): boolean {
    return this.forced;
  }

  /** Changes limits while migrating (the API's PATCH). A lower maxBandwidth lowers the rate at once. */
  update(change: Partial<Pick<MigrationLimits, 'maxDowntimeMs' | 'maxBandwidth' | 'autoConverge'>>): void {
    this.limits = { ...this.limits, ...change };
    this.rate = Math.min(this.rate, this.limits.maxBandwidth);
  }

  /** Switch over at the next decision, whatever the downtime (Nova's force_complete). */
  forceComplete(): void {
    this.forced = true;
  }

  /** The bandwidth the final stop-and-copy can count on: the link's measured capacity, within maxBandwidth. */
  linkBandwidth(o: RoundObservation): number {
    const capacity = o.busySeconds > 0 ? o.roundWireBytes / o.busySeconds : o.rate;
    return Math.min(this.limits.maxBandwidth, capacity > 0 ? capacity : o.rate);
  }

  expectedDowntimeMs(o: RoundObservation): number {
    const bandwidth = this.linkBandwidth(o);
    // The guest keeps writing until it is paused, which comes after this decision: count the pages a
    // collection's worth of time dirties on top of those already known.
    const pages = o.remainingPages + (o.dirtyRate * o.collectSeconds) / o.pageSize;
    const pagesSeconds = bandwidth > 0 ? (pages * o.wireBytesPerPage) / bandwidth : Infinity;
    // While paused, the known pages go out during the last collection and what it finds follows slice by
    // slice: the pause lasts as long as the longer of the two, not their sum.
    return (Math.max(o.collectSeconds, pagesSeconds) + o.switchoverOverheadSeconds) * 1000;
  }

  decide(o: RoundObservation): Decision {
    const expectedDowntimeMs = this.expectedDowntimeMs(o);
    if (this.forced) return { action: 'switchover', expectedDowntimeMs, forced: true, reason: 'force-complete requested' };
    const previousRemaining = this.previousRemaining;
    this.previousRemaining = o.remainingPages;
    const shrinking = previousRemaining !== undefined && o.remainingPages < SHRINKING_SHARE * previousRemaining && o.round < this.limits.maxRounds;
    if (expectedDowntimeMs <= this.limits.maxDowntimeMs && !shrinking) {
      return { action: 'switchover', expectedDowntimeMs, forced: false, reason: `expected downtime ${expectedDowntimeMs.toFixed(0)} ms fits ${this.limits.maxDowntimeMs} ms` };
    }
    if (o.round >= this.limits.maxRounds) {
      return { action: 'give-up', expectedDowntimeMs, reason: `did not converge in ${o.round} rounds (expected downtime ${expectedDowntimeMs.toFixed(0)} ms)` };
    }
    // With auto-converge, the throttle may still slow the guest enough: the transfer cap waits for its maximum.
    const throttleCanRise = this.limits.autoConverge && this.throttle < THROTTLE_MAX;
    if (!throttleCanRise && o.totalWireBytes > this.limits.maxTransferFactor * o.ramBytes) {
      return {
        action: 'give-up',
        expectedDowntimeMs,
        reason: `sent ${(o.totalWireBytes / o.ramBytes).toFixed(1)}× RAM without converging (expected downtime ${expectedDowntimeMs.toFixed(0)} ms)`,
      };
    }

    // Raise the rate above what the guest dirties, in wire bytes (encoding shrinks pages).
    const dirtyWireRate = o.dirtyRate * (o.wireBytesPerPage / o.pageSize);
    const linkSaturated = o.rate >= this.limits.maxBandwidth || o.busySeconds >= SATURATED_BUSY_SHARE * o.roundSeconds;
    const pagesSent = o.roundWireBytes / o.wireBytesPerPage;
    const stalled = !linkSaturated && pagesSent > 0 && o.remainingPages >= STALLED_SHARE * pagesSent;
    this.rate = Math.min(this.limits.maxBandwidth, Math.max(this.rate, o.rate, dirtyWireRate * RATE_HEADROOM, stalled ? o.rate * 2 : 0));

    const dirtiedWire = dirtyWireRate * o.roundSeconds;
    const notConverging = o.roundWireBytes > 0 && dirtiedWire > THROTTLE_TRIGGER * o.roundWireBytes;
    this.slowRounds = notConverging && linkSaturated ? this.slowRounds + 1 : 0;
    if (!this.limits.autoConverge) this.throttle = 0;
    else if (this.slowRounds >= 2) {
      this.throttle = this.throttle === 0 ? THROTTLE_INITIAL : Math.min(THROTTLE_MAX, this.throttle + THROTTLE_STEP);
      this.slowRounds = 0;
    }
    return {
      action: 'continue',
      rate: this.rate,
      throttle: this.throttle,
      expectedDowntimeMs,
      reason:
        expectedDowntimeMs <= this.limits.maxDowntimeMs
          ? `expected downtime ${expectedDowntimeMs.toFixed(0)} ms fits, but the dirty set is still shrinking`
          : `expected downtime ${expectedDowntimeMs.toFixed(0)} ms > ${this.limits.maxDowntimeMs} ms`,
    };
  }
}
