import { setTimeout as delay } from 'node:timers/promises';
import type { Clock, Pacer } from './types.js';

export const wallClock: Clock = {
  now: () => performance.now(),
  sleep: (ms) => (ms > 0 ? delay(ms) : Promise.resolve()),
};

/**
 * Simulated time: sleeping advances the clock at once. The simulation has one actor (the engine), so
 * "advance and continue" is exact; work that takes time (sending over the modelled link) calls advance().
 */
export class VirtualClock implements Clock {
  private t = 0;
  private alongsideUntil = 0;
  now(): number {
    return this.t;
  }
  sleep(ms: number): Promise<void> {
    this.advance(ms);
    return Promise.resolve();
  }
  advance(ms: number): void {
    if (ms > 0) this.t += ms;
  }

  /**
   * Work of `ms` that runs alongside the engine's, on another resource (the last collection, while the paused
   * VM's known pages go out on the link): it takes no time now, and settle() waits for its end.
   */
  alongside(ms: number): void {
    this.alongsideUntil = Math.max(this.alongsideUntil, this.t + ms);
  }

  /** Advances to the end of the work started alongside, if it has not ended yet. */
  settle(): void {
    this.t = Math.max(this.t, this.alongsideUntil);
  }
}

/** While the rate holds the sender back, it rises by this factor every RAMP_INTERVAL_MS, up to its ceiling. */
const RAMP_FACTOR = 1.25;
const RAMP_INTERVAL_MS = 100;

/**
 * Holds the sender to a rate (bytes per second) with a token bucket that allows a 20 ms burst. Records
 * the time it spent waiting, so the engine can tell link capacity (busy time) from imposed pacing.
 * Given a ceiling above the rate, it ramps up as TCP's slow start does, but per time rather than per round
 * trip: a sender held back by the rate for RAMP_INTERVAL_MS gets RAMP_FACTOR more. The first round of a
 * migration then starts moderate without lasting seconds at a rate far below what the link carries.
 */
export class RateLimiter implements Pacer {
  private rate = Infinity;
  private ceiling = Infinity;
  private lastRaise: number;
  private allowance = 0;
  private last: number;
  /** Milliseconds spent waiting since the last takeWaited(). */
  private waited = 0;

  constructor(private readonly clock: Clock) {
    this.last = clock.now();
    this.lastRaise = this.last;
  }

  /** Holds the sender to `bytesPerSecond`, which may ramp up to `ceiling` while it holds the sender back. */
  setRate(bytesPerSecond: number, ceiling = bytesPerSecond): void {
    this.refill();
    this.rate = bytesPerSecond;
    this.ceiling = Math.max(bytesPerSecond, ceiling);
    this.lastRaise = this.clock.now();
    this.allowance = Math.min(this.allowance, this.burst());
  }

  get currentRate(): number {
    return this.rate;
  }

  async consume(bytes: number): Promise<void> {
    if (this.rate === Infinity) return;
    this.refill();
    this.allowance -= bytes;
    if (this.allowance < 0) {
      const now = this.clock.now();
      if (this.rate < this.ceiling && now - this.lastRaise >= RAMP_INTERVAL_MS) {
        this.rate = Math.min(this.ceiling, this.rate * RAMP_FACTOR);
        this.lastRaise = now;
      }
      const ms = (-this.allowance / this.rate) * 1000;
      this.waited += ms;
      await this.clock.sleep(ms);
      this.refill();
    }
  }

  /** Milliseconds spent waiting since the previous call. */
  takeWaited(): number {
    const w = this.waited;
    this.waited = 0;
    return w;
  }

  private burst(): number {
    return this.rate === Infinity ? 0 : this.rate * 0.02;
  }

  private refill(): void {
    const now = this.clock.now();
    if (this.rate !== Infinity) this.allowance = Math.min(this.burst(), this.allowance + ((now - this.last) / 1000) * this.rate);
    this.last = now;
  }
}
