import { join } from 'node:path';
import type { Logger } from 'pino';
import { BullmqQueue } from './bullmq-queue.js';
import { EmbeddedQueue } from './embedded-queue.js';
import { FileJobStore } from './file-store.js';
import { STATE_DIR } from './paths.js';
import type { JobQueue } from './queue.js';
import { RedisJobStore } from './redis-store.js';
import { StageRunner } from './runner.js';
import type { JobStore } from './store.js';

export interface JobBackend {
  mode: 'embedded' | 'redis';
  store: JobStore;
  queue: JobQueue;
  /** Stops the queue (running jobs get `graceMs` to finish, then are re-queued) and the store. */
  close(graceMs: number): Promise<void>;
}

export interface BackendOptions {
  dataDir: string;
  /** REDIS_URL: BullMQ queues and records in Redis. Without it, everything stays in this process and the data dir. */
  redisUrl?: string;
  logger: Logger;
  /** The API watches every job change (events streams, metrics); a worker only writes. */
  watch: boolean;
  stallTimeoutMs?: number;
  /** With Redis: the stage queues this process takes jobs from (default all it can run). */
  stages?: string[];
}

export async function openJobBackend(opts: BackendOptions): Promise<JobBackend> {
  let store: JobStore;
  let queue: JobQueue;
  if (opts.redisUrl) {
    store = await RedisJobStore.connect(opts.redisUrl, { watch: opts.watch });
    const runner = new StageRunner(store, opts.dataDir, opts.logger);
    queue = await BullmqQueue.open({ url: opts.redisUrl, store, runner, logger: opts.logger, stallTimeoutMs: opts.stallTimeoutMs, stages: opts.stages });
  } else {
    store = await FileJobStore.open(join(opts.dataDir, STATE_DIR, 'jobs'), opts.logger);
    queue = await EmbeddedQueue.open(store, new StageRunner(store, opts.dataDir, opts.logger), opts.logger);
  }
  return {
    mode: opts.redisUrl ? 'redis' : 'embedded',
    store,
    queue,
    async close(graceMs) {
      await queue.close(graceMs);
      await store.close();
    },
  };
}
