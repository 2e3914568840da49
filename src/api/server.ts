import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { Logger } from 'pino';
import { Type } from 'typebox';
import type { CredentialVault } from '../jobs/credentials.js';
import type { JobService } from '../jobs/service.js';
import { checkBearer } from './auth.js';
import { registerDashboard } from './dashboard.js';
import { createMetrics } from './metrics.js';
import { problem, problemFor, PROBLEM_CONTENT_TYPE } from './problems.js';
import { registerCredentialRoutes } from './routes/credentials.js';
import { registerFormatRoutes } from './routes/formats.js';
import { registerJobRoutes } from './routes/jobs.js';
import { registerMigrationRoutes } from './routes/migrations.js';
import { MigrationRegistry } from './migrations.js';
import { formatValidationErrors, validatorCompiler } from './validation.js';

export interface ServerOptions {
  service: JobService;
  vault: CredentialVault;
  token: string;
  /** embedded (in-process queue) or redis (BullMQ), reported by /healthz. */
  queueMode: 'embedded' | 'redis';
  logger: Logger;
}

/** Every /v1 route needs the bearer token; the dashboard, docs, health and metrics do not. */
const PROTECTED_PREFIX = '/v1/';

export async function buildServer(opts: ServerOptions): Promise<FastifyInstance> {
  const app = Fastify({ loggerInstance: opts.logger as FastifyBaseLogger, schemaErrorFormatter: formatValidationErrors, bodyLimit: 1024 * 1024 });
  app.setValidatorCompiler(validatorCompiler);
  // Bodies are JSON; fastify's default text/plain parser would turn a wrong content type into a confusing 400.
  app.removeContentTypeParser('text/plain');

  await app.register(swagger, {
    openapi: {
      info: { title: 'Ferry', description: 'Disk conversion and P2V jobs. Paths are relative to the data dir.', version: process.env.npm_package_version ?? '0.1.0' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
    },
  });
  await app.register(swaggerUi, { routePrefix: '/docs' });
  app.addHook('onRoute', (route) => {
    if (route.url.startsWith(PROTECTED_PREFIX) && route.schema) route.schema = { ...route.schema, security: [{ bearer: [] }] };
  });

  // Decided by the matched route, not the raw URL, so no spelling of a path reaches a /v1 handler unchecked.
  app.addHook('onRequest', async (request) => {
    if (request.routeOptions.url?.startsWith(PROTECTED_PREFIX)) checkBearer(request.headers.authorization, opts.token);
  });
  app.setErrorHandler(async (err, request, reply) => {
    const body = problemFor(err);
    if (body.status >= 500) request.log.error({ err }, 'request failed');
    if (body.status === 401) reply.header('www-authenticate', 'Bearer');
    reply.code(body.status).type(PROBLEM_CONTENT_TYPE);
    return body;
  });
  app.setNotFoundHandler(async (request, reply) => {
    reply.code(404).type(PROBLEM_CONTENT_TYPE);
    return problem('NOT_FOUND', `no route ${request.method} ${request.url.split('?')[0]}`);
  });

  const metrics = createMetrics(opts.service.store);
  app.addHook('onClose', async () => metrics.stop());

  app.get(
    '/healthz',
    { schema: { summary: 'Liveness', tags: ['service'], response: { 200: Type.Object({ status: Type.Literal('ok'), queue: Type.String() }) } } },
    async () => ({ status: 'ok' as const, queue: opts.queueMode }),
  );
  app.get(
    '/metrics',
    { schema: { summary: 'Prometheus metrics (ferry_*)', tags: ['service'], produces: ['text/plain'], response: { 200: { description: 'Prometheus text format', content: { 'text/plain': { schema: Type.String() } } } } } },
    async (_request, reply) => {
      reply.type(metrics.registry.contentType);
      return metrics.registry.metrics();
    },
  );
  app.get(
    '/openapi.json',
    { schema: { summary: 'This OpenAPI document', tags: ['service'], response: { 200: Type.Object({}, { additionalProperties: true }) } } },
    async () => app.swagger(),
  );

  registerJobRoutes(app, opts.service);
  registerCredentialRoutes(app, opts.vault);
  const migrations = new MigrationRegistry(opts.logger);
  registerMigrationRoutes(app, migrations);
  app.addHook('onClose', async () => migrations.close());
  registerFormatRoutes(app);
  await registerDashboard(app);
  return app;
}
