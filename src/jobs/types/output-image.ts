import { Type } from 'typebox';
import { resolveOptions } from '../../convert/options.js';
import { findDriver } from '../../convert/registry.js';
import { InvalidOptionError } from '../../errors.js';

/** A path in a job request: relative to the data dir, checked by resolvePath before use. */
export const RelativePath = Type.String({ minLength: 1, maxLength: 4096, description: 'a path relative to the data dir' });

/** The fields that say how a job writes an image, shared by every job type that writes one. */
export const OutputImageFields = {
  format: Type.String({ minLength: 1, description: 'output format (ferry formats lists them)' }),
  options: Type.Optional(
    Type.Record(Type.String(), Type.Union([Type.String(), Type.Number(), Type.Boolean()]), {
      description: 'creation options, as with -o: {"cluster_size":"2M","compat":"1.1"}',
    }),
  ),
  compress: Type.Optional(Type.Boolean({ description: 'compress the output (-c)' })),
};

export interface OutputImage {
  format: string;
  options?: Record<string, string | number | boolean>;
  compress?: boolean;
}

/** The `-o` map the conversion takes: option values as the strings the CLI would pass. */
export function optionStrings(options: OutputImage['options']): Record<string, string> {
  return Object.fromEntries(Object.entries(options ?? {}).map(([k, v]) => [k, String(v)]));
}

/** The checks the conversion makes first, so a bad format or option is a 400 at submission, not a failed job. */
export function checkOutputImage(target: OutputImage): void {
  const driver = findDriver(target.format);
  if (!driver.create) throw new InvalidOptionError(`format ${driver.name} is read-only`, { field: 'target.format' });
  resolveOptions(driver.name, driver.createOptions, optionStrings(target.options));
  if (target.compress && !driver.compression) throw new InvalidOptionError(`format ${driver.name} does not support compression`, { field: 'target.compress' });
}
