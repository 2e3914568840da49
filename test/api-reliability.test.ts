import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { imagesIdentical, tempDir } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';
import { startRedis, type RedisServer } from './helpers/redis.js';
import { isFinished, startService, startWorker, submitConvert, temporaryFiles, watchJob, writeRandomFile, type FerryProcess, type JobView, type Service } from './helpers/service.js';

const MiB = 1024 * 1024;
/** Short, so a killed worker's job is taken over within seconds; every process uses the same value. */
const FAST_FAILOVER = ['--stall-timeout', '2', '--grace', '0'];

const pidOf = (job: JobView) => Number(job.worker?.split(':').pop());
const runningWithProgress = (job: JobView) => job.state === 'running' && job.progress.done > 0;

describe('reliability with Redis: two workers, one of them lost mid-job', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let redis: RedisServer;
  let service: Service;
  const workers: FerryProcess[] = [];

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir('ferry-reliability-'));
    await writeRandomFile(join(dir, 'random.raw'), 128 * MiB);
    redis = await startRedis();
    service = await startService(dir, { redisUrl: redis.url, args: FAST_FAILOVER });
    workers.push(await startWorker(dir, redis.url, FAST_FAILOVER), await startWorker(dir, redis.url, FAST_FAILOVER));
  });

  afterAll(async () => {
    for (const w of workers) await w.stop();
    await service?.stop();
    await redis?.stop();
    await cleanup();
  });

  test('a worker killed with SIGKILL: the job is detected as stalled and completes correctly on the other', async () => {
    const id = await submitConvert(service, 'random.raw', 'killed.qcow2', 'qcow2', { compress: true });
    const running = (await watchJob(service, id, runningWithProgress)).pop()!;
    const victim = workers.find((w) => w.pid === pidOf(running))!;
    expect(victim).toBeDefined();
    await victim.stop('SIGKILL');
    // What the killed worker leaves: a half-written temporary file beside the target.
    expect(await temporaryFiles(dir)).toHaveLength(1);

    const finished = (await watchJob(service, id, isFinished)).pop()!;
    expect(finished.state).toBe('completed');
    expect(finished.attempts).toBeGreaterThanOrEqual(2);
    expect(pidOf(finished)).not.toBe(victim.pid);
    expect(await temporaryFiles(dir)).toEqual([]);
    expect(await imagesIdentical(join(dir, 'random.raw'), join(dir, 'killed.qcow2'))).toBe(true);
    const log = await (await service.request(`/v1/jobs/${id}/log`)).text();
    expect(log).toMatch(/did not finish \(worker stopped or lost\)/);
    expect(log).toMatch(/removed partial output left by an interrupted attempt: \.killed\.qcow2\.ferry-[0-9a-f]{8}\.tmp/);
    workers.splice(workers.indexOf(victim), 1);
  });

  test('a worker stopped with SIGTERM re-queues its job, exits cleanly, and another worker completes it', async () => {
    workers.push(await startWorker(dir, redis.url, FAST_FAILOVER));
    const id = await submitConvert(service, 'random.raw', 'stopped.qcow2', 'qcow2', { compress: true });
    const running = (await watchJob(service, id, runningWithProgress)).pop()!;
    const stopped = workers.find((w) => w.pid === pidOf(running))!;
    expect(await stopped.stop('SIGTERM')).toBe(0);
    workers.splice(workers.indexOf(stopped), 1);

    const finished = (await watchJob(service, id, isFinished)).pop()!;
    expect(finished.state).toBe('completed');
    expect(pidOf(finished)).toBe(workers[0].pid);
    expect(await temporaryFiles(dir)).toEqual([]);
    expect(await imagesIdentical(join(dir, 'random.raw'), join(dir, 'stopped.qcow2'))).toBe(true);
    expect(await (await service.request(`/v1/jobs/${id}/log`)).text()).toMatch(/interrupted by a worker shutdown; queued to start over/);
  });

  test('no job record is lost when serve restarts; jobs keep running on the workers meanwhile', async () => {
    const id = await submitConvert(service, 'random.raw', 'during-restart.raw', 'raw');
    await service.stop('SIGKILL');
    service = await startService(dir, { redisUrl: redis.url, args: FAST_FAILOVER });
    const finished = (await watchJob(service, id, isFinished)).pop()!;
    expect(finished.state).toBe('completed');
    const all = await (await service.request('/v1/jobs?limit=500')).json();
    expect(all.total).toBe(3);
    expect(all.jobs.every((j: JobView) => j.state === 'completed')).toBe(true);
  });
});

describe('reliability without Redis: serve stopped mid-job', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let service: Service | undefined;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir('ferry-restart-'));
    await writeRandomFile(join(dir, 'random.raw'), 128 * MiB);
    await makePatternedRaw(dir, 'small.raw', '64M');
  });

  afterAll(async () => {
    await service?.stop();
    await cleanup();
  });

  test('killed with SIGKILL: after a restart the running job starts over cleanly and the queued one runs', async () => {
    service = await startService(dir);
    const slow = await submitConvert(service, 'random.raw', 'slow.qcow2', 'qcow2', { compress: true });
    const queued = await submitConvert(service, 'small.raw', 'queued.qcow2', 'qcow2');
    await watchJob(service, slow, runningWithProgress);
    await service.stop('SIGKILL');
    expect(await temporaryFiles(dir)).toHaveLength(1);

    service = await startService(dir);
    for (const id of [slow, queued]) expect((await watchJob(service, id, isFinished)).pop()!.state).toBe('completed');
    expect(await temporaryFiles(dir)).toEqual([]);
    expect(await imagesIdentical(join(dir, 'random.raw'), join(dir, 'slow.qcow2'))).toBe(true);
    expect(await imagesIdentical(join(dir, 'small.raw'), join(dir, 'queued.qcow2'))).toBe(true);
    const job = await (await service.request(`/v1/jobs/${slow}`)).json();
    expect(job.attempts).toBe(2);
    const log = await (await service.request(`/v1/jobs/${slow}/log`)).text();
    expect(log).toMatch(/did not finish[\s\S]*removed partial output[\s\S]*completed/);
  });

  test('stopped with SIGTERM and no grace: the running job is re-queued and completes after the restart', async () => {
    await service!.stop();
    service = await startService(dir, { args: ['--grace', '0'] });
    const id = await submitConvert(service, 'random.raw', 'graceful.qcow2', 'qcow2', { compress: true });
    await watchJob(service, id, runningWithProgress);
    expect(await service.stop('SIGTERM')).toBe(0);
    expect(await temporaryFiles(dir)).toEqual([]);

    service = await startService(dir);
    expect((await (await service.request(`/v1/jobs/${id}`)).json()).state).not.toBe('failed');
    expect((await watchJob(service, id, isFinished)).pop()!.state).toBe('completed');
    expect(await imagesIdentical(join(dir, 'random.raw'), join(dir, 'graceful.qcow2'))).toBe(true);
    expect(await (await service.request(`/v1/jobs/${id}/log`)).text()).toMatch(/interrupted by a worker shutdown/);
    // Every job of both runs is still listed.
    expect((await (await service.request('/v1/jobs')).json()).total).toBe(3);
  });
});
