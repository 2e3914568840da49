import { InvalidOptionError } from '../errors.js';
import { parseSize } from '../util/size.js';

/** One creation option of a format (qemu-img's `-o name=value`). */
export interface OptionSpec {
  name: string;
  description: string;
  type: 'size' | 'int' | 'bool' | 'enum' | 'string';
  values?: readonly string[];
  /** Value used when the option is not given. */
  default?: string | number | boolean;
  /** Other spellings accepted for enum values, e.g. compat "v3" -> "1.1". */
  synonyms?: Readonly<Record<string, string>>;
}

export type OptionValue = string | number | boolean;
export type OptionValues = Record<string, OptionValue | undefined>;

/** Splits "a=1,b=x,,y" into pairs; ",," is a literal comma, as in qemu-img. */
export function splitOptionString(text: string): Array<[string, string]> {
  const pairs: Array<[string, string]> = [];
  let current = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === ',' && text[i + 1] === ',') {
      current += ',';
      i++;
    } else if (c === ',') {
      pairs.push(splitPair(current));
      current = '';
    } else current += c;
  }
  if (current !== '') pairs.push(splitPair(current));
  return pairs;
}

function splitPair(item: string): [string, string] {
  const eq = item.indexOf('=');
  if (eq <= 0) throw new InvalidOptionError(`option '${item}' must be written name=value`, { field: item });
  return [item.slice(0, eq).trim(), item.slice(eq + 1)];
}

/** Validates raw option strings against a format's specs and fills in defaults. */
export function resolveOptions(format: string, specs: readonly OptionSpec[], raw: Record<string, string>): OptionValues {
  const out: OptionValues = {};
  const byName = new Map(specs.map((s) => [s.name, s]));
  for (const [name, text] of Object.entries(raw)) {
    const spec = byName.get(name);
    if (!spec) {
      const known = specs.map((s) => s.name).join(', ') || 'none';
      throw new InvalidOptionError(`format ${format} has no option '${name}' (options: ${known})`, { field: name });
    }
    out[name] = parseValue(format, spec, text);
  }
  for (const spec of specs) if (out[spec.name] === undefined && spec.default !== undefined) out[spec.name] = spec.default;
  return out;
}

function parseValue(format: string, spec: OptionSpec, text: string): OptionValue {
  const bad = (why: string) => new InvalidOptionError(`${format} option ${spec.name}=${text}: ${why}`, { field: spec.name });
  switch (spec.type) {
    case 'size':
      return parseSize(text, spec.name);
    case 'int': {
      if (!/^-?\d+$/.test(text.trim())) throw bad('expected a whole number');
      return Number(text);
    }
    case 'bool': {
      const v = text.trim().toLowerCase();
      if (['on', 'true', 'yes', '1'].includes(v)) return true;
      if (['off', 'false', 'no', '0'].includes(v)) return false;
      throw bad('expected on or off');
    }
    case 'enum': {
      const v = spec.synonyms?.[text] ?? text;
      if (!spec.values?.includes(v)) throw bad(`expected one of ${spec.values?.join(', ')}`);
      return v;
    }
    case 'string':
      return text;
  }
}
