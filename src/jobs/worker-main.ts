import { InvalidOptionError } from '../errors.js';
import { createLogger } from '../log.js';
import { openJobBackend } from './backend.js';
import { runnableStageNames } from './registry.js';
import { untilSignal } from './signals.js';

export interface WorkerOptions {
  redisUrl: string;
  dataDir: string;
  concurrency: number;
  stallTimeoutMs: number;
  graceMs: number;
  /** Stage queues to serve, e.g. only convert on machines beside the storage; default all. */
  stages?: string[];
}

/** `ferry worker`: runs queued jobs until SIGTERM/SIGINT, then lets running ones finish or re-queues them. */
export async function runWorker(opts: WorkerOptions): Promise<void> {
  const known = runnableStageNames();
  const unknown = opts.stages?.filter((s) => !known.includes(s)) ?? [];
  if (unknown.length) throw new InvalidOptionError(`--stages: this build runs ${known.join(', ')}, not ${unknown.join(', ')}`, { field: 'stages' });
  const logger = createLogger('worker', 'info');
  const backend = await openJobBackend({ dataDir: opts.dataDir, redisUrl: opts.redisUrl, logger, watch: false, stallTimeoutMs: opts.stallTimeoutMs, stages: opts.stages });
  await backend.queue.startWorker(opts.concurrency);
  logger.info({ concurrency: opts.concurrency, dataDir: opts.dataDir, stages: opts.stages ?? known }, 'worker ready');
  await untilSignal();
  logger.info('shutting down: running jobs get the grace period, then go back to the queue');
  await backend.close(opts.graceMs);
}
