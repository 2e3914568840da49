import { UnsupportedFeatureError } from '../errors.js';
import type { CheckReport } from './format.js';
import { probeFormat } from './open.js';
import { findDriver } from './registry.js';

export interface CheckResult extends CheckReport {
  filename: string;
  format: string;
}

/** Consistency check of one image file (qemu-img check, without repair). */
export async function checkImage(path: string, format?: string): Promise<CheckResult> {
  const driver = format ? findDriver(format) : await probeFormat(path);
  if (!driver.check) throw new UnsupportedFeatureError(`format ${driver.name} does not support checks`, { file: path, field: 'format' });
  return { filename: path, format: driver.name, ...(await driver.check(path)) };
}
