import { FerryError } from '../errors.js';

/** The source's host key is unknown, changed or revoked: nothing is sent, not even credentials. */
export class HostKeyError extends FerryError {
  readonly code = 'HOST_KEY';
}

/** Connecting, authenticating or starting the agent on the source failed, or the connection was lost. */
export class SourceConnectionError extends FerryError {
  readonly code = 'SOURCE_CONNECTION';
}

/** The capture could not reach a consistent image: the source kept changing, or a freeze outlived its timeout. */
export class CaptureConsistencyError extends FerryError {
  readonly code = 'CAPTURE_CONSISTENCY';
}

/** End-to-end verification failed: a chunk of the destination does not hash to what the source holds. */
export class VerificationError extends FerryError {
  readonly code = 'VERIFICATION_FAILED';
}
