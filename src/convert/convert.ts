import { realpath } from 'node:fs/promises';
import { InvalidOptionError, UnsupportedFeatureError } from '../errors.js';
import type { DiskWriter } from './disk.js';
import { openDisk } from './open.js';
import { resolveOptions } from './options.js';
import { copyDisk, type PipelineOptions, type PipelineStats } from './pipeline.js';
import { findDriver } from './registry.js';

export interface ConvertRequest {
  source: string;
  sourceFormat?: string;
  target: string;
  targetFormat: string;
  /** Raw `-o` options, validated against the target format. */
  options?: Record<string, string>;
  compress?: boolean;
  /** fsync the output before renaming it into place. */
  durable?: boolean;
  allowExternal?: boolean;
  /** Write into an existing target instead of creating one (qemu-img convert -n). */
  noCreate?: boolean;
  pipeline?: PipelineOptions;
}

/** Converts one image to another format: the entry point shared by the CLI, jobs and capture. */
export async function convertImage(req: ConvertRequest): Promise<PipelineStats> {
  const driver = findDriver(req.targetFormat);
  const options = resolveOptions(driver.name, driver.createOptions, req.options ?? {});
  if (req.compress && !driver.compression) {
    throw new InvalidOptionError(`format ${driver.name} does not support compression (-c)`, { field: 'compress' });
  }
  const source = await openDisk(req.source, { format: req.sourceFormat, allowExternal: req.allowExternal });
  try {
    await refuseOverwritingSource(source.layers.map((l) => l.path), req.target);
    let writer: DiskWriter;
    if (req.noCreate) {
      if (!driver.openWriter) throw new UnsupportedFeatureError(`-n (write into an existing image) is not supported for ${driver.name} targets`, { field: 'n' });
      // qemu-img -c -n fails (EIO) on the first cluster the target already holds: refused up front instead.
      if (req.compress) throw new InvalidOptionError('-c cannot be combined with -n', { field: 'compress' });
      writer = await driver.openWriter(req.target, source.virtualSize, { allowExternal: req.allowExternal });
    } else {
      if (!driver.create) throw new UnsupportedFeatureError(`format ${driver.name} is read-only`, { field: 'format' });
      writer = await driver.create({ path: req.target, virtualSize: source.virtualSize, options, compress: req.compress ?? false, durable: req.durable });
    }
    try {
      const stats = await copyDisk(source, writer, req.pipeline);
      await writer.finish();
      return stats;
    } catch (err) {
      await writer.abort();
      throw err;
    }
  } finally {
    await source.close();
  }
}

/** The source is never written: refuse a target that is the source or any image in its chain. */
async function refuseOverwritingSource(sources: string[], target: string): Promise<void> {
  const real = await realpath(target).catch(() => undefined);
  if (!real) return;
  for (const s of sources) {
    if ((await realpath(s).catch(() => s)) === real) {
      throw new InvalidOptionError(`target ${target} is the source image (or in its backing chain); refusing to overwrite it`, { file: target });
    }
  }
}
