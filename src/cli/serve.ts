import { resolve } from 'node:path';
import type { Command } from 'commander';
import { parseCount } from './common.js';

/** The data dir when neither --data-dir nor FERRY_DATA_DIR says: beside where the service is started. */
export function dataDirOption(value: string | undefined): string {
  return resolve(value ?? process.env.FERRY_DATA_DIR ?? 'ferry-data');
}

export function registerServe(program: Command): void {
  program
    .command('serve')
    .summary('run the job service: HTTP API, dashboard, and (without Redis) the jobs themselves')
    .description(
      'Serves the jobs API under /v1 (bearer token), the dashboard at /, OpenAPI at /openapi.json (docs at ' +
        '/docs), Prometheus metrics at /metrics and /healthz. With REDIS_URL, jobs go to BullMQ queues run ' +
        'by `ferry worker` processes (and --workers in this one); without it, an embedded queue runs them ' +
        'here. Job paths are relative to the data dir.',
    )
    .option('--host <host>', 'address to listen on', '127.0.0.1')
    .option('--port <port>', 'port to listen on (0 picks a free one)', '8080')
    .option('--data-dir <dir>', 'where job files, job records and the token live (default $FERRY_DATA_DIR or ./ferry-data)')
    .option('--workers <n>', 'jobs run in this process at a time (default: 1 without Redis, 0 with it)')
    .option('--stall-timeout <seconds>', 'with Redis: a worker silent this long is presumed dead and its job re-run', '30')
    .option('--grace <seconds>', 'on SIGTERM, how long running jobs may finish before they are re-queued', '30')
    .action(async (o) => {
      const redisUrl = process.env.REDIS_URL || undefined;
      const options = {
        host: o.host as string,
        port: parseCount(o.port, '--port', 0, 65535),
        dataDir: dataDirOption(o.dataDir),
        redisUrl,
        // Without Redis nothing else runs jobs, so at least one slot.
        workers: parseCount(o.workers ?? (redisUrl ? '0' : '1'), '--workers', redisUrl ? 0 : 1, 64),
        stallTimeoutMs: parseCount(o.stallTimeout, '--stall-timeout', 1, 3600) * 1000,
        graceMs: parseCount(o.grace, '--grace', 0, 24 * 3600) * 1000,
      };
      // Loaded here, not at the top: the disk commands should not pay for the web stack.
      const { runService } = await import('../api/main.js');
      await runService(options);
    });
}
