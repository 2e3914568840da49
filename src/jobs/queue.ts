import type { JobRecord } from './model.js';

/** Transient failures are retried `attempts - 1` times, waiting backoffMs, then twice that, and so on. */
export interface RetryPolicy {
  attempts: number;
  backoffMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { attempts: 3, backoffMs: 1000 };

export function backoffDelay(policy: RetryPolicy, failedAttempts: number): number {
  return policy.backoffMs * 2 ** Math.max(0, failedAttempts - 1);
}

/**
 * Where jobs wait and who runs them. The API enqueues and cancels; workers (in this process or, with a
 * shared queue, in others) take jobs and run their stages through the StageRunner. Both adapters give the
 * same semantics: stages in order, retries with backoff for transient errors, none for permanent ones,
 * cancellation that aborts running work, and interrupted work re-queued from scratch.
 */
export interface JobQueue {
  /** Queues the job's stages; its record already exists in the store. */
  enqueue(record: JobRecord): Promise<void>;
  /** Stops the job wherever it is: dropped if waiting, aborted if running. Its record is already cancelled. */
  cancel(id: string): Promise<void>;
  /** Starts running jobs in this process, up to `concurrency` at a time. */
  startWorker(concurrency: number): Promise<void>;
  /** Stops taking jobs; running ones get `graceMs` to finish, then are interrupted and re-queued. */
  close(graceMs: number): Promise<void>;
}
