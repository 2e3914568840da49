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

/** A job type whose stage runs until the test lets it end (or the job is aborted), counting overlaps. */
function gatedHandler(): RunnableJobHandler & { started: string[]; mostAtOnce: number; finish(jobId: string): void } {
  const gates = new Map<string, () => void>();
  let running = 0;
  const handler = {
    type: 'gated',
    summary: 'test',
    schema: Type.Object({ type: Type.Literal('gated') }),
    started: [] as string[],
    mostAtOnce: 0,
    finish: (jobId: string) => gates.get(jobId)!(),
    async check() {},
    stages: [
      {
        name: 'work',
        outputs: () => [],
        run: async ({ spec, signal }: { spec: { id?: string }; signal: AbortSignal }) => {
          const id = spec.id!;
          handler.started.push(id);
          handler.mostAtOnce = Math.max(handler.mostAtOnce, ++running);
          try {
            await new Promise<void>((resolve, reject) => {
              gates.set(id, resolve);
              signal.addEventListener('abort', () => reject(new Error('aborted')), { once: true });
            });
          } finally {
            running--;
          }
          return { id };
        },
      },
    ],
  };
  return handler as unknown as RunnableJobHandler & { started: string[]; mostAtOnce: number; finish(jobId: string): void };
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
    store = await FileJobStore.open(join(dir, 'jobs'), logger);
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
      store = await FileJobStore.open(join(dir, `jobs-${error.name}-${(error as { code?: string }).code}`), logger);
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
    store = await FileJobStore.open(join(dir, 'jobs'), logger);
    expect(await store.get('kept')).toMatchObject({ state: 'cancelled', progress: { done: 1, total: 2 } });
    expect((await store.findByIdempotencyKey('k'))?.record.id).toBe('kept');
  });

  test('one slot: the next job waits prepared and starts when the running work ends; a shutdown gives it back', async () => {
    const handler = gatedHandler();
    const queue = await EmbeddedQueue.open(store, new StageRunner(store, dir, logger, () => handler), logger);
    const changes: JobRecord[] = [];
    store.subscribe((r) => changes.push(r));
    const until = (test: () => boolean) =>
      new Promise<void>((resolve) => {
        const check = () => (test() ? resolve() : setImmediate(check));
        check();
      });
    for (const id of ['a', 'b', 'c']) await queue.enqueue((await store.create(newJobRecord(id, { type: 'gated', id }))).record);
    await queue.startWorker(1);
    await until(() => handler.started.length === 1);
    handler.finish('a');
    // b starts as a's work ends, while a's record may still be on its way to 'completed'.
    await until(() => handler.started.length === 2 && changes.some((r) => r.id === 'a' && r.state === 'completed'));
    expect(handler.started).toEqual(['a', 'b']);
    expect(handler.mostAtOnce).toBe(1);
    const a = (await store.get('a'))!;
    const b = (await store.get('b'))!;
    expect(a.state).toBe('completed');
    expect(Date.parse(b.startedAt!)).toBeGreaterThanOrEqual(Date.parse(a.finishedAt!));
    // c is the job prepared ahead; b holds the slot until the grace period ends.
    await queue.close(50);
    expect(handler.started).toEqual(['a', 'b']);
    expect((await store.get('b'))!.state).toBe('queued');
    expect((await store.get('c'))!).toMatchObject({ state: 'queued', attempts: 0, startedAt: null });
    expect(changes.filter((r) => r.id === 'c')).toEqual([expect.objectContaining({ state: 'queued' })]);
  });
});
