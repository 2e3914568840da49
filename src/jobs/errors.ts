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

/** A request option this build cannot honour yet: driver injection in capture jobs before issue 6 lands. */
export class FeatureUnavailableError extends FerryError {
  readonly code = 'FEATURE_UNAVAILABLE';
}
