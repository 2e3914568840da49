import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PACKAGE_ROOT } from '../paths.js';
import type { FastifyInstance } from 'fastify';

/** The dashboard's files are served from the source tree (tsc does not copy them into dist/). */
const DASHBOARD_DIR = join(PACKAGE_ROOT, 'src', 'api', 'dashboard');

const FILES: Record<string, string> = {
  'index.html': 'text/html; charset=utf-8',
  'app.js': 'text/javascript; charset=utf-8',
  'style.css': 'text/css; charset=utf-8',
};

/** The dashboard: three static files, read once. It talks to the same /v1 API with the user's token. */
export async function registerDashboard(app: FastifyInstance): Promise<void> {
  const contents = new Map<string, Buffer>();
  for (const name of Object.keys(FILES)) contents.set(name, await readFile(join(DASHBOARD_DIR, name)));
  const serve = (name: string) => ({
    schema: { summary: `dashboard: ${name}`, tags: ['dashboard'], produces: [FILES[name].split(';')[0]] },
    handler: async (_request: unknown, reply: { type(t: string): unknown; header(k: string, v: string): unknown }) => {
      reply.type(FILES[name]);
      reply.header('cache-control', 'no-cache');
      return contents.get(name);
    },
  });
  app.get('/', serve('index.html'));
  for (const name of ['app.js', 'style.css']) app.get(`/dashboard/${name}`, serve(name));
}
