import { FerryError } from '../errors.js';

/** The source's host key is unknown, changed or revoked: nothing is sent, not even credentials. */
export class HostKeyError extends FerryError {
  readonly code = 'HOST_KEY';
}

/**
 * Connecting, authenticating or starting the agent on the source failed, or the connection was lost.
 * Transient: the network or the source may recover, and a retried job resumes from its journal.
 */
export class SourceConnectionError extends FerryError {
  readonly code = 'SOURCE_CONNECTION';
  readonly transient = true;
}

/**
 * The capture could not reach a consistent image: the source kept changing, or a freeze outlived its timeout.
 * Transient: a later attempt, when the source is quieter, fetches only the changes.
 */
export class CaptureConsistencyError extends FerryError {
  readonly code = 'CAPTURE_CONSISTENCY';
  readonly transient = true;
}

/** End-to-end verification failed: a chunk of the destination does not hash to what the source holds. */
export class VerificationError extends FerryError {
  readonly code = 'VERIFICATION_FAILED';
}
