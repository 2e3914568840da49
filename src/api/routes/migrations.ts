import type { FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import type { MigrationRegistry } from '../migrations.js';
import { ProblemSchema } from '../problems.js';

const Stats = Type.Object(
  {
    round: Type.Integer(),
    state: Type.String(),
    dirtyRate: Type.Number({ description: 'guest RAM dirtied per second over the last round, bytes/s' }),
    transferredBytes: Type.Number(),
    remainingBytes: Type.Number(),
    expectedDowntimeMs: Type.Number(),
    bandwidth: Type.Number({ description: 'wire bytes per second over the last round' }),
    maxDowntimeMs: Type.Number(),
    maxBandwidth: Type.Union([Type.Number(), Type.Null()], { description: 'bytes/s; null when unlimited' }),
    throttle: Type.Number({ description: 'CPU share taken from the VM by auto-converge' }),
  },
  { additionalProperties: true },
);

const Migration = Type.Object(
  {
    id: Type.String(),
    state: Type.Union([Type.Literal('running'), Type.Literal('completed'), Type.Literal('failed'), Type.Literal('cancelled')]),
    createdAt: Type.String(),
    stats: Stats,
    report: Type.Optional(
      Type.Object(
        {
          outcome: Type.String(),
          totalMs: Type.Number(),
          downtimeMs: Type.Union([Type.Number(), Type.Null()]),
          transferredBytes: Type.Number(),
          rounds: Type.Integer(),
          memoryVerified: Type.Boolean(),
          sourceRunning: Type.Boolean(),
        },
        { additionalProperties: true },
      ),
    ),
  },
  { additionalProperties: false },
);

const Limits = {
  maxDowntimeMs: Type.Optional(Type.Integer({ minimum: 1, maximum: 600_000, description: 'switch over only when the rest fits in this downtime' })),
  maxBandwidth: Type.Optional(Type.Integer({ minimum: 1, description: 'bytes per second on the wire' })),
};

const Params = Type.Object({ id: Type.String({ minLength: 1, maxLength: 64 }) }, { additionalProperties: false });

/** JSON has no Infinity: an unlimited bandwidth is reported as null. */
function serialisable<T extends { stats: { maxBandwidth: number; rateLimit?: number } }>(view: T): T {
  const stats = { ...view.stats } as Record<string, unknown>;
  for (const key of ['maxBandwidth', 'rateLimit']) if (stats[key] === Infinity) stats[key] = null;
  return { ...view, stats } as unknown as T;
}

/** Live migration, named after Nova's server migrations: start, watch, retune, force, abort. */
export function registerMigrationRoutes(app: FastifyInstance, migrations: MigrationRegistry): void {
  const api = app.withTypeProvider<TypeBoxTypeProvider>();

  api.post(
    '/v1/migrations',
    {
      schema: {
        summary: 'Live-migrate a running QEMU VM to a host where `ferry migrate-listen` waits',
        description: 'The VM runs on this host with its RAM on a shared memory-backend-file; paths are host paths.',
        tags: ['migrations'],
        body: Type.Object(
          {
            engine: Type.Optional(Type.Union([Type.Literal('ferry'), Type.Literal('qemu')])),
            source: Type.Object({ qmpSocket: Type.String({ minLength: 1 }), ramPath: Type.String({ minLength: 1 }) }, { additionalProperties: false }),
            to: Type.Object({ host: Type.String({ minLength: 1 }), port: Type.Integer({ minimum: 1, maximum: 65535 }) }, { additionalProperties: false }),
            ...Limits,
            autoConverge: Type.Optional(Type.Boolean()),
          },
          { additionalProperties: false },
        ),
        response: { 202: Migration, 400: ProblemSchema, 401: ProblemSchema },
      },
    },
    async (request, reply) => {
      reply.code(202);
      return serialisable(await migrations.start(request.body));
    },
  );

  api.get(
    '/v1/migrations',
    { schema: { summary: 'Migrations run by this service', tags: ['migrations'], response: { 200: Type.Array(Migration), 401: ProblemSchema } } },
    async () => migrations.list().map(serialisable),
  );

  api.get(
    '/v1/migrations/:id',
    { schema: { summary: 'Live stats of a migration, and its report once finished', tags: ['migrations'], params: Params, response: { 200: Migration, 401: ProblemSchema, 404: ProblemSchema } } },
    async (request) => serialisable(migrations.view(request.params.id)),
  );

  api.patch(
    '/v1/migrations/:id',
    {
      schema: {
        summary: 'Change the downtime limit or the bandwidth of a running migration',
        tags: ['migrations'],
        params: Params,
        body: Type.Object(Limits, { additionalProperties: false, minProperties: 1 }),
        response: { 200: Migration, 400: ProblemSchema, 401: ProblemSchema, 404: ProblemSchema },
      },
    },
    async (request) => serialisable(migrations.update(request.params.id, request.body)),
  );

  api.post(
    // A regex on the id keeps fastify from reading "::force" as part of the parameter's name.
    '/v1/migrations/:id(^[0-9A-Za-z-]+)::force-complete',
    { schema: { summary: 'Switch over now, whatever the expected downtime', tags: ['migrations'], params: Params, response: { 200: Migration, 401: ProblemSchema, 404: ProblemSchema } } },
    async (request) => serialisable(migrations.forceComplete(request.params.id)),
  );

  api.delete(
    '/v1/migrations/:id',
    { schema: { summary: 'Abort: the source keeps running, the destination is discarded', tags: ['migrations'], params: Params, response: { 200: Migration, 401: ProblemSchema, 404: ProblemSchema } } },
    async (request) => serialisable(migrations.abort(request.params.id)),
  );
}
