import { UnsupportedFeatureError } from '../errors.js';
import type { Extent } from './disk.js';
import type { MeasureResult } from './format.js';
import { openDisk } from './open.js';
import { resolveOptions } from './options.js';
import { findDriver } from './registry.js';

export interface MeasureRequest {
  targetFormat: string;
  options?: Record<string, string>;
  /** Measure converting this image ... */
  source?: string;
  sourceFormat?: string;
  allowExternal?: boolean;
  /** ... or a new empty image of this size. */
  size?: number;
}

/** How large an image in `targetFormat` would be: qemu-img measure. */
export async function measureImage(req: MeasureRequest): Promise<MeasureResult> {
  const driver = findDriver(req.targetFormat);
  if (!driver.measure) throw new UnsupportedFeatureError(`format ${driver.name} cannot be measured`, { field: 'format' });
  const options = resolveOptions(driver.name, driver.createOptions, req.options ?? {});
  if (!req.source) {
    const size = req.size ?? 0;
    return driver.measure(size, emptyExtents(size), options);
  }
  const disk = await openDisk(req.source, { format: req.sourceFormat, allowExternal: req.allowExternal });
  try {
    return await driver.measure(disk.virtualSize, disk.extents(), options);
  } finally {
    await disk.close();
  }
}

async function* emptyExtents(size: number): AsyncIterable<Extent> {
  if (size > 0) yield { offset: 0, length: size, kind: 'unallocated', depth: 0 };
}
