import { UnknownFormatError } from '../errors.js';
import type { FormatDriver } from './format.js';
import { qcow2Driver } from './formats/qcow2/index.js';
import { rawDriver } from './formats/raw.js';
import { vhdxDriver } from './formats/vhdx/index.js';
import { vhdDriver } from './formats/vhd/index.js';
import { vdiDriver } from './formats/vdi/index.js';
import { vmdkDriver } from './formats/vmdk/index.js';

/** Every format Ferry knows. Adding a format is its own folder plus one line here. */
export const formatDrivers: readonly FormatDriver[] = [qcow2Driver, vdiDriver, vhdDriver, vhdxDriver, vmdkDriver, rawDriver];

export function findDriver(name: string): FormatDriver {
  const lower = name.toLowerCase();
  const driver = formatDrivers.find((d) => d.name === lower || d.aliases.includes(lower));
  if (!driver) {
    throw new UnknownFormatError(`unknown format '${name}' (known: ${formatDrivers.map((d) => d.name).join(', ')})`, { field: 'format' });
  }
  return driver;
}

/** The driver whose probe is most certain about `head`; raw claims anything with the lowest score. */
export function probeDriver(head: Buffer, fileSize: number, tail: Buffer): FormatDriver {
  let best = formatDrivers[formatDrivers.length - 1];
  let bestScore = 0;
  for (const d of formatDrivers) {
    const score = d.probe(head, fileSize, tail);
    if (score > bestScore) {
      best = d;
      bestScore = score;
    }
  }
  return best;
}
