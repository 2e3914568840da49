import { stat } from 'node:fs/promises';
import { Type, type Static } from 'typebox';
import { convertImage } from '../../convert/convert.js';
import { findDriver } from '../../convert/registry.js';
import { MissingInputError } from '../errors.js';
import type { RunnableJobHandler } from '../handler.js';
import { checkOutputImage, optionStrings, OutputImageFields, RelativePath } from './output-image.js';

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
    target: Type.Object({ path: RelativePath, ...OutputImageFields }, { additionalProperties: false }),
  },
  { additionalProperties: false, title: 'ConvertJob', description: 'convert one image to another format' },
);
export type ConvertJob = Static<typeof ConvertJobSchema>;

export const convertJob: RunnableJobHandler<ConvertJob> = {
  type: 'convert',
  summary: 'convert an image in the data dir to another format',
  schema: ConvertJobSchema,

  async check(spec, { resolvePath }) {
    checkOutputImage(spec.target);
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
