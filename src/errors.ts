/**
 * Typed errors. Every failure a user can cause (a bad image, a bad option, an unsafe reference) is one of
 * these, so the CLI prints one line and the API maps it to problem+json without guessing.
 */
export abstract class FerryError extends Error {
  abstract readonly code: string;
  /** The file the problem is in, when there is one. */
  readonly file?: string;
  /** The on-disk field or option at fault, e.g. "l1_size". */
  readonly field?: string;

  constructor(message: string, opts: { file?: string; field?: string; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.file = opts.file;
    this.field = opts.field;
  }

  /** One line for a terminal: "FILE: message". */
  describe(): string {
    return this.file ? `${this.file}: ${this.message}` : this.message;
  }
}

/** The image violates its format: truncated, out-of-range tables, bad checksums, flagged corrupt. */
export class CorruptImageError extends FerryError {
  readonly code = 'CORRUPT_IMAGE';
}

/** A valid image that uses something Ferry does not implement (encryption, an unknown feature bit). */
export class UnsupportedFeatureError extends FerryError {
  readonly code = 'UNSUPPORTED_FEATURE';
}

/** A backing file, data file or extent that resolves outside the image's folder, or a backing loop. */
export class UnsafeReferenceError extends FerryError {
  readonly code = 'UNSAFE_REFERENCE';
}

/** A bad command-line or API option (unknown -o key, invalid value, missing size). */
export class InvalidOptionError extends FerryError {
  readonly code = 'INVALID_OPTION';
}

/** No driver recognises the image, or an unknown format name was given. */
export class UnknownFormatError extends FerryError {
  readonly code = 'UNKNOWN_FORMAT';
}

/** The operation was cancelled through its AbortSignal. */
export class CancelledError extends FerryError {
  readonly code = 'CANCELLED';
}

/** Converts a 64-bit on-disk value to a JS number, refusing anything past 2^53. */
export function safeNumber(value: bigint, file: string, field: string): number {
  if (value < 0n || value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(`${field} ${value} is out of range`, { file, field });
  }
  return Number(value);
}

/** Returns the message of anything thrown, for logs and one-line errors. */
export function errorMessage(err: unknown): string {
  if (err instanceof FerryError) return err.describe();
  if (err instanceof Error) return err.message;
  return String(err);
}
