import { hostname } from 'node:os';
import type { Logger } from 'pino';
import { FerryError, errorMessage } from '../errors.js';
import { CredentialVault } from './credentials.js';
import { isPermanent } from './errors.js';
import { ABORT_SHUTDOWN, plannedStages, type CredentialReader, type RunnableJobHandler, type StageContext } from './handler.js';
import { isTerminal, type JobFailure, type JobProgress } from './model.js';
import { removeStaleTemporaries, resolveInDataDir } from './paths.js';
import { runnableHandler } from './registry.js';
import type { StageSlots } from './stage-slots.js';
import { logLine, type JobStore } from './store.js';

/** Progress reaches the store (and the events stream) at most this often per job. */
const PROGRESS_INTERVAL_MS = 250;

export interface StageAttempt {
  jobId: string;
  stageIndex: number;
  /** 1 for the first try of this stage; retries after failures count up. */
  attempt: number;
  maxAttempts: number;
  signal: AbortSignal;
  previous: unknown;
  /** The stage's work waits for one of these; the job may be prepared before. */
  slots: StageSlots;
}

export type StageOutcome =
  /** `next`: the index of the stage that runs next, or undefined after the job's last stage. */
  | { kind: 'completed'; result: unknown; next: number | undefined }
  | { kind: 'retry'; error: Error }
  | { kind: 'failed'; error: Error }
  | { kind: 'cancelled' }
  /** Stopped by a shutdown: the job is queued again and starts over. */
  | { kind: 'interrupted' }
  /** The job was cancelled or finished before this stage started. */
  | { kind: 'skipped' }
  /** The worker shut down before the stage could start: the queue takes the job back as it is. */
  | { kind: 'returned' };

/**
 * Runs one stage of one job for any queue adapter: the record's state transitions, the job log, progress,
 * removal of what an interrupted attempt left behind, and the retry-or-fail decision.
 */
export class StageRunner {
  readonly workerName = `${hostname()}:${process.pid}`;
  /** Opened at the first reveal: most stages never log in anywhere, and a worker without capture work needs no key. */
  private vault?: Promise<CredentialVault>;
  private readonly credentials: CredentialReader = {
    reveal: async (id) => (await (this.vault ??= CredentialVault.open(this.dataDir))).reveal(id),
  };

  constructor(
    private readonly store: JobStore,
    private readonly dataDir: string,
    private readonly logger: Logger,
    /** Which handler runs a job type; the registry's, unless a caller brings its own (tests do). */
    private readonly handlerFor: (type: string) => RunnableJobHandler = runnableHandler,
  ) {}

  async run(attempt: StageAttempt): Promise<StageOutcome> {
    const { jobId, stageIndex, signal } = attempt;
    const record = await this.store.get(jobId);
    if (!record || isTerminal(record.state)) return { kind: 'skipped' };
    const handler = this.handlerFor(record.type);
    const stage = handler.stages[stageIndex];
    const next = plannedStages(handler, record.spec).find((index) => index > stageIndex);
    // Lines are written in call order (the store keeps appends in order); the runner awaits its own so a
    // client that sees the final state also finds the line that explains it.
    const log = (message: string) => this.store.appendLog(jobId, logLine(message)).catch((err) => this.logger.error({ err, jobId }, 'job log write failed'));
    const resolvePath = (path: string, field: string) => resolveInDataDir(this.dataDir, path, field);

    // Running in this very stage: an attempt of it was cut off. (Running in an earlier stage: that one finished.)
    if (record.state === 'running' && record.stage === stage.name) await log(`the previous attempt on ${record.worker} did not finish (worker stopped or lost); starting ${stage.name} over`);
    for (const output of stage.outputs(record.spec)) {
      const removed = await removeStaleTemporaries(await resolvePath(output, 'output'));
      if (removed.length) await log(`removed partial output left by an interrupted attempt: ${removed.join(', ')}`);
    }
    if (!(await attempt.slots.acquire(signal))) return signal.aborted && signal.reason !== ABORT_SHUTDOWN ? { kind: 'skipped' } : { kind: 'returned' };
    // Refused if the job was cancelled while it waited for the slot.
    const started = await this.store.update(jobId, {
      state: 'running',
      stage: stage.name,
      startedAt: record.startedAt ?? new Date().toISOString(),
      attempts: record.attempts + 1,
      progress: { done: 0, total: 0 },
      worker: this.workerName,
    });
    if (!started) {
      attempt.slots.release();
      return { kind: 'skipped' };
    }
    // Not awaited: the store keeps appends in order, and the stage need not wait for its log.
    void log(`${stage.name}: attempt ${attempt.attempt} of ${attempt.maxAttempts} on ${this.workerName}`);
    this.logger.info({ jobId, stage: stage.name, attempt: attempt.attempt }, 'stage started');

    const progress = new ProgressReporter((p) => this.store.update(jobId, { progress: p }));
    const ctx: StageContext<typeof record.spec> = {
      spec: record.spec,
      previous: attempt.previous,
      resolvePath,
      signal,
      credentials: this.credentials,
      progress: (p) => progress.report(p),
      log: (message) => void log(message),
    };
    // The job's work ends when its stage's does: the slot goes to the next job at once, and the record
    // says when the work ended, not when its last write landed.
    let workEnded = '';
    const endWork = () => {
      workEnded = new Date().toISOString();
      attempt.slots.release();
    };
    try {
      const result = await stage.run(ctx).finally(endWork);
      await progress.flush();
      if (next === undefined) {
        await log('completed');
        await this.store.update(jobId, { state: 'completed', finishedAt: workEnded, result, progress: progress.final() });
      }
      this.logger.info({ jobId, stage: stage.name }, 'stage completed');
      return { kind: 'completed', result, next };
    } catch (thrown) {
      await progress.flush();
      const error = thrown instanceof Error ? thrown : new Error(String(thrown));
      if (signal.aborted && signal.reason === ABORT_SHUTDOWN) {
        await log(`${stage.name}: interrupted by a worker shutdown; queued to start over`);
        await this.store.update(jobId, { state: 'queued' });
        return { kind: 'interrupted' };
      }
      if (signal.aborted) {
        await log(`${stage.name}: cancelled; partial output removed`);
        await this.store.update(jobId, { state: 'cancelled', finishedAt: workEnded });
        return { kind: 'cancelled' };
      }
      const failure = this.describe(error);
      if (!isPermanent(error) && attempt.attempt < attempt.maxAttempts) {
        await this.store.update(jobId, { state: 'queued', error: failure });
        await log(`${stage.name}: attempt ${attempt.attempt} failed (${failure.message}); will retry`);
        this.logger.warn({ jobId, stage: stage.name, err: error }, 'stage failed, will retry');
        return { kind: 'retry', error };
      }
      await log(`${stage.name}: failed: ${failure.message}`);
      await this.store.update(jobId, { state: 'failed', finishedAt: workEnded, error: failure });
      this.logger.warn({ jobId, stage: stage.name, err: error }, 'job failed');
      return { kind: 'failed', error };
    }
  }

  /** The error as the API shows it; paths are shown relative to the data dir, as the client gave them. */
  describe(err: Error): JobFailure {
    const type = err instanceof FerryError ? err.code : ((err as NodeJS.ErrnoException).code ?? err.name);
    return { type, message: errorMessage(err).split(this.dataDir + '/').join('') };
  }
}

/** Throttles progress to the store, keeping writes in order, so a stream of updates never floods it. */
class ProgressReporter {
  private latest: JobProgress = { done: 0, total: 0 };
  private lastSent = 0;
  private pending: Promise<unknown> = Promise.resolve();

  constructor(private readonly send: (p: JobProgress) => Promise<unknown>) {}

  report(p: JobProgress): void {
    this.latest = p;
    const now = Date.now();
    if (now - this.lastSent < PROGRESS_INTERVAL_MS) return;
    this.lastSent = now;
    this.pending = this.pending.then(() => this.send(p)).catch(() => undefined);
  }

  /** Waits for updates in flight, so none lands after the record's final state. */
  flush(): Promise<unknown> {
    return this.pending;
  }

  final(): JobProgress {
    return this.latest;
  }
}
