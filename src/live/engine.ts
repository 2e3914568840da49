/**
 * Ferry's live migration engine: iterative pre-copy (Clark et al., NSDI 2005; QEMU's RAM migration).
 *
 *   round 1: every page, while the VM runs
 *   round n: the pages dirtied during round n-1 (plus any a force-complete left unsent)
 *   then:    pause → the last dirty pages, sent while the last collection finds them, and the device state
 *            alongside → flush → compare whole-memory digests → resume there
 *
 * The policy (policy.ts) sets each round's rate and decides when to switch over or give up. Safety: the
 * destination resumes only after its memory digest matched the source's; a failure before the commit
 * leaves the source running (resumed if it was paused) and tells the destination to discard everything.
 */
import type { Logger } from 'pino';
import { CancelledError, errorMessage } from '../errors.js';
import { RateLimiter, wallClock } from './clock.js';
import { MigrationController, type MigrationUpdate } from './controller.js';
import { HandoverInDoubtError, MigrationNotConvergingError } from './errors.js';
import { PageLedger, allPages, subtractPages, unionPages } from './ledger.js';
import { MigrationPolicy, type Decision, type MigrationLimits } from './policy.js';
import { PAGE_HEADER_BYTES } from './protocol.js';
import type { Clock, MemoryBackend, MigrationReport, MigrationState, MigrationStats, PageTransport, SendCounters } from './types.js';

export interface FerryMigrationOptions {
  id?: string;
  backend: MemoryBackend;
  /** Connected to the destination. The engine closes it when done. */
  transport: PageTransport;
  limits?: Partial<MigrationLimits>;
  clock?: Clock;
  /** Estimated device state save + load + resume time, ms (part of the expected downtime). */
  deviceStateMs?: number;
  /** How often stats are emitted while a round is sending, ms. */
  statsIntervalMs?: number;
  log?: Logger;
}

export class FerryMigration extends MigrationController {
  private readonly backend: MemoryBackend;
  private readonly transport: PageTransport;
  private readonly clock: Clock;
  private readonly policy: MigrationPolicy;
  private readonly limiter: RateLimiter;
  private readonly ledger: PageLedger;
  private readonly deviceStateMs: number;
  private readonly statsIntervalMs: number;
  private readonly log?: Logger;

  private state: MigrationState = 'setup';
  private round = 0;
  private startedAt = 0;
  private lastStatsAt = -Infinity;
  private remainingPages: number;
  private dirtyRate = 0;
  private bandwidth = 0;
  private expectedDowntimeMs = Infinity;
  private appliedThrottle = 0;
  /** Wire bytes of the round in progress, not yet in totals. */
  private roundWireBytes = 0;
  private readonly totals: SendCounters = { pages: 0, zeroPages: 0, deltaPages: 0, compressedPages: 0, rawPages: 0, wireBytes: 0 };

  constructor(options: FerryMigrationOptions) {
    super(options.id);
    this.backend = options.backend;
    this.transport = options.transport;
    this.clock = options.clock ?? wallClock;
    this.policy = new MigrationPolicy(options.limits);
    this.limiter = new RateLimiter(this.clock);
    this.ledger = new PageLedger(this.backend.pageCount);
    this.deviceStateMs = options.deviceStateMs ?? 30;
    this.statsIntervalMs = options.statsIntervalMs ?? 500;
    this.log = options.log;
    this.remainingPages = this.backend.pageCount;
  }

  update(change: MigrationUpdate): void {
    this.policy.update(change);
    if (change.maxBandwidth !== undefined) this.limiter.setRate(Math.min(this.limiter.currentRate, change.maxBandwidth), change.maxBandwidth);
  }

  forceComplete(): void {
    this.policy.forceComplete();
  }

  stats(): MigrationStats {
    const { pageSize, pageCount } = this.backend;
    const limits = this.policy.current;
    return {
      id: this.id,
      engine: 'ferry',
      state: this.state,
      round: this.round,
      ramBytes: pageSize * pageCount,
      pageSize,
      elapsedMs: this.startedAt ? this.clock.now() - this.startedAt : 0,
      transferredBytes: this.totals.wireBytes + this.roundWireBytes,
      remainingBytes: this.remainingPages * pageSize,
      dirtyRate: this.dirtyRate,
      bandwidth: this.bandwidth,
      rateLimit: this.limiter.currentRate,
      expectedDowntimeMs: this.expectedDowntimeMs,
      throttle: this.appliedThrottle,
      maxDowntimeMs: limits.maxDowntimeMs,
      maxBandwidth: limits.maxBandwidth,
      pages: this.pageTotals(),
    };
  }

  protected async execute(): Promise<MigrationReport> {
    const { backend, transport, clock } = this;
    this.startedAt = clock.now();
    let paused = false;
    let committed = false;
    let pauseAt = 0;
    let forced = false;
    let verified = false;
    let deviceState: Promise<void> | undefined;
    const breakdown = { pause: 0, finalCollect: 0, finalPages: 0, verify: 0, deviceState: 0, resume: 0 };
    const report = (outcome: MigrationReport['outcome'], extra: Partial<MigrationReport>): MigrationReport => ({
      id: this.id,
      engine: 'ferry',
      outcome,
      totalMs: clock.now() - this.startedAt,
      downtimeMs: 0,
      transferredBytes: this.totals.wireBytes,
      ramBytes: backend.pageSize * backend.pageCount,
      rounds: this.round,
      memoryVerified: verified,
      verification: backend.collectsByContent ? 'content' : 'sent-pages',
      forced,
      pages: this.pageTotals(),
      sourceRunning: true,
      ...extra,
    });

    try {
      await backend.startTracking(this.ledger);
      this.state = 'active';
      let pending = allPages(backend.pageCount);
      let lastCollect = clock.now();
      for (;;) {
        this.round++;
        this.limiter.setRate(this.policy.currentRate, this.policy.current.maxBandwidth);
        this.limiter.takeWaited();
        const roundStart = clock.now();
        const sent = await transport.sendPages(pending, pending.length, {
          round: this.round,
          final: false,
          pacer: this.pacer(),
          stop: () => this.abortRequested || this.policy.forceRequested,
          ledger: this.ledger,
        });
        this.throwIfAborted();
        this.account(sent.counters);
        const roundEnd = clock.now();
        const waitedMs = this.limiter.takeWaited();
        const dirty = await backend.collectDirty();
        const collected = clock.now();
        pending = unionPages(dirty, sent.unsent);
        this.remainingPages = pending.length;

        const roundSeconds = Math.max(1e-6, (roundEnd - roundStart) / 1000);
        this.dirtyRate = (dirty.length * backend.pageSize) / Math.max(1e-6, (collected - lastCollect) / 1000);
        this.bandwidth = sent.counters.wireBytes / roundSeconds;
        lastCollect = collected;
        const decision: Decision = this.policy.decide({
          round: this.round,
          ramBytes: backend.pageSize * backend.pageCount,
          pageSize: backend.pageSize,
          dirtyRate: this.dirtyRate,
          remainingPages: pending.length,
          wireBytesPerPage: wireBytesPerDirtyPage(sent.counters, backend.pageSize),
          roundWireBytes: sent.counters.wireBytes,
          roundSeconds,
          busySeconds: Math.max(0, roundSeconds - waitedMs / 1000),
          rate: this.limiter.currentRate,
          totalWireBytes: this.totals.wireBytes,
          collectSeconds: (collected - roundEnd) / 1000,
          switchoverOverheadSeconds: (transport.rttMs * 4 + this.deviceStateMs) / 1000,
        });
        this.expectedDowntimeMs = decision.expectedDowntimeMs;
        this.log?.info({ round: this.round, decision, dirtyPages: dirty.length, roundMs: roundEnd - roundStart, collectMs: collected - roundEnd, ...sent.counters }, 'round finished');
        this.emit('stats', this.stats());
        if (decision.action === 'switchover') {
          forced = decision.forced;
          break;
        }
        if (decision.action === 'give-up') throw new MigrationNotConvergingError(decision.reason);
        if (decision.throttle !== this.appliedThrottle) {
          await backend.setThrottle(decision.throttle);
          this.appliedThrottle = decision.throttle;
        }
      }

      this.state = 'switchover';
      if (this.appliedThrottle > 0) await backend.setThrottle(0);
      this.appliedThrottle = 0;
      pauseAt = clock.now();
      await backend.pause();
      paused = true;
      let t = clock.now();
      breakdown.pause = t - pauseAt;
      // Neither memory nor devices change any more: the device state crosses while the last pages go, and
      // the destination loads it meanwhile (it resumes only after the digests matched).
      deviceState = this.transferDeviceState();
      deviceState.catch(() => undefined); // awaited below, or settled before the source resumes
      // As QEMU does, the stop-and-copy is not held to max-bandwidth: the limit paces pre-copy traffic, and
      // every millisecond of it here is the guest's.
      this.limiter.setRate(Infinity);
      breakdown.finalCollect = await this.sendFinalPages(pending);
      this.remainingPages = 0;
      await transport.flush();
      breakdown.finalPages = clock.now() - t;
      t = clock.now();
      await transport.verify(this.ledger.combined());
      verified = true;
      breakdown.verify = clock.now() - t;
      t = clock.now();
      await deviceState;
      breakdown.deviceState = clock.now() - t;
      // The last moment an abort is honoured: after the commit the destination owns the VM.
      this.throwIfAborted();
      t = clock.now();
      committed = true;
      try {
        await transport.commit();
      } catch (err) {
        throw new HandoverInDoubtError(`the destination did not confirm that it resumed (${errorMessage(err)}); the source stays paused`, { cause: err });
      }
      const resumedAt = clock.now();
      breakdown.resume = resumedAt - t;
      this.state = 'completed';
      await backend.handedOver();
      const done = report('completed', { downtimeMs: resumedAt - pauseAt, downtimeBreakdownMs: breakdown, sourceRunning: false });
      this.emit('stats', this.stats());
      this.log?.info(done, 'migration completed');
      return done;
    } catch (err) {
      const cancelled = this.abortRequested && !committed;
      this.state = cancelled ? 'cancelled' : 'failed';
      let sourceRunning = !committed;
      if (!committed) {
        await transport.abort(errorMessage(err)).catch(() => undefined);
        // The source's device-state save must be over (the destination's abort ends it) before the source runs.
        await deviceState?.catch(() => undefined);
        if (this.appliedThrottle > 0) await backend.setThrottle(0).catch(() => undefined);
        this.appliedThrottle = 0;
        if (paused) {
          try {
            await backend.resume();
          } catch (resumeErr) {
            sourceRunning = false;
            this.log?.error({ err: resumeErr }, 'the source could not be resumed');
          }
        }
      }
      const failed = report(cancelled ? 'cancelled' : 'failed', { reason: errorMessage(err), sourceRunning });
      this.log?.warn(failed, 'migration did not complete');
      this.emit('stats', this.stats());
      return failed;
    } finally {
      await transport.close().catch(() => undefined);
    }
  }

  /**
   * The stop-and-copy's pages: first those known dirty before the pause (`pending`), at once, then the
   * last collection's slices as the collection finds them (less those already queued). Sends go one after
   * the other, while the collection goes on. Returns how long the collection took.
   */
  private async sendFinalPages(pending: Uint32Array): Promise<number> {
    const { backend, transport, ledger } = this;
    const round = this.round + 1;
    let sending: Promise<void> = Promise.resolve();
    const queue = (pages: Uint32Array) => {
      if (pages.length === 0) return;
      sending = sending.then(async () => {
        const sent = await transport.sendPages(pages, pages.length, { round, final: true, pacer: this.pacer(), stop: () => this.abortRequested, ledger });
        this.throwIfAborted();
        this.account(sent.counters);
      });
      sending.catch(() => undefined); // awaited below, unless the collection fails first
    };
    queue(pending);
    let next = 0;
    const started = this.clock.now();
    await backend.collectDirty((found, end) => {
      let upTo = next;
      while (upTo < pending.length && pending[upTo] < end) upTo++;
      queue(subtractPages(found, pending.subarray(next, upTo)));
      next = upTo;
    }, pending);
    const collectMs = this.clock.now() - started;
    await sending;
    return collectMs;
  }

  private async transferDeviceState(): Promise<void> {
    await this.backend.saveDeviceState(this.transport.sendDeviceState);
    await this.transport.endDeviceState();
  }

  private throwIfAborted(): void {
    if (this.abortRequested) throw new CancelledError('migration aborted');
  }

  /** The limiter, with stats emitted as bytes go out. */
  private pacer() {
    return {
      consume: async (bytes: number) => {
        this.roundWireBytes += bytes;
        await this.limiter.consume(bytes);
        const now = this.clock.now();
        if (now - this.lastStatsAt >= this.statsIntervalMs) {
          this.lastStatsAt = now;
          this.emit('stats', this.stats());
        }
      },
    };
  }

  private account(c: SendCounters): void {
    const t = this.totals;
    this.roundWireBytes = 0;
    t.pages += c.pages;
    t.zeroPages += c.zeroPages;
    t.deltaPages += c.deltaPages;
    t.compressedPages += c.compressedPages;
    t.rawPages += c.rawPages;
    t.wireBytes += c.wireBytes;
  }

  private pageTotals(): MigrationStats['pages'] {
    const t = this.totals;
    return { sent: t.pages, zero: t.zeroPages, delta: t.deltaPages, compressed: t.compressedPages, raw: t.rawPages };
  }
}

/**
 * Wire bytes a dirty page costs, from a round's counters. Zero pages are left out: the first round is full
 * of them and they cost a header, but pages that get dirtied are almost never zero.
 */
function wireBytesPerDirtyPage(c: SendCounters, pageSize: number): number {
  const dataPages = c.pages - c.zeroPages;
  if (dataPages <= 0) return pageSize;
  return (c.wireBytes - c.zeroPages * PAGE_HEADER_BYTES) / dataPages;
}
