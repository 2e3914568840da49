import { InvalidOptionError } from '../errors.js';
import { splitOptionString } from '../convert/options.js';
import type { ProgressMode } from './progress.js';

/** Key under which `-o help` is recorded; not a valid option name, so it cannot clash. */
export const HELP = '-help';

/** Prints a format's creation options for `-o help`; returns true when it did. */
export async function printOptionsHelp(format: string, options: Record<string, string> | undefined): Promise<boolean> {
  if (!options || !(HELP in options)) return false;
  const { findDriver } = await import('../convert/registry.js');
  const driver = findDriver(format);
  const lines = [`Supported options for ${driver.name}:`];
  for (const spec of driver.createOptions) {
    const values = spec.values ? ` (${spec.values.join('|')})` : '';
    const def = spec.default !== undefined ? ` [default: ${spec.default}]` : '';
    lines.push(`  ${spec.name.padEnd(20)} <${spec.type}>${values} ${spec.description}${def}`);
  }
  if (!driver.createOptions.length) lines.push('  (none)');
  process.stdout.write(lines.join('\n') + '\n');
  return true;
}

/** Collects repeated `-o a=b,c=d` flags into one map, as qemu-img merges them. */
export function collectOptions(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const out = { ...previous };
  if (value.trim() === 'help' || value.trim() === '?') return { ...out, [HELP]: '' };
  for (const [k, v] of splitOptionString(value)) out[k] = v;
  return out;
}

export function progressMode(flagP: boolean | undefined, progress: string | undefined): ProgressMode {
  if (progress !== undefined) {
    if (progress === 'json') return 'json';
    if (progress === 'bar' || progress === 'human') return 'bar';
    if (progress === 'none') return 'none';
    throw new InvalidOptionError(`--progress must be bar, json or none, not '${progress}'`, { field: 'progress' });
  }
  return flagP ? 'bar' : 'none';
}

export function outputMode(value: string | undefined): 'human' | 'json' {
  const mode = value ?? 'human';
  if (mode !== 'human' && mode !== 'json') throw new InvalidOptionError(`--output must be human or json, not '${mode}'`, { field: 'output' });
  return mode;
}

export function parseCount(value: string, what: string, min: number, max: number): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < min || n > max) throw new InvalidOptionError(`${what} must be a whole number from ${min} to ${max}, not '${value}'`, { field: what });
  return n;
}
