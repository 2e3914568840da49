import { readdir, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { imagesIdentical, qemuImg, qemuIo, tempDir } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';
import { startRedis, type RedisServer } from './helpers/redis.js';
import { isFinished, startService, startWorker, submitConvert, temporaryFiles, watchJob, writeRandomFile, type FerryProcess, type JobView, type Service } from './helpers/service.js';

const MiB = 1024 * 1024;

async function problemOf(res: Response): Promise<{ type: string; title: string; status: number; detail: string; field?: string }> {
  expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  const body = await res.json();
  expect(body).toMatchObject({ type: expect.stringMatching(/^urn:ferry:problem:/), title: expect.any(String), status: res.status, detail: expect.any(String) });
  return body;
}

/** Waits for a condition the service reaches asynchronously (cancellation crossing processes, say). */
async function eventually<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// The same API tests in both modes: an embedded queue in `serve`, and Redis with two `ferry worker` processes.
for (const mode of ['embedded', 'redis'] as const) {
  describe(`jobs API (${mode} queue)`, () => {
    let dir: string;
    let cleanup: () => Promise<void>;
    let service: Service;
    let redis: RedisServer | undefined;
    const workers: FerryProcess[] = [];

    beforeAll(async () => {
      ({ dir, cleanup } = await tempDir('ferry-api-'));
      await makePatternedRaw(dir, 'small.raw', '64M');
      // Incompressible, converted with compression: slow enough to cancel mid-way.
      await writeRandomFile(join(dir, 'random.raw'), 128 * MiB);
      // A qcow2 whose L1 table lies past the end of the file.
      await qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'bad.qcow2'), '64M');
      await qemuIo(join(dir, 'bad.qcow2'), 'qcow2', 'write -P 1 0 1M');
      const bad = await readFile(join(dir, 'bad.qcow2'));
      bad.writeBigUInt64BE(1n << 36n, 40);
      await writeFile(join(dir, 'bad.qcow2'), bad);
      if (mode === 'redis') {
        redis = await startRedis();
        service = await startService(dir, { redisUrl: redis.url });
        workers.push(await startWorker(dir, redis.url), await startWorker(dir, redis.url));
      } else {
        service = await startService(dir);
      }
    });

    afterAll(async () => {
      for (const w of workers) await w.stop();
      await service?.stop();
      await redis?.stop();
      await cleanup();
    });

    test('refuses /v1 requests without a valid bearer token; health, metrics and docs are open', async () => {
      const missing = await service.request('/v1/jobs', { headers: { authorization: '' } });
      expect(missing.status).toBe(401);
      expect(missing.headers.get('www-authenticate')).toBe('Bearer');
      expect((await problemOf(missing)).detail).toMatch(/Authorization: Bearer/);
      const wrong = await service.request('/v1/jobs', { method: 'POST', headers: { authorization: 'Bearer not-the-token' }, json: {} });
      expect(wrong.status).toBe(401);
      expect((await problemOf(wrong)).detail).toMatch(/not valid/);
      expect((await service.request('/v1/credentials', { headers: { authorization: 'Basic abc' } })).status).toBe(401);
      expect(await (await fetch(`${service.baseUrl}/healthz`)).json()).toEqual({ status: 'ok', queue: mode });
      expect((await fetch(`${service.baseUrl}/metrics`)).status).toBe(200);
      expect((await fetch(`${service.baseUrl}/docs`)).status).toBeLessThan(400);
    });

    test('runs a conversion, streaming its state and progress to completion, with a correct output', async () => {
      const id = await submitConvert(service, 'small.raw', 'out.qcow2', 'qcow2', { options: { cluster_size: '128k' } });
      const events = await watchJob(service, id, isFinished);
      const last = events[events.length - 1];
      expect(last.state).toBe('completed');
      expect(events.map((e) => e.state)).toContain('completed');
      expect(await imagesIdentical(join(dir, 'small.raw'), join(dir, 'out.qcow2'))).toBe(true);
      expect(await qemuImg('info', '--output=json', join(dir, 'out.qcow2'))).toMatch(/"cluster-size": 131072/);

      const job = await (await service.request(`/v1/jobs/${id}`)).json();
      expect(job).toMatchObject({
        id,
        type: 'convert',
        state: 'completed',
        stage: 'convert',
        progress: { done: 64 * MiB, total: 64 * MiB },
        error: null,
        attempts: 1,
        result: { path: 'out.qcow2', format: 'qcow2', virtualSize: 64 * MiB, size: (await stat(join(dir, 'out.qcow2'))).size },
      });
      for (const field of ['createdAt', 'startedAt', 'finishedAt']) expect(Date.parse(job[field])).not.toBeNaN();
      const log = await service.request(`/v1/jobs/${id}/log`);
      expect(log.headers.get('content-type')).toMatch(/^text\/plain/);
      expect(await log.text()).toMatch(/submitted convert job[\s\S]*convert: attempt 1 of 3[\s\S]*completed/);
      expect(await temporaryFiles(dir)).toEqual([]);
    });

    test('lists jobs newest first, by state and by page', async () => {
      const first = await submitConvert(service, 'small.raw', 'page1.raw', 'raw');
      await watchJob(service, first, isFinished);
      const second = await submitConvert(service, 'small.raw', 'page2.raw', 'raw');
      await watchJob(service, second, isFinished);
      const page1 = await (await service.request('/v1/jobs?limit=1')).json();
      expect(page1).toMatchObject({ limit: 1, offset: 0, jobs: [{ id: second }] });
      expect(page1.total).toBeGreaterThanOrEqual(2);
      const page2 = await (await service.request('/v1/jobs?limit=1&offset=1')).json();
      expect(page2.jobs.map((j: JobView) => j.id)).toEqual([first]);
      const completed = await (await service.request('/v1/jobs?state=completed&limit=500')).json();
      expect(completed.jobs.every((j: JobView) => j.state === 'completed')).toBe(true);
      expect(completed.jobs.map((j: JobView) => j.id)).toEqual(expect.arrayContaining([first, second]));
      const failed = await (await service.request('/v1/jobs?state=failed')).json();
      expect(failed.jobs.map((j: JobView) => j.id)).not.toContain(first);

      for (const query of ['state=done', 'limit=0', 'limit=many', 'offset=-1', 'page=2']) {
        const res = await service.request(`/v1/jobs?${query}`);
        expect(res.status, query).toBe(400);
        expect((await problemOf(res)).detail).toMatch(/querystring/);
      }
      expect((await problemOf(await service.request('/v1/jobs/no-such-job'))).status).toBe(404);
    });

    test('refuses paths that are absolute, leave the data dir or name its state folder', async () => {
      await symlink('/tmp', join(dir, 'escape'));
      const cases: Array<[string, string, RegExp]> = [
        ['/etc/passwd', 'x.raw', /source\.path '\/etc\/passwd' is absolute/],
        ['small.raw', '../x.raw', /target\.path '\.\.\/x\.raw' leaves the data dir/],
        ['a/../../small.raw', 'x.raw', /source\.path .* leaves the data dir/],
        ['small.raw', 'escape/x.raw', /target\.path 'escape\/x\.raw' resolves outside the data dir/],
        ['.ferry/api-token', 'x.raw', /source\.path '\.ferry\/api-token' is not a file in the data dir/],
        ['small.raw', '.ferry/jobs/x.json', /target\.path/],
      ];
      for (const [source, target, detail] of cases) {
        const res = await service.request('/v1/jobs', { method: 'POST', json: { type: 'convert', source: { path: source }, target: { path: target, format: 'raw' } } });
        expect(res.status, `${source} → ${target}`).toBe(400);
        const problem = await problemOf(res);
        expect(problem.type).toBe('urn:ferry:problem:path-outside-data-dir');
        expect(problem.detail).toMatch(detail);
      }
      expect(await readdir('/tmp')).not.toContain('x.raw');
    });

    test('refuses bad bodies with a status and a message that says what is wrong', async () => {
      const convert = (target: Record<string, unknown>, source: Record<string, unknown> = { path: 'small.raw' }) => ({ type: 'convert', source, target });
      const cases: Array<[unknown, number, RegExp]> = [
        [{ ...convert({ path: 'o.raw', format: 'raw' }), priority: 1 }, 400, /body: unknown field 'priority'/],
        [convert({ path: 'o.raw', format: 'raw', sparse: true }), 400, /body\.target: unknown field 'sparse'/],
        [{ type: 'convert', source: { path: 'small.raw' } }, 400, /body: missing required field 'target'/],
        [convert({ path: 7, format: 'raw' }), 400, /body\.target\.path: must be string/],
        [convert({ path: 'o.raw', format: 'raw', compress: 'yes' }), 400, /body\.target\.compress: must be boolean/],
        [{ type: 'migrate' }, 400, /body\.type: must be one of convert, capture/],
        [[1, 2], 400, /must be a JSON object/],
        [convert({ path: 'o.raw', format: 'qcow7' }), 400, /qcow7/],
        [convert({ path: 'o.qcow2', format: 'qcow2', options: { no_such_option: '1' } }), 400, /no_such_option/],
        [convert({ path: 'o.raw', format: 'raw', compress: true }), 400, /does not support compression/],
        [convert({ path: 'o.raw', format: 'raw' }, { path: 'missing.raw' }), 422, /source\.path 'missing\.raw' is not a file/],
        [
          { type: 'capture', source: { host: 'h', user: 'root', credential: 'c', disk: '/dev/sda' }, target: { path: 'p.qcow2', format: 'qcow2' } },
          400,
          /body\.source: missing required field 'hostKey'/,
        ],
      ];
      for (const [body, status, detail] of cases) {
        const res = await service.request('/v1/jobs', { method: 'POST', json: body });
        expect(res.status, JSON.stringify(body)).toBe(status);
        expect((await problemOf(res)).detail, JSON.stringify(body)).toMatch(detail);
      }
      const malformed = await service.request('/v1/jobs', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"type": "convert",' });
      expect(malformed.status).toBe(400);
      expect((await problemOf(malformed)).detail).toMatch(/JSON/i);
      const wrongType = await service.request('/v1/jobs', { method: 'POST', headers: { 'content-type': 'text/plain' }, body: 'convert please' });
      expect(wrongType.status).toBe(415);
      await problemOf(wrongType);
      expect((await service.request('/v1/nothing-here')).status).toBe(404);
    });

    test('returns the same job for a retried POST with the same Idempotency-Key', async () => {
      const body = { type: 'convert', source: { path: 'small.raw' }, target: { path: 'idem.raw', format: 'raw' } };
      const headers = { 'idempotency-key': `key-${mode}` };
      const first = await service.request('/v1/jobs', { method: 'POST', headers, json: body });
      const again = await service.request('/v1/jobs', { method: 'POST', headers, json: { target: body.target, source: body.source, type: 'convert' } });
      expect(first.status).toBe(202);
      expect(again.status).toBe(202);
      const id = (await first.json()).id;
      expect((await again.json()).id).toBe(id);
      const reused = await service.request('/v1/jobs', { method: 'POST', headers, json: { ...body, target: { path: 'other.raw', format: 'raw' } } });
      expect(reused.status).toBe(409);
      expect((await problemOf(reused)).detail).toMatch(/Idempotency-Key/);
      await watchJob(service, id, isFinished);
      const all = await (await service.request('/v1/jobs?limit=500')).json();
      expect(all.jobs.filter((j: { spec: { target: { path: string } } }) => j.spec.target.path === 'idem.raw')).toHaveLength(1);
    });

    test('cancels a running job: the work stops and the partial output is removed', async () => {
      const id = await submitConvert(service, 'random.raw', 'slow.qcow2', 'qcow2', { compress: true });
      // A second job writing the same file while the first is unfinished would destroy its output.
      const clash = await service.request('/v1/jobs', { method: 'POST', json: { type: 'convert', source: { path: 'small.raw' }, target: { path: 'slow.qcow2', format: 'qcow2' } } });
      expect(clash.status).toBe(409);
      expect((await problemOf(clash)).detail).toMatch(/already writing slow\.qcow2/);

      await watchJob(service, id, (job) => job.state === 'running' && job.progress.done > 0);
      expect(await temporaryFiles(dir)).toHaveLength(1);
      const res = await service.request(`/v1/jobs/${id}`, { method: 'DELETE' });
      expect(res.status).toBe(200);
      expect((await res.json()).state).toBe('cancelled');
      await eventually('the worker to stop and clean up', async () => ((await (await service.request(`/v1/jobs/${id}/log`)).text()).includes('partial output removed') ? true : undefined));
      expect(await temporaryFiles(dir)).toEqual([]);
      await expect(stat(join(dir, 'slow.qcow2'))).rejects.toThrow(/ENOENT/);
      const job = await (await service.request(`/v1/jobs/${id}`)).json();
      expect(job.state).toBe('cancelled');
      expect(job.progress.done).toBeLessThan(128 * MiB);
      const twice = await service.request(`/v1/jobs/${id}`, { method: 'DELETE' });
      expect(twice.status).toBe(409);
      expect((await problemOf(twice)).detail).toMatch(/already cancelled/);
    });

    test('fails a corrupt image at once, without retrying', async () => {
      const id = await submitConvert(service, 'bad.qcow2', 'bad.raw', 'raw');
      const events = await watchJob(service, id, isFinished);
      expect(events[events.length - 1]).toMatchObject({ state: 'failed', attempts: 1, error: { type: 'CORRUPT_IMAGE', message: expect.stringMatching(/^bad\.qcow2: l1_table_offset/) } });
      const log = await (await service.request(`/v1/jobs/${id}/log`)).text();
      expect(log).toMatch(/failed: bad\.qcow2: l1_table_offset/);
      expect(log).not.toMatch(/will retry/);
      expect(await temporaryFiles(dir)).toEqual([]);
    });

    test('stores credentials encrypted; never returns or logs the secret', async () => {
      const secret = `-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-material-${mode}\n-----END OPENSSH PRIVATE KEY-----`;
      const res = await service.request('/v1/credentials', { method: 'POST', json: { type: 'ssh-key', name: 'migration key', privateKey: secret } });
      expect(res.status).toBe(201);
      const created = await res.json();
      expect(Object.keys(created).sort()).toEqual(['createdAt', 'id', 'name', 'type']);
      const listed = await (await service.request('/v1/credentials')).json();
      expect(listed).toContainEqual(created);
      expect(JSON.stringify(listed)).not.toContain('secret-material');
      const stateFiles = await readdir(join(dir, '.ferry'), { recursive: true });
      for (const f of stateFiles) {
        const path = join(dir, '.ferry', f);
        if ((await stat(path)).isFile()) expect(await readFile(path, 'utf8'), f).not.toContain('secret-material');
      }
      const file = join(dir, '.ferry', 'credentials', `${created.id}.json`);
      expect((await stat(file)).mode & 0o777).toBe(0o600);
      expect((await stat(join(dir, '.ferry', 'secret.key'))).mode & 0o777).toBe(0o600);
      expect(service.output()).not.toContain('secret-material');

      const bad = await service.request('/v1/credentials', { method: 'POST', json: { type: 'password', name: 'x', password: 'p', privateKey: 'k' } });
      expect(bad.status).toBe(400);
      expect((await problemOf(bad)).detail).toMatch(/unknown field 'privateKey'/);
      expect((await service.request(`/v1/credentials/${created.id}`, { method: 'DELETE' })).status).toBe(204);
      expect((await service.request(`/v1/credentials/${created.id}`, { method: 'DELETE' })).status).toBe(404);
    });

    test('describes every route in OpenAPI, with closed request bodies', async () => {
      const doc = await (await fetch(`${service.baseUrl}/openapi.json`)).json();
      expect(doc.openapi).toMatch(/^3\./);
      expect(Object.keys(doc.paths).sort()).toEqual(
        [
          '/',
          '/dashboard/app.js',
          '/dashboard/style.css',
          '/healthz',
          '/metrics',
          '/openapi.json',
          '/v1/credentials',
          '/v1/credentials/{id}',
          '/v1/events',
          '/v1/formats',
          '/v1/jobs',
          '/v1/jobs/{id}',
          '/v1/jobs/{id}/events',
          '/v1/jobs/{id}/log',
          '/v1/migrations',
          '/v1/migrations/{id}',
          '/v1/migrations/{id}:force-complete',
        ].sort(),
      );
      expect(doc.paths['/v1/migrations'].post.requestBody.content['application/json'].schema.additionalProperties).toBe(false);
      for (const path of ['/v1/jobs', '/v1/credentials']) {
        const schema = doc.paths[path].post.requestBody.content['application/json'].schema;
        expect(schema.oneOf.length).toBeGreaterThan(1);
        for (const branch of schema.oneOf) expect(branch.additionalProperties, path).toBe(false);
        expect(doc.paths[path].post.security).toEqual([{ bearer: [] }]);
      }
      expect(doc.paths['/v1/jobs/{id}'].get.responses['200'].content['application/json'].schema.properties.state).toBeDefined();
    });

    test('exports Prometheus metrics for jobs', async () => {
      const text = await (await fetch(`${service.baseUrl}/metrics`)).text();
      const value = (name: string) => Number(new RegExp(`^${name.replace(/[{}"]/g, (c) => `\\${c}`)} (\\S+)$`, 'm').exec(text)?.[1]);
      expect(value('ferry_jobs{state="completed"}')).toBeGreaterThanOrEqual(4);
      expect(value('ferry_jobs{state="failed"}')).toBeGreaterThanOrEqual(1);
      expect(value('ferry_jobs{state="cancelled"}')).toBeGreaterThanOrEqual(1);
      expect(value('ferry_job_bytes_converted_total{type="convert"}')).toBeGreaterThanOrEqual(4 * 64 * MiB);
      expect(value('ferry_job_duration_seconds_count{type="convert",state="completed"}')).toBeGreaterThanOrEqual(4);
      expect(text).toMatch(/^ferry_process_cpu_seconds_total /m);
    });
  });
}
