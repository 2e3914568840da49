import { setTimeout as sleep } from 'node:timers/promises';

/**
 * A token bucket shared by every channel of a transfer (`--bandwidth`). Callers take tokens after
 * receiving a frame; while they wait they do not read, so SSH flow control slows the sender down and the
 * link carries at most `bytesPerSecond` on average (bursts of up to one second's worth).
 */
export class RateLimiter {
  private tokens: number;
  private last = performance.now();
  /** Waiters queue here so that channels share the rate fairly instead of racing for refills. */
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly bytesPerSecond: number) {
    if (!(bytesPerSecond > 0)) throw new RangeError('rate must be positive');
    this.tokens = bytesPerSecond;
  }

  take(bytes: number, signal?: AbortSignal): Promise<void> {
    const turn = this.queue.then(() => this.wait(bytes, signal));
    this.queue = turn.catch(() => undefined);
    return turn;
  }

  private async wait(bytes: number, signal?: AbortSignal): Promise<void> {
    this.refill();
    this.tokens -= bytes;
    if (this.tokens >= 0) return;
    await sleep((-this.tokens / this.bytesPerSecond) * 1000, undefined, { signal });
    this.refill();
  }

  private refill(): void {
    const now = performance.now();
    this.tokens = Math.min(this.bytesPerSecond, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
    this.last = now;
  }
}
