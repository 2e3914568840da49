import type { Command } from 'commander';
import { InvalidOptionError } from '../errors.js';
import { parseCount } from './common.js';
import { dataDirOption } from './serve.js';

export function registerWorker(program: Command): void {
  program
    .command('worker')
    .summary('run queued jobs from Redis (REDIS_URL), beside any number of other workers')
    .description(
      'Takes jobs from the BullMQ queues in REDIS_URL and runs them. The data dir must be the one `ferry ' +
        'serve` uses (shared storage when on another machine). SIGTERM lets running jobs finish for --grace ' +
        'seconds, then re-queues them; a worker killed outright is detected after --stall-timeout and its ' +
        'job runs elsewhere.',
    )
    .option('--concurrency <n>', 'jobs run at a time', '1')
    .option('--data-dir <dir>', 'the service data dir (default $FERRY_DATA_DIR or ./ferry-data)')
    .option('--stall-timeout <seconds>', 'a worker silent this long is presumed dead and its job re-run (use one value everywhere)', '30')
    .option('--stages <names>', 'comma-separated stage queues to take jobs from (default: every stage this build runs)')
    .option('--grace <seconds>', 'on SIGTERM, how long running jobs may finish before they are re-queued', '30')
    .action(async (o) => {
      const redisUrl = process.env.REDIS_URL;
      if (!redisUrl) throw new InvalidOptionError('ferry worker needs REDIS_URL (the shared queue); without Redis, `ferry serve` runs the jobs itself', { field: 'REDIS_URL' });
      const options = {
        redisUrl,
        dataDir: dataDirOption(o.dataDir),
        concurrency: parseCount(o.concurrency, '--concurrency', 1, 64),
        stallTimeoutMs: parseCount(o.stallTimeout, '--stall-timeout', 1, 3600) * 1000,
        graceMs: parseCount(o.grace, '--grace', 0, 24 * 3600) * 1000,
        stages: o.stages === undefined ? undefined : String(o.stages).split(',').map((s) => s.trim()).filter(Boolean),
      };
      const { runWorker } = await import('../jobs/worker-main.js');
      await runWorker(options);
    });
}
