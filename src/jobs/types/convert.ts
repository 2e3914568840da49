import { stat } from 'node:fs/promises';
import { Type, type Static } from 'typebox';
import { convertImage } from '../../convert/convert.js';
import { resolveOptions } from '../../convert/options.js';
import { findDriver } from '../../convert/registry.js';
import { InvalidOptionError } from '../../errors.js';
import { MissingInputError } from '../errors.js';
import type { RunnableJobHandler } from '../handler.js';

const RelativePath = Type.String({ minLength: 1, maxLength: 4096, description: 'a path relative to the data dir' });

export const ConvertJobSchema = Type.Object(
  {
    type: Type.Literal('convert'),
    source: Type.Object(
      {
        path: RelativePath,
        format: Type.Optional(Type.String({ minLength: 1, description: 'source format; probed when omitted' })),
      },
      { additionalProperties: false },
    ),
    target: Type.Object(
      {
        path: RelativePath,
        format: Type.String({ minLength: 1, description: 'output format (ferry formats lists them)' }),
        options: Type.Optional(
          Type.Record(Type.String(), Type.Union([Type.String(), Type.Number(), Type.Boolean()]), {
            description: 'creation options, as with -o: {"cluster_size":"2M","compat":"1.1"}',
          }),
        ),
        compress: Type.Optional(Type.Boolean({ description: 'compress the output (-c)' })),
      },
      { additionalProperties: false },
    ),
  },
  { additionalProperties: false, title: 'ConvertJob', description: 'convert one image to another format' },
);
export type ConvertJob = Static<typeof ConvertJobSchema>;

/** The `-o` map convertImage takes: option values as the strings the CLI would pass. */
function optionStrings(options: ConvertJob['target']['options']): Record<string, string> {
  return Object.fromEntries(Object.entries(options ?? {}).map(([k, v]) => [k, String(v)]));
}

export const convertJob: RunnableJobHandler<ConvertJob> = {
  type: 'convert',
  summary: 'convert an image in the data dir to another format',
  schema: ConvertJobSchema,

  async check(spec, { resolvePath }) {
    // The same validation the conversion does first, so a bad format or option is a 400 now, not a failed job later.
    const driver = findDriver(spec.target.format);
    if (!driver.create) throw new InvalidOptionError(`format ${driver.name} is read-only`, { field: 'target.format' });
    resolveOptions(driver.name, driver.createOptions, optionStrings(spec.target.options));
    if (spec.target.compress && !driver.compression) throw new InvalidOptionError(`format ${driver.name} does not support compression`, { field: 'target.compress' });
    if (spec.source.format) findDriver(spec.source.format);
    const source = await resolvePath(spec.source.path, 'source.path');
    await resolvePath(spec.target.path, 'target.path');
    const info = await stat(source).catch(() => undefined);
    if (!info?.isFile()) throw new MissingInputError(`source.path '${spec.source.path}' is not a file in the data dir`, { field: 'source.path' });
  },

  stages: [
    {
      name: 'convert',
      outputs: (spec) => [spec.target.path],
      async run({ spec, resolvePath, signal, progress, log }) {
        const source = await resolvePath(spec.source.path, 'source.path');
        const target = await resolvePath(spec.target.path, 'target.path');
        log(`converting ${spec.source.path} to ${spec.target.format} ${spec.target.path}`);
        const stats = await convertImage({
          source,
          sourceFormat: spec.source.format,
          target,
          targetFormat: spec.target.format,
          options: optionStrings(spec.target.options),
          compress: spec.target.compress ?? false,
          // A job's output must survive a crash once the job says completed.
          durable: true,
          pipeline: { signal, onProgress: (p) => progress({ done: p.done, total: p.total }) },
        });
        const size = (await stat(target)).size;
        log(`converted ${stats.total} bytes (${stats.bytesWritten} written, ${stats.zeroBytes} zero) in ${(stats.elapsedMs / 1000).toFixed(2)} s`);
        return {
          path: spec.target.path,
          format: spec.target.format,
          size,
          virtualSize: stats.total,
          bytesRead: stats.bytesRead,
          bytesWritten: stats.bytesWritten,
          zeroBytes: stats.zeroBytes,
          elapsedMs: Math.round(stats.elapsedMs),
        };
      },
    },
  ],
};
