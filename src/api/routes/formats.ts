import type { FastifyInstance } from 'fastify';
import { Type } from 'typebox';
import { formatDrivers } from '../../convert/registry.js';
import { ProblemSchema } from '../problems.js';

const FormatSchema = Type.Object(
  {
    name: Type.String(),
    description: Type.String(),
    writable: Type.Boolean(),
    compression: Type.Boolean(),
    options: Type.Array(Type.Object({ name: Type.String(), type: Type.String(), description: Type.String() })),
  },
  { title: 'Format' },
);

/** The formats a convert job can read and write, with their creation options (what `ferry formats` prints). */
export function registerFormatRoutes(app: FastifyInstance): void {
  app.get(
    '/v1/formats',
    { schema: { summary: 'Disk formats and their creation options', tags: ['jobs'], response: { 200: Type.Array(FormatSchema), 401: ProblemSchema } } },
    async () =>
      formatDrivers.map((d) => ({
        name: d.name,
        description: d.description,
        writable: d.create !== undefined,
        compression: d.compression,
        options: d.createOptions.map((o) => ({ name: o.name, type: o.type, description: o.description })),
      })),
  );
}
