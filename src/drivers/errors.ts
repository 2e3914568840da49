import { FerryError } from '../errors.js';

/** A libguestfs command failed (the appliance did not start, a guest file could not be read, …). */
export class GuestFsError extends FerryError {
  readonly code = 'GUESTFS_FAILED';
}

/**
 * The guest must not be modified in its current state: a hibernated or Fast-Startup Windows (its
 * filesystem is mid-session and Windows would resume over our changes), or no operating system found.
 */
export class GuestNotFixableError extends FerryError {
  readonly code = 'GUEST_NOT_FIXABLE';
}

/** A step inside the guest failed: its initramfs tool exited non-zero, a driver is missing, … */
export class InjectionError extends FerryError {
  readonly code = 'INJECTION_FAILED';
}
