import type { Logger } from 'pino';
import type { JobRecord } from './model.js';
import { backoffDelay, DEFAULT_RETRY, type JobQueue, type RetryPolicy } from './queue.js';
import { ABORT_CANCEL, ABORT_SHUTDOWN } from './handler.js';
import type { StageRunner } from './runner.js';
import { StageSlots } from './stage-slots.js';
import type { JobStore } from './store.js';

interface Pending {
  jobId: string;
  stageIndex: number;
  attempt: number;
  previous: unknown;
}

/**
 * The queue for one machine without Redis: jobs wait in memory, in order, and run in this process. The
 * store is the durable part: at start every unfinished job is queued again (a running one from scratch),
 * so a restart of `serve` loses nothing.
 */
export class EmbeddedQueue implements JobQueue {
  private readonly waiting: Pending[] = [];
  private readonly retryTimers = new Map<string, NodeJS.Timeout>();
  private readonly running = new Map<string, { controller: AbortController; done: Promise<void> }>();
  private slots = new StageSlots(0);
  /** Jobs taken at once: one more than the slots, so the next one is ready when a slot frees. */
  private taken = 0;
  private closing = false;

  private constructor(
    private readonly runner: StageRunner,
    private readonly logger: Logger,
    private readonly retry: RetryPolicy,
  ) {}

  static async open(store: JobStore, runner: StageRunner, logger: Logger, retry: RetryPolicy = DEFAULT_RETRY): Promise<EmbeddedQueue> {
    const queue = new EmbeddedQueue(runner, logger, retry);
    const unfinished = await store.unfinished();
    for (const record of unfinished) queue.waiting.push({ jobId: record.id, stageIndex: 0, attempt: 1, previous: undefined });
    if (unfinished.length) logger.info({ jobs: unfinished.length }, 're-queued unfinished jobs from the store');
    return queue;
  }

  async enqueue(record: JobRecord): Promise<void> {
    this.waiting.push({ jobId: record.id, stageIndex: 0, attempt: 1, previous: undefined });
    this.pump();
  }

  async cancel(id: string): Promise<void> {
    const at = this.waiting.findIndex((p) => p.jobId === id);
    if (at >= 0) this.waiting.splice(at, 1);
    clearTimeout(this.retryTimers.get(id));
    this.retryTimers.delete(id);
    const active = this.running.get(id);
    if (active) {
      active.controller.abort(ABORT_CANCEL);
      await active.done;
    }
  }

  async startWorker(concurrency: number): Promise<void> {
    this.slots = new StageSlots(concurrency);
    this.taken = concurrency + 1;
    this.pump();
  }

  async close(graceMs: number): Promise<void> {
    this.closing = true;
    // A job prepared but not started stays queued in the store, for the next start.
    this.slots.close();
    for (const timer of this.retryTimers.values()) clearTimeout(timer);
    const all = () => Promise.all([...this.running.values()].map((r) => r.done));
    let timer: NodeJS.Timeout | undefined;
    const graceOver = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), graceMs)));
    if ((await Promise.race([all(), graceOver])) === 'timeout') {
      // Unfinished work is re-queued in the store and restarts from scratch at the next start.
      for (const r of this.running.values()) r.controller.abort(ABORT_SHUTDOWN);
      await all();
    }
    clearTimeout(timer);
  }

  private pump(): void {
    while (!this.closing && this.running.size < this.taken && this.waiting.length) {
      const next = this.waiting.shift()!;
      const controller = new AbortController();
      const done = this.execute(next, controller.signal)
        .catch((err) => this.logger.error({ err, jobId: next.jobId }, 'job runner failed'))
        .finally(() => {
          this.running.delete(next.jobId);
          this.pump();
        });
      this.running.set(next.jobId, { controller, done });
    }
  }

  /** Runs the job's stages in order in this slot; a failed attempt waits out its backoff outside the slot. */
  private async execute(pending: Pending, signal: AbortSignal): Promise<void> {
    let { stageIndex, previous } = pending;
    for (;;) {
      const outcome = await this.runner.run({ jobId: pending.jobId, stageIndex, attempt: pending.attempt, maxAttempts: this.retry.attempts, signal, previous, slots: this.slots });
      if (outcome.kind === 'completed' && outcome.next !== undefined) {
        stageIndex = outcome.next;
        previous = outcome.result;
        pending = { ...pending, stageIndex, attempt: 1, previous };
        continue;
      }
      if (outcome.kind === 'retry' && !this.closing) {
        const retry = { ...pending, stageIndex, previous, attempt: pending.attempt + 1 };
        const timer = setTimeout(() => {
          this.retryTimers.delete(pending.jobId);
          this.waiting.push(retry);
          this.pump();
        }, backoffDelay(this.retry, pending.attempt));
        this.retryTimers.set(pending.jobId, timer);
      }
      return;
    }
  }
}
