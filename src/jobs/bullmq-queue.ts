import { FlowProducer, Queue, QueueEvents, UnrecoverableError, WaitingError, Worker, type FlowJob, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { isTerminal, type JobRecord } from './model.js';
import { DEFAULT_RETRY, type JobQueue, type RetryPolicy } from './queue.js';
import { runnableHandler, runnableStageNames } from './registry.js';
import { ABORT_CANCEL, ABORT_SHUTDOWN, plannedStages } from './handler.js';
import type { StageRunner } from './runner.js';
import { StageSlots } from './stage-slots.js';
import { logLine, type JobStore } from './store.js';

/** Cancellation reaches the worker running a job through this channel: only it holds the AbortController. */
const CANCEL_CHANNEL = 'ferry:job-cancel';
/** Finished BullMQ entries are kept this long for inspection; the job records themselves are kept for good. */
const KEEP_COMPLETED_S = 24 * 3600;
const KEEP_FAILED_S = 7 * 24 * 3600;

/** What each BullMQ job carries: which stage of which job record. */
interface StageJobData {
  jobId: string;
  type: string;
  stageIndex: number;
}

export interface BullmqQueueOptions {
  url: string;
  store: JobStore;
  runner: StageRunner;
  logger: Logger;
  retry?: RetryPolicy;
  /**
   * A worker that stops renewing its lock this long (killed, hung, cut off) is presumed dead and its job
   * runs again elsewhere. BullMQ's lock duration and stalled-check interval both.
   */
  stallTimeoutMs?: number;
  /** The stage queues this process's workers take jobs from; default every stage this build can run. */
  stages?: string[];
}

/** One BullMQ queue per stage name, so machines can specialise (capture near the sources, convert near the storage). */
export const stageQueueName = (stage: string) => `ferry-${stage}`;
const stageJobId = (jobId: string, stage: string) => `${jobId}.${stage}`;

/**
 * Jobs on BullMQ over a shared Redis: any number of worker processes on any machine. A job is a flow,
 * one BullMQ job per stage, each the child of the next (P2V: capture → inject drivers), so a stage runs on
 * whichever worker is free once the previous one finished, and a failure fails the chain. BullMQ gives the
 * rest: retries with exponential backoff, and stalled-job detection when a worker dies mid-job.
 */
export class BullmqQueue implements JobQueue {
  private readonly queues = new Map<string, Queue>();
  private readonly flow: FlowProducer;
  private readonly publisher: Redis;
  private readonly workers: Worker[] = [];
  private readonly slots: StageSlots[] = [];
  private readonly failures: QueueEvents[] = [];
  private cancelSubscriber?: Redis;
  private readonly retry: RetryPolicy;
  private readonly stallTimeoutMs: number;

  private constructor(private readonly opts: BullmqQueueOptions) {
    const connection = { url: opts.url, maxRetriesPerRequest: null };
    this.flow = new FlowProducer({ connection });
    for (const stage of runnableStageNames()) this.queues.set(stage, new Queue(stageQueueName(stage), { connection }));
    this.publisher = new Redis(opts.url, { maxRetriesPerRequest: null });
    this.retry = opts.retry ?? DEFAULT_RETRY;
    this.stallTimeoutMs = opts.stallTimeoutMs ?? 30_000;
  }

  /**
   * Connects, and re-queues any unfinished record that has no BullMQ job (the API stopped between
   * recording a job and queueing it), so no accepted job is forgotten.
   */
  static async open(opts: BullmqQueueOptions): Promise<BullmqQueue> {
    const queue = new BullmqQueue(opts);
    for (const record of await opts.store.unfinished()) {
      const handler = runnableHandler(record.type);
      const lastStage = handler.stages[plannedStages(handler, record.spec).at(-1)!].name;
      if (!(await queue.queues.get(lastStage)!.getJob(stageJobId(record.id, lastStage)))) {
        opts.logger.warn({ jobId: record.id }, 'unfinished job had no queue entry; queueing it again');
        await queue.enqueue(record);
      }
    }
    return queue;
  }

  async enqueue(record: JobRecord): Promise<void> {
    const handler = runnableHandler(record.type);
    // The last stage is the root of the flow; each stage's child is the stage before it.
    let node: FlowJob | undefined;
    for (const stageIndex of plannedStages(handler, record.spec)) {
      const stage = handler.stages[stageIndex];
      const data: StageJobData = { jobId: record.id, type: record.type, stageIndex };
      node = {
        name: stage.name,
        queueName: stageQueueName(stage.name),
        data,
        opts: {
          jobId: stageJobId(record.id, stage.name),
          attempts: this.retry.attempts,
          backoff: { type: 'exponential', delay: this.retry.backoffMs },
          failParentOnFailure: true,
          removeOnComplete: { age: KEEP_COMPLETED_S },
          removeOnFail: { age: KEEP_FAILED_S },
        },
        children: node ? [node] : undefined,
      };
    }
    await this.flow.add(node!);
  }

  async cancel(id: string): Promise<void> {
    const record = await this.opts.store.get(id);
    if (!record) return;
    for (const stage of runnableHandler(record.type).stages) {
      const job = await this.queues.get(stage.name)!.getJob(stageJobId(id, stage.name));
      // A waiting stage is dropped; an active one is locked and refuses removal, and is aborted below instead.
      await job?.remove({ removeChildren: true }).catch(() => undefined);
    }
    await this.publisher.publish(CANCEL_CHANNEL, id);
  }

  /** Takes jobs from each stage queue served here, `concurrency` at a time per queue. */
  async startWorker(concurrency: number): Promise<void> {
    const connection = { url: this.opts.url, maxRetriesPerRequest: null };
    const stages = this.opts.stages ?? runnableStageNames();
    for (const stage of stages) {
      const slots = new StageSlots(concurrency);
      this.slots.push(slots);
      // One job more than the slots: BullMQ fetches the next job while the slots are busy (StageSlots).
      const worker = new Worker<StageJobData>(stageQueueName(stage), (job, token, signal) => this.process(job, token, signal, slots), {
        connection,
        concurrency: concurrency + 1,
        lockDuration: this.stallTimeoutMs,
        stalledInterval: this.stallTimeoutMs,
        maxStalledCount: 1,
      });
      worker.on('error', (err) => this.opts.logger.error({ err, stage }, 'worker error'));
      worker.on('stalled', (bullJobId) => this.opts.logger.warn({ bullJobId, stage }, 'stalled job re-queued: its worker stopped renewing its lock'));
      this.workers.push(worker);
      // A job failed by BullMQ itself (stalled too often) never reaches the runner; its record is closed here.
      const events = new QueueEvents(stageQueueName(stage), { connection });
      events.on('failed', ({ jobId, failedReason }) => void this.recordFailure(jobId, failedReason));
      this.failures.push(events);
    }
    this.cancelSubscriber = new Redis(this.opts.url, { maxRetriesPerRequest: null });
    await this.cancelSubscriber.subscribe(CANCEL_CHANNEL);
    this.cancelSubscriber.on('message', (_channel: string, id: string) => {
      for (const [i, worker] of this.workers.entries()) worker.cancelJob(stageJobId(id, stages[i]), ABORT_CANCEL);
    });
  }

  async close(graceMs: number): Promise<void> {
    // Jobs fetched but not started go back to their queue at once.
    for (const slots of this.slots) slots.close();
    const closing = Promise.all(this.workers.map((w) => w.close()));
    let timer: NodeJS.Timeout | undefined;
    const graceOver = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), graceMs)));
    if ((await Promise.race([closing, graceOver])) === 'timeout') {
      // Running stages stop and go back to the queue, without using up an attempt.
      for (const w of this.workers) w.cancelAllJobs(ABORT_SHUTDOWN);
      await closing;
    }
    clearTimeout(timer);
    await Promise.all([...this.failures.map((e) => e.close()), ...[...this.queues.values()].map((q) => q.close()), this.flow.close()]);
    await Promise.all([this.publisher.quit(), this.cancelSubscriber?.quit()]);
  }

  private async process(job: Job<StageJobData>, token: string | undefined, signal: AbortSignal | undefined, slots: StageSlots): Promise<unknown> {
    const { jobId, stageIndex } = job.data;
    const previous = stageIndex > 0 ? Object.values(await job.getChildrenValues())[0] : undefined;
    const outcome = await this.opts.runner.run({
      jobId,
      stageIndex,
      attempt: job.attemptsMade + 1,
      maxAttempts: this.retry.attempts,
      signal: signal ?? new AbortController().signal,
      previous,
      slots,
    });
    switch (outcome.kind) {
      case 'completed':
        return outcome.result ?? null;
      case 'retry':
        throw outcome.error;
      case 'failed':
        throw new UnrecoverableError(outcome.error.message);
      case 'interrupted':
      case 'returned':
        await job.moveToWait(token);
        throw new WaitingError();
      case 'cancelled':
      case 'skipped':
        return null;
    }
  }

  private async recordFailure(bullJobId: string, reason: string): Promise<void> {
    const jobId = bullJobId.slice(0, bullJobId.lastIndexOf('.'));
    const record = await this.opts.store.get(jobId);
    if (!record || isTerminal(record.state)) return;
    const failed = await this.opts.store.update(jobId, { state: 'failed', finishedAt: new Date().toISOString(), error: { type: 'QUEUE_FAILURE', message: reason } });
    if (failed) await this.opts.store.appendLog(jobId, logLine(`failed by the queue: ${reason}`));
  }
}
