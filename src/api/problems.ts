import type { FastifyError } from 'fastify';
import { Type, type Static } from 'typebox';
import { FerryError } from '../errors.js';

/** RFC 9457 problem details: every error response has this body, as application/problem+json. */
export const ProblemSchema = Type.Object(
  {
    type: Type.String({ description: 'a URN naming the kind of problem' }),
    title: Type.String(),
    status: Type.Integer(),
    detail: Type.String({ description: 'what is wrong with this request, for a person' }),
    field: Type.Optional(Type.String({ description: 'the request field at fault, when there is one' })),
  },
  { title: 'Problem' },
);
export type Problem = Static<typeof ProblemSchema>;

export const PROBLEM_CONTENT_TYPE = 'application/problem+json';

/** Status and title for each typed error code (FerryError.code). */
const PROBLEM_KINDS: Record<string, { status: number; title: string }> = {
  INVALID_REQUEST: { status: 400, title: 'Invalid request' },
  INVALID_OPTION: { status: 400, title: 'Invalid option' },
  UNKNOWN_FORMAT: { status: 400, title: 'Unknown format' },
  PATH_OUTSIDE_DATA_DIR: { status: 400, title: 'Path outside the data dir' },
  UNAUTHORIZED: { status: 401, title: 'Unauthorized' },
  NOT_FOUND: { status: 404, title: 'Not found' },
  CONFLICT: { status: 409, title: 'Conflict' },
  MISSING_INPUT: { status: 422, title: 'Missing input' },
  CORRUPT_IMAGE: { status: 422, title: 'Corrupt image' },
  UNSUPPORTED_FEATURE: { status: 422, title: 'Unsupported feature' },
  UNSAFE_REFERENCE: { status: 422, title: 'Unsafe reference' },
  JOB_TYPE_UNAVAILABLE: { status: 501, title: 'Job type not available' },
};

export function problem(code: string, detail: string, field?: string): Problem {
  const kind = PROBLEM_KINDS[code] ?? { status: 500, title: 'Internal error' };
  return { type: `urn:ferry:problem:${code.toLowerCase().replaceAll('_', '-')}`, title: kind.title, status: kind.status, detail, ...(field ? { field } : {}) };
}

/**
 * Maps anything a route throws to a problem. Typed errors carry their code; framework errors (bad JSON,
 * wrong content type, body too large) keep fastify's 4xx status; anything else is a 500 whose details
 * stay in the log.
 */
export function problemFor(err: unknown): Problem {
  if (err instanceof FerryError) return problem(err.code, err.message, err.field);
  const fe = err as FastifyError;
  if (fe.validation) return problem('INVALID_REQUEST', fe.message);
  if (typeof fe.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500) {
    return { type: `urn:ferry:problem:${(fe.code ?? 'bad-request').toLowerCase().replaceAll('_', '-')}`, title: 'Bad request', status: fe.statusCode, detail: fe.message };
  }
  return problem('INTERNAL', 'internal error; the service log has the details');
}
