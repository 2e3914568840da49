import { mkdir } from 'node:fs/promises';
import { openJobBackend } from '../jobs/backend.js';
import { CredentialVault } from '../jobs/credentials.js';
import { JobService } from '../jobs/service.js';
import { createLogger } from '../log.js';
import { untilSignal } from '../jobs/signals.js';
import { loadApiToken } from './auth.js';
import { buildServer } from './server.js';

export interface ServiceOptions {
  host: string;
  port: number;
  dataDir: string;
  redisUrl?: string;
  /** Job slots in this process (BullMQ worker concurrency, or the embedded queue's). */
  workers: number;
  stallTimeoutMs: number;
  graceMs: number;
}

/** `ferry serve`: runs until SIGTERM/SIGINT, then stops taking requests and lets running jobs finish. */
export async function runService(opts: ServiceOptions): Promise<void> {
  await mkdir(opts.dataDir, { recursive: true });
  const logger = createLogger('serve', 'info');
  const token = await loadApiToken(opts.dataDir);
  const backend = await openJobBackend({ dataDir: opts.dataDir, redisUrl: opts.redisUrl, logger, watch: true, stallTimeoutMs: opts.stallTimeoutMs });
  const service = new JobService(backend.store, backend.queue, opts.dataDir);
  const app = await buildServer({ service, vault: await CredentialVault.open(opts.dataDir), token: token.token, queueMode: backend.mode, logger });
  const address = await app.listen({ host: opts.host, port: opts.port });
  if (opts.workers > 0) await backend.queue.startWorker(opts.workers);
  process.stdout.write(
    `ferry serve: listening on ${address} (data dir ${opts.dataDir}, ${backend.mode} queue, ${opts.workers} job slots in this process)\n` +
      `ferry serve: API token ${token.source === 'FERRY_API_TOKEN' ? 'from FERRY_API_TOKEN' : `in ${token.source}`}\n`,
  );
  await untilSignal();
  logger.info('shutting down: no new requests; running jobs get the grace period');
  // The grace period starts now, not after the last HTTP connection (an events stream, say) has closed.
  await Promise.all([app.close(), backend.queue.close(opts.graceMs)]);
  await backend.store.close();
}
