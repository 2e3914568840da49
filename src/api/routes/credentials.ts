import type { FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { CredentialInfoSchema, CredentialRequestSchema, type CredentialVault } from '../../jobs/credentials.js';
import { ProblemSchema } from '../problems.js';
import { IdParamsSchema } from '../schemas.js';

export function registerCredentialRoutes(app: FastifyInstance, vault: CredentialVault): void {
  const api = app.withTypeProvider<TypeBoxTypeProvider>();

  api.post(
    '/v1/credentials',
    {
      schema: {
        summary: 'Store an SSH private key or password for capture',
        description: 'Encrypted at rest; referenced by id in capture jobs; never returned or logged.',
        tags: ['credentials'],
        body: CredentialRequestSchema,
        response: { 201: CredentialInfoSchema, 400: ProblemSchema, 401: ProblemSchema },
      },
    },
    async (request, reply) => {
      reply.code(201);
      return vault.create(request.body);
    },
  );

  api.get(
    '/v1/credentials',
    { schema: { summary: 'List stored credentials (without secrets)', tags: ['credentials'], response: { 200: Type.Array(CredentialInfoSchema), 401: ProblemSchema } } },
    async () => vault.list(),
  );

  api.delete(
    '/v1/credentials/:id',
    {
      schema: {
        summary: 'Delete a stored credential',
        tags: ['credentials'],
        params: IdParamsSchema,
        response: { 204: Type.Null({ description: 'deleted' }), 401: ProblemSchema, 404: ProblemSchema },
      },
    },
    async (request, reply) => {
      await vault.delete(request.params.id);
      reply.code(204);
      return null;
    },
  );
}
