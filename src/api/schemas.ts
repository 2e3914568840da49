import { Type } from 'typebox';
import { JOB_STATES } from '../jobs/model.js';
import { jobHandlers } from '../jobs/registry.js';

// An enum, not a union of literals: fastify's serializer needs a validator compiled (tens of ms, at the
// first reply) to pick a union's branch, while an enum of strings is written as it is.
export const JobStateSchema = Type.Enum([...JOB_STATES], { description: 'queued → running → completed | failed | cancelled' });

/** The body of POST /v1/jobs: one branch per job type, picked by `type`. */
export const JobRequestSchema = Type.Unsafe<{ type: string; [field: string]: unknown }>({
  oneOf: jobHandlers.map((h) => h.schema),
  discriminator: { propertyName: 'type' },
  description: `a job request; type is one of ${jobHandlers.map((h) => h.type).join(', ')}`,
});

export const JobSchema = Type.Object(
  {
    id: Type.String(),
    type: Type.String(),
    state: JobStateSchema,
    stage: Type.Union([Type.String(), Type.Null()], { description: 'the stage running or last run: convert; capture (P2V), then convert and inject when the capture injects drivers' }),
    progress: Type.Object({ done: Type.Number(), total: Type.Number() }, { description: 'bytes processed of the disk size, in the current stage (inject: the sizes of the images done)' }),
    createdAt: Type.String({ format: 'date-time' }),
    startedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
    finishedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
    error: Type.Union([Type.Object({ type: Type.String(), message: Type.String() }), Type.Null()]),
    result: Type.Unknown({
      description:
        'what the job produced (convert: path, format, size, byte counts; capture: format and the images with their counters, ' +
        'and with injectDrivers: injection.images, the report of each image: OS, changes, verification, warnings)',
    }),
    attempts: Type.Integer({ description: 'attempts started, including ones interrupted by a lost worker' }),
    worker: Type.Union([Type.String(), Type.Null()], { description: 'host:pid that runs or last ran the job' }),
    spec: Type.Unknown({ description: 'the request as submitted' }),
  },
  { title: 'Job' },
);

export const JobAcceptedSchema = Type.Object({ id: Type.String(), state: JobStateSchema }, { title: 'JobAccepted' });

export const JobListQuerySchema = Type.Object(
  {
    state: Type.Optional(JobStateSchema),
    limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, default: 50 })),
    offset: Type.Optional(Type.Integer({ minimum: 0, default: 0 })),
  },
  { additionalProperties: false },
);

export const JobListSchema = Type.Object(
  { jobs: Type.Array(JobSchema), total: Type.Integer(), limit: Type.Integer(), offset: Type.Integer() },
  { title: 'JobList' },
);

export const IdParamsSchema = Type.Object({ id: Type.String({ minLength: 1, maxLength: 100 }) }, { additionalProperties: false });

export const IdempotencyHeadersSchema = Type.Object({
  'idempotency-key': Type.Optional(Type.String({ minLength: 1, maxLength: 200, description: 'a retried POST with the same key returns the same job' })),
});
