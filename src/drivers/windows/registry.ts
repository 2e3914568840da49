import { execFile } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import { InjectionError } from '../errors.js';
import type { Hive, RegistryValue } from '../types.js';

const run = promisify(execFile);

/**
 * Offline registry access through hivex's command-line tools on hive files downloaded from the guest:
 * `hivexregedit --export` to read a key, `hivexregedit --merge` to apply a .reg file. Keys are written
 * relative to the hive root with backslashes ("ControlSet001\\Services\\viostor").
 */
export type RegistryKeyValues = Map<string, RegistryValue>;

/** The values of one key (not its subkeys), or null when the key does not exist. */
export async function readKey(hiveFile: string, key: string): Promise<RegistryKeyValues | null> {
  return (await readTree(hiveFile, key)).get('') ?? null;
}

/** A key and all its subkeys: path (relative to `key`, "" for itself) → values. Empty when absent. */
export async function readTree(hiveFile: string, key: string): Promise<Map<string, RegistryKeyValues>> {
  let stdout: string;
  try {
    ({ stdout } = await run('hivexregedit', ['--export', hiveFile, '\\' + key], { maxBuffer: 256 * 1024 * 1024 }));
  } catch (err) {
    if (/path not found/.test(String((err as { stderr?: string }).stderr ?? ''))) return new Map();
    throw new InjectionError(`cannot read registry key ${key}: ${(err as Error).message}`, { file: hiveFile });
  }
  const prefix = ('\\' + key).toLowerCase();
  const tree = new Map<string, RegistryKeyValues>();
  for (const [section, values] of parseRegSections(stdout)) {
    const lower = section.toLowerCase();
    if (lower === prefix || lower.startsWith(prefix + '\\')) tree.set(section.slice(prefix.length).replace(/^\\/, ''), values);
  }
  return tree;
}

/** Names of the direct subkeys of a key. */
export async function subkeys(hiveFile: string, key: string): Promise<string[]> {
  return [...(await readTree(hiveFile, key)).keys()].filter((k) => k !== '' && !k.includes('\\'));
}

/** Parses the values of section `[key]` of a hivexregedit export. */
export function parseRegExport(text: string, key: string): RegistryKeyValues | null {
  const wanted = key.toLowerCase();
  for (const [section, values] of parseRegSections(text)) if (section.toLowerCase() === wanted) return values;
  return null;
}

/** Every section of a .reg text, in order: key path → its values. */
function parseRegSections(text: string): Map<string, RegistryKeyValues> {
  const sections = new Map<string, RegistryKeyValues>();
  let current: RegistryKeyValues | undefined;
  for (const line of text.replace(/\\\r?\n\s*/g, '').split(/\r?\n/)) {
    if (line.startsWith('[') && line.endsWith(']')) {
      current = new Map();
      sections.set(line.slice(1, -1), current);
      continue;
    }
    const m = current && /^(@|"((?:[^"\\]|\\.)*)")=(.*)$/.exec(line);
    if (!m) continue;
    const name = m[1] === '@' ? '' : m[2]!.replace(/\\(.)/g, '$1');
    current!.set(name, decodeValue(m[3]!));
  }
  return sections;
}

function decodeValue(text: string): RegistryValue {
  if (text.startsWith('dword:')) return { type: 'REG_DWORD', data: parseInt(text.slice(6), 16) };
  if (text.startsWith('"')) return { type: 'REG_SZ', data: text.slice(1, -1).replace(/\\(.)/g, '$1') };
  const m = /^hex(?:\(([0-9a-f]+)\))?:(.*)$/i.exec(text);
  const bytes = Buffer.from((m?.[2] ?? '').split(',').filter(Boolean).map((h) => parseInt(h, 16)));
  const type = m?.[1] === undefined ? 3 : parseInt(m[1], 16);
  const utf16 = () => bytes.toString('utf16le');
  switch (type) {
    case 1:
      return { type: 'REG_SZ', data: utf16().replace(/\0+$/, '') };
    case 2:
      return { type: 'REG_EXPAND_SZ', data: utf16().replace(/\0+$/, '') };
    case 4:
      return { type: 'REG_DWORD', data: bytes.readUInt32LE(0) };
    case 7:
      return { type: 'REG_MULTI_SZ', data: utf16().replace(/\0+$/, '').split('\0').filter((s) => s !== '') };
    default:
      return { type: 'REG_BINARY', data: bytes.toString('hex') };
  }
}

export interface RegistryEdit {
  key: string;
  name: string;
  value: RegistryValue;
}

/**
 * A .reg file setting `edits` in `hive`. hivexregedit only creates a key whose parent exists, so every
 * ancestor of an edited key gets its own (empty) section first; merging an empty section into an
 * existing key changes nothing.
 */
export function toRegFile(hive: Hive, edits: RegistryEdit[]): string {
  const sections = new Map<string, RegistryEdit[]>();
  for (const edit of edits) {
    const parts = edit.key.split('\\');
    for (let i = 1; i <= parts.length; i++) {
      const k = parts.slice(0, i).join('\\');
      if (!sections.has(k)) sections.set(k, []);
    }
    sections.get(edit.key)!.push(edit);
  }
  const out = ['Windows Registry Editor Version 5.00', ''];
  for (const [key, values] of sections) {
    out.push(`[HKEY_LOCAL_MACHINE\\${hive}\\${key}]`);
    for (const v of values) out.push(`${v.name === '' ? '@' : `"${escape(v.name)}"`}=${encodeValue(v.value)}`);
    out.push('');
  }
  return out.join('\r\n');
}

function escape(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/"/g, '\\"');
}

function hex(bytes: Buffer): string {
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join(',');
}

function encodeValue(v: RegistryValue): string {
  switch (v.type) {
    case 'REG_SZ':
      return `"${escape(v.data)}"`;
    case 'REG_EXPAND_SZ':
      return `hex(2):${hex(Buffer.from(v.data + '\0', 'utf16le'))}`;
    case 'REG_MULTI_SZ':
      return `hex(7):${hex(Buffer.from(v.data.map((s) => s + '\0').join('') + '\0', 'utf16le'))}`;
    case 'REG_DWORD':
      return `dword:${(v.data >>> 0).toString(16).padStart(8, '0')}`;
    case 'REG_BINARY':
      return `hex:${hex(Buffer.from(v.data, 'hex'))}`;
  }
}

/** Applies edits to a local hive file. */
export async function mergeIntoHive(hiveFile: string, hive: Hive, edits: RegistryEdit[], regFile: string): Promise<void> {
  await writeFile(regFile, toRegFile(hive, edits));
  try {
    await run('hivexregedit', ['--merge', '--prefix', `HKEY_LOCAL_MACHINE\\${hive}`, hiveFile, regFile]);
  } catch (err) {
    throw new InjectionError(`hivexregedit could not merge the ${hive} changes: ${String((err as { stderr?: string }).stderr ?? err).trim()}`, { file: hiveFile });
  }
}

export function sameValue(a: RegistryValue | null | undefined, b: RegistryValue): boolean {
  return !!a && a.type === b.type && JSON.stringify(a.data) === JSON.stringify(b.data);
}
