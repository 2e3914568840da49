import { InvalidOptionError } from '../errors.js';

const SUFFIX: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/** Parses a qemu-img style size: "4096", "64k", "1.5G", "2T" (binary units). */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*$/i.exec(text);
  if (!m) throw new InvalidOptionError(`invalid ${what} '${text}': expected a number with an optional k, M, G, T suffix`, { field: what });
  const value = Number(m[1]) * SUFFIX[m[2].toLowerCase()];
  if (!Number.isSafeInteger(value)) throw new InvalidOptionError(`${what} '${text}' is not a whole number of bytes below 2^53`, { field: what });
  return value;
}

/** Formats bytes as qemu-img does in human output: "1 GiB", "64 KiB", "1.5 GiB". */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let i = 0;
  let v = bytes;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  if (i === 0) return `${bytes} B`;
  const text = v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2).replace(/\.?0+$/, '');
  return `${text} ${units[i]}`;
}

export function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}

export function alignDown(value: number, alignment: number): number {
  return Math.floor(value / alignment) * alignment;
}
