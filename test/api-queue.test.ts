import { join } from 'node:path';
import { pino } from 'pino';
import { Type } from 'typebox';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { CorruptImageError } from '../src/errors.js';
import { EmbeddedQueue } from '../src/jobs/embedded-queue.js';
import { FileJobStore } from '../src/jobs/file-store.js';
import type { RunnableJobHandler } from '../src/jobs/handler.js';
import { newJobRecord, type JobRecord } from '../src/jobs/model.js';
import { StageRunner } from '../src/jobs/runner.js';
import { tempDir } from './helpers/env.js';

/** A job type whose one stage fails the way it is told to, a given number of times, then succeeds. */
function scriptedHandler(failures: Error[]): RunnableJobHandler & { calls: number } {
  const handler = {
    type: 'scripted',
    summary: 'test',
    schema: Type.Object({ type: Type.Literal('scripted') }),
    calls: 0,
    async check() {},
    stages: [
      {
        name: 'work',
        outputs: () => [],
        run: async () => {
          const failure = failures[handler.calls++];
          if (failure) throw failure;
          return { ok: true };
        },
      },
    ],
  };
  return handler;
}

function systemError(code: string): Error {
  return Object.assign(new Error(`${code}: simulated`), { code });
}

describe('embedded queue: retries and failures', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let store: FileJobStore;
  const logger = pino({ level: 'silent' });

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir('ferry-queue-'));
    store = await FileJobStore.open(join(dir, 'jobs'));
  });
  afterEach(async () => {
    await store.close();
    await cleanup();
  });

  async function runToEnd(handler: RunnableJobHandler): Promise<JobRecord> {
    const queue = await EmbeddedQueue.open(store, new StageRunner(store, dir, logger, () => handler), logger, { attempts: 3, backoffMs: 10 });
    const { record } = await store.create(newJobRecord('job-1', { type: 'scripted' }));
    const finished = new Promise<JobRecord>((resolve) => store.subscribe((r) => ['completed', 'failed', 'cancelled'].includes(r.state) && resolve(r)));
    await queue.startWorker(1);
    await queue.enqueue(record);
    const result = await finished;
    await queue.close(1000);
    return result;
  }

  test('transient errors are retried with backoff until an attempt succeeds', async () => {
    const handler = scriptedHandler([systemError('EIO'), systemError('ECONNRESET')]);
    const job = await runToEnd(handler);
    expect(job).toMatchObject({ state: 'completed', attempts: 3, result: { ok: true } });
    expect(handler.calls).toBe(3);
    const log = await store.readLog('job-1');
    expect(log.match(/will retry/g)).toHaveLength(2);
  });

  test('a transient error on every attempt fails the job after the last one', async () => {
    const handler = scriptedHandler([systemError('EIO'), systemError('EIO'), systemError('EIO')]);
    const job = await runToEnd(handler);
    expect(job).toMatchObject({ state: 'failed', attempts: 3, error: { type: 'EIO' } });
    expect(handler.calls).toBe(3);
  });

  test('a corrupt image or a missing file fails at once', async () => {
    for (const error of [new CorruptImageError('l1_size is out of range', { file: join(dir, 'disk.qcow2') }), systemError('ENOENT')]) {
      await store.close();
      store = await FileJobStore.open(join(dir, `jobs-${error.name}-${(error as { code?: string }).code}`));
      const handler = scriptedHandler([error]);
      const job = await runToEnd(handler);
      expect(job.state).toBe('failed');
      expect(job.attempts).toBe(1);
      expect(handler.calls).toBe(1);
    }
  });

  test('records survive reopening the store; a finished record refuses further changes', async () => {
    const { record } = await store.create(newJobRecord('kept', { type: 'scripted' }), { key: 'k', fingerprint: 'f' });
    await store.update(record.id, { state: 'running', progress: { done: 1, total: 2 } });
    await store.update(record.id, { state: 'cancelled' });
    expect(await store.update(record.id, { state: 'completed' })).toBeUndefined();
    await store.close();
    store = await FileJobStore.open(join(dir, 'jobs'));
    expect(await store.get('kept')).toMatchObject({ state: 'cancelled', progress: { done: 1, total: 2 } });
    expect((await store.findByIdempotencyKey('k'))?.record.id).toBe('kept');
  });
});
