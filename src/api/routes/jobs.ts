import type { FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { isTerminal, type JobRecord } from '../../jobs/model.js';
import type { JobService } from '../../jobs/service.js';
import { ProblemSchema } from '../problems.js';
import { openEventStream, type EventStream } from '../sse.js';
import { IdempotencyHeadersSchema, IdParamsSchema, JobAcceptedSchema, JobListQuerySchema, JobListSchema, JobRequestSchema, JobSchema } from '../schemas.js';

const problems = (...codes: number[]) => Object.fromEntries(codes.map((c) => [c, ProblemSchema]));

export function registerJobRoutes(app: FastifyInstance, service: JobService): void {
  const api = app.withTypeProvider<TypeBoxTypeProvider>();

  api.post(
    '/v1/jobs',
    {
      schema: {
        summary: 'Submit a job',
        description:
          'Queues a conversion, or a P2V capture over SSH (with a stored credential and a verified host key), optionally followed by ' +
          'conversion and driver injection for a target hypervisor. Paths are relative to the data dir.',
        tags: ['jobs'],
        headers: IdempotencyHeadersSchema,
        body: JobRequestSchema,
        response: { 202: JobAcceptedSchema, ...problems(400, 401, 409, 422, 501) },
      },
    },
    async (request, reply) => {
      const { record } = await service.submit(request.body, request.headers['idempotency-key']);
      reply.code(202).header('location', `/v1/jobs/${record.id}`);
      return { id: record.id, state: record.state };
    },
  );

  api.get(
    '/v1/jobs',
    {
      schema: {
        summary: 'List jobs, newest first',
        tags: ['jobs'],
        querystring: JobListQuerySchema,
        response: { 200: JobListSchema, ...problems(400, 401) },
      },
    },
    async (request) => {
      const limit = request.query.limit ?? 50;
      const offset = request.query.offset ?? 0;
      const page = await service.list({ state: request.query.state, limit, offset });
      return { ...page, limit, offset };
    },
  );

  api.get(
    '/v1/jobs/:id',
    { schema: { summary: 'Get a job', tags: ['jobs'], params: IdParamsSchema, response: { 200: JobSchema, ...problems(401, 404) } } },
    async (request) => service.get(request.params.id),
  );

  api.delete(
    '/v1/jobs/:id',
    {
      schema: {
        summary: 'Cancel a job',
        description: 'Stops the work wherever it is and removes partial output. A finished job cannot be cancelled (409).',
        tags: ['jobs'],
        params: IdParamsSchema,
        response: { 200: JobSchema, ...problems(401, 404, 409) },
      },
    },
    async (request) => service.cancel(request.params.id),
  );

  api.get(
    '/v1/jobs/:id/log',
    {
      schema: {
        summary: "A job's log",
        tags: ['jobs'],
        params: IdParamsSchema,
        produces: ['text/plain'],
        response: { 200: { description: 'one line per event: ISO time, message', content: { 'text/plain': { schema: Type.String() } } }, ...problems(401, 404) },
      },
    },
    async (request, reply) => {
      const log = await service.log(request.params.id);
      reply.type('text/plain; charset=utf-8');
      return log;
    },
  );

  // Open streams are ended when the server closes, or a hijacked connection would keep it open.
  const streams = new Set<EventStream>();
  app.addHook('preClose', async () => {
    for (const stream of [...streams]) stream.end();
  });
  const eventKind = (before: JobRecord | undefined, after: JobRecord) =>
    !before || before.state !== after.state || before.stage !== after.stage ? 'state' : 'progress';

  api.get(
    '/v1/jobs/:id/events',
    {
      schema: {
        summary: "A job's progress and state as server-sent events",
        description:
          'Each event carries the whole job record as JSON: `event: state` first and whenever the state or stage changes, ' +
          '`event: progress` for progress. The stream ends once the job reaches a final state.',
        tags: ['jobs'],
        params: IdParamsSchema,
        produces: ['text/event-stream'],
        response: { 200: { description: 'text/event-stream of job records', content: { 'text/event-stream': { schema: Type.String() } } }, ...problems(401, 404) },
      },
    },
    async (request, reply) => {
      const id = request.params.id;
      let last = await service.get(id);
      const stream = openEventStream(reply, streams);
      // Subscribed with no await since the read above, so no change in between is missed.
      stream.onClose(
        service.store.subscribe((record) => {
          if (record.id !== id) return;
          stream.send(eventKind(last, record), record);
          last = record;
          if (isTerminal(record.state)) stream.end();
        }),
      );
      stream.send('state', last);
      if (isTerminal(last.state)) stream.end();
    },
  );

  api.get(
    '/v1/events',
    {
      schema: {
        summary: 'Every job change as server-sent events (what the dashboard watches)',
        description: 'Like /v1/jobs/{id}/events, for all jobs, without end: `event: state` or `event: progress`, each with a job record.',
        tags: ['jobs'],
        produces: ['text/event-stream'],
        response: { 200: { description: 'text/event-stream of job records', content: { 'text/event-stream': { schema: Type.String() } } }, ...problems(401) },
      },
    },
    async (_request, reply) => {
      const stream = openEventStream(reply, streams);
      const seen = new Map<string, JobRecord>();
      stream.onClose(
        service.store.subscribe((record) => {
          stream.send(eventKind(seen.get(record.id), record), record);
          if (isTerminal(record.state)) seen.delete(record.id);
          else seen.set(record.id, record);
        }),
      );
    },
  );
}
