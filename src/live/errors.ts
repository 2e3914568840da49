import { FerryError } from '../errors.js';

/** A live migration failed: protocol error, lost peer, refused by the destination, memory mismatch. */
export class MigrationError extends FerryError {
  readonly code = 'MIGRATION_FAILED';
}

/** The policy gave up: the VM dirties memory faster than it can be sent within the limits. */
export class MigrationNotConvergingError extends FerryError {
  readonly code = 'MIGRATION_NOT_CONVERGING';
}

/**
 * The destination was told to resume but did not confirm. The source is left paused: resuming it could run
 * the VM twice, which is worse than running it nowhere until an operator looks.
 */
export class HandoverInDoubtError extends FerryError {
  readonly code = 'MIGRATION_HANDOVER_IN_DOUBT';
}
