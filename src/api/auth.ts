import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FerryError } from '../errors.js';
import { STATE_DIR } from '../jobs/paths.js';

export class UnauthorizedError extends FerryError {
  readonly code = 'UNAUTHORIZED';
}

export interface ApiToken {
  token: string;
  /** Where it came from: the FERRY_API_TOKEN variable, or the file it is stored in. */
  source: string;
}

/** FERRY_API_TOKEN, or the token stored in the data dir, generated (0600) at the first start. */
export async function loadApiToken(dataDir: string): Promise<ApiToken> {
  const fromEnv = process.env.FERRY_API_TOKEN;
  if (fromEnv) return { token: fromEnv, source: 'FERRY_API_TOKEN' };
  const dir = join(dataDir, STATE_DIR);
  const path = join(dir, 'api-token');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  try {
    await writeFile(path, randomBytes(32).toString('base64url') + '\n', { flag: 'wx', mode: 0o600 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  return { token: (await readFile(path, 'utf8')).trim(), source: path };
}

/** Compares in constant time (digests, so lengths do not leak either). */
export function checkBearer(header: string | undefined, token: string): void {
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header ?? '');
  if (!match) throw new UnauthorizedError('missing Authorization: Bearer TOKEN header');
  const digest = (s: string) => createHash('sha256').update(s).digest();
  if (!timingSafeEqual(digest(match[1]), digest(token))) throw new UnauthorizedError('the bearer token is not valid');
}
