/**
 * How many stages run at once in a worker. Queues hand out one job more than there are slots, so the next
 * job is fetched and prepared (record read, stale temporaries removed) while the slots are busy, and starts
 * the moment a stage's work ends, while that job's record, log and queue entry are still being finished.
 */
export class StageSlots {
  private free: number;
  private readonly waiting: Array<(granted: boolean) => void> = [];
  private closed = false;

  constructor(size: number) {
    this.free = size;
  }

  /** Resolves true once a slot is held; false when the signal aborts or the slots close first. */
  acquire(signal: AbortSignal): Promise<boolean> {
    if (this.closed || signal.aborted) return Promise.resolve(false);
    if (this.free > 0) {
      this.free--;
      return Promise.resolve(true);
    }
    return new Promise((resolve) => {
      const grant = (granted: boolean) => {
        signal.removeEventListener('abort', onAbort);
        resolve(granted);
      };
      const onAbort = () => {
        this.waiting.splice(this.waiting.indexOf(grant), 1);
        resolve(false);
      };
      signal.addEventListener('abort', onAbort, { once: true });
      this.waiting.push(grant);
    });
  }

  release(): void {
    const next = this.waiting.shift();
    if (next) next(true);
    else this.free++;
  }

  /** Shutdown: jobs waiting for a slot are refused (their queue takes them back), and so is every later one. */
  close(): void {
    this.closed = true;
    for (const refuse of this.waiting.splice(0)) refuse(false);
  }
}
