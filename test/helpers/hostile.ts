import { mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';
import { ferry } from './env.js';

/**
 * Writes a hostile `image` as FOLDER/NAME and converts it to raw: the conversion must end in exit 1 with
 * one line naming the file and matching `pattern`, no stack trace, bounded memory, and nothing left behind.
 */
export async function expectImageRefused(folder: string, name: string, image: Buffer, pattern: RegExp, convertArgs: string[] = []): Promise<void> {
  await mkdir(folder, { recursive: true });
  const path = join(folder, name);
  await writeFile(path, image);
  const r = await ferry(['convert', ...convertArgs, '-O', 'raw', path, join(folder, 'out.raw')], { timeoutMs: 20_000 });
  expect(r.code, r.stderr).toBe(1);
  const lines = r.stderr.trim().split('\n');
  expect(lines).toHaveLength(1);
  expect(lines[0]).toContain(path);
  expect(lines[0]).toMatch(pattern);
  expect(lines[0]).not.toMatch(/at .*\.js:\d+/);
  expect(r.maxRssKiB).toBeGreaterThan(0);
  expect(r.maxRssKiB).toBeLessThan(256 * 1024);
  expect(await readdir(folder)).toEqual([name]);
}
