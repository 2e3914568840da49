import { readdir, realpath, unlink } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, normalize, sep } from 'node:path';
import { PathOutsideDataDirError } from './errors.js';

/** The service's own files (token, key, job records) live here; jobs may not read or write them. */
export const STATE_DIR = '.ferry';

/**
 * Resolves a job path against the data dir. Refused: absolute paths, paths that leave the data dir
 * lexically (`..`) or through a symlink in any existing component, and the service's state folder.
 */
export async function resolveInDataDir(dataDir: string, path: string, field: string): Promise<string> {
  if (path === '' || path.includes('\0')) throw new PathOutsideDataDirError(`${field} must be a non-empty path relative to the data dir`, { field });
  if (isAbsolute(path)) throw new PathOutsideDataDirError(`${field} '${path}' is absolute; job paths are relative to the data dir`, { field });
  const relative = normalize(path);
  const first = relative.split(sep)[0];
  if (first === '..') throw new PathOutsideDataDirError(`${field} '${path}' leaves the data dir`, { field });
  if (first === STATE_DIR || relative === '.') throw new PathOutsideDataDirError(`${field} '${path}' is not a file in the data dir`, { field });
  const absolute = join(dataDir, relative);
  const root = await realpath(dataDir);
  const real = await realpathOfExistingPart(absolute);
  if (real !== root && !real.startsWith(root + sep)) {
    throw new PathOutsideDataDirError(`${field} '${path}' resolves outside the data dir (through a symbolic link)`, { field });
  }
  return absolute;
}

/** realpath of the path, or of its deepest existing ancestor joined with the rest (a target need not exist). */
async function realpathOfExistingPart(path: string): Promise<string> {
  const missing: string[] = [];
  for (let at = path; ; at = dirname(at)) {
    try {
      return join(await realpath(at), ...missing.reverse());
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || dirname(at) === at) throw err;
      missing.push(basename(at));
    }
  }
}

/**
 * Removes what an interrupted conversion to `target` left behind: OutputFile writes under
 * `.NAME.ferry-XXXXXXXX.tmp` beside the target, and a killed process cannot remove its own.
 */
export async function removeStaleTemporaries(target: string): Promise<string[]> {
  const prefix = `.${basename(target)}.ferry-`;
  const names = await readdir(dirname(target)).catch(() => [] as string[]);
  const stale = names.filter((n) => n.startsWith(prefix) && /^[0-9a-f]{8}\.tmp$/.test(n.slice(prefix.length)));
  for (const name of stale) await unlink(join(dirname(target), name)).catch(() => undefined);
  return stale;
}
