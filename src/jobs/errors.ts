import { FerryError } from '../errors.js';

/** A job path that is absolute, escapes the data dir (`..`, a symlink) or names the service's own files. */
export class PathOutsideDataDirError extends FerryError {
  readonly code = 'PATH_OUTSIDE_DATA_DIR';
}

/** A request that refers to something that does not exist: a source file, a credential. */
export class MissingInputError extends FerryError {
  readonly code = 'MISSING_INPUT';
}

/** No such job or credential (the URL names it). */
export class NotFoundError extends FerryError {
  readonly code = 'NOT_FOUND';
}

/** The request collides with the current state: an output another job is writing, a finished job, a reused key. */
export class ConflictError extends FerryError {
  readonly code = 'CONFLICT';
}

/** The job type is defined but its runner is not part of this build. */
export class JobTypeUnavailableError extends FerryError {
  readonly code = 'JOB_TYPE_UNAVAILABLE';
}

/** System errors that retrying cannot fix; everything else that is not a FerryError is retried. */
const PERMANENT_SYSTEM_ERRORS = new Set(['ENOENT', 'ENOTDIR', 'EISDIR', 'EACCES', 'EPERM', 'EEXIST', 'EINVAL', 'EROFS', 'ELOOP', 'ENAMETOOLONG']);

/**
 * A typed error for a condition that may pass by itself (a dropped connection, a source too busy to
 * capture consistently): its class declares `readonly transient = true`. The marker is structural so
 * that error classes need not depend on the job service.
 */
export type TransientError = FerryError & { readonly transient: true };

export function isTransient(err: unknown): err is TransientError {
  return err instanceof FerryError && (err as Partial<TransientError>).transient === true;
}

/** A failure that retrying cannot fix: a corrupt image, a bad option, a missing file, a refused host key. */
export function isPermanent(err: unknown): boolean {
  if (err instanceof FerryError) return !isTransient(err);
  const code = (err as NodeJS.ErrnoException)?.code;
  return code !== undefined && PERMANENT_SYSTEM_ERRORS.has(code);
}
