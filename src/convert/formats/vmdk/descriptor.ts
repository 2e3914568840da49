/**
 * The VMDK text descriptor: header keys (CID, parentCID, createType, parentFileNameHint), extent lines and
 * the disk database. Parsing is bounded (size and extent count) because descriptors come from strangers;
 * rendering follows the text qemu-img writes, line for line.
 */
import { CorruptImageError } from '../../../errors.js';
import { SECTOR } from './layout.js';

/** QEMU reads at most this much of a descriptor; Ferry refuses anything longer instead of truncating it. */
export const MAX_DESCRIPTOR_BYTES = 1024 * 1024;
/** Enough for a twoGbMaxExtent disk of 8 TiB; every extent costs an open file. */
export const MAX_EXTENTS = 4096;

export type ExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS';

export interface ExtentLine {
  access: ExtentAccess;
  sectors: number;
  /** FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, ... as written (upper case). */
  type: string;
  /** Absent for ZERO extents. */
  file?: string;
  /** Start of the extent's data in its file, in sectors (FLAT). */
  offset: number;
  /** 1-based line number, for messages. */
  line: number;
}

export interface Descriptor {
  cid?: number;
  parentCid?: number;
  createType?: string;
  parentFileNameHint?: string;
  extents: ExtentLine[];
}

const ACCESS = new Set<string>(['RW', 'RDONLY', 'NOACCESS']);
const EXTENT_LINE = /^(\S+)\s+(\S+)\s+(\S+)(.*)$/;
const EXTENT_FILE = /^\s+"([^"\r\n]*)"(?:\s+(\S+))?\s*$/;
const KEY_VALUE = /^([A-Za-z][\w.]*)\s*=\s*(.*?)\s*$/;

/** Parses descriptor text; `file` names it in errors. Text after a NUL byte is padding and ignored. */
export function parseDescriptor(text: string, file: string): Descriptor {
  const nul = text.indexOf('\0');
  const body = nul >= 0 ? text.slice(0, nul) : text;
  const out: Descriptor = { extents: [] };
  const lines = body.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#')) continue;
    const extent = EXTENT_LINE.exec(line);
    if (extent && ACCESS.has(extent[1])) {
      if (out.extents.length >= MAX_EXTENTS) {
        throw new CorruptImageError(`descriptor lists more than ${MAX_EXTENTS} extents`, { file, field: 'extents' });
      }
      out.extents.push(parseExtentLine(extent, i + 1, line, file));
      continue;
    }
    const kv = KEY_VALUE.exec(line);
    if (!kv) continue;
    const value = unquote(kv[2]);
    switch (kv[1]) {
      case 'CID':
        out.cid = parseCid(value, 'CID', file);
        break;
      case 'parentCID':
        out.parentCid = parseCid(value, 'parentCID', file);
        break;
      case 'createType':
        out.createType = value;
        break;
      case 'parentFileNameHint':
        out.parentFileNameHint = value;
        break;
      default:
        break; // ddb.* and other keys only describe the virtual hardware
    }
  }
  return out;
}

function parseExtentLine(m: RegExpExecArray, lineNo: number, line: string, file: string): ExtentLine {
  const invalid = (why: string) => new CorruptImageError(`invalid extent line ${lineNo} (${why}): ${line.slice(0, 200)}`, { file, field: 'extent' });
  const [, access, sectorsText, type, rest] = m;
  if (!/^\d{1,16}$/.test(sectorsText)) throw invalid('size must be a number of sectors');
  const sectors = Number(sectorsText);
  if (sectors === 0 || sectors * SECTOR > Number.MAX_SAFE_INTEGER) throw invalid(`size of ${sectorsText} sectors is out of range`);
  const upper = type.toUpperCase();
  if (upper === 'ZERO') {
    if (rest.trim() !== '') throw invalid('a ZERO extent has no file');
    return { access: access as ExtentAccess, sectors, type: upper, offset: 0, line: lineNo };
  }
  const f = EXTENT_FILE.exec(rest);
  if (!f || f[1] === '') throw invalid('expected a quoted file name');
  let offset = 0;
  if (f[2] !== undefined) {
    if (!/^\d{1,16}$/.test(f[2])) throw invalid('offset must be a number of sectors');
    offset = Number(f[2]);
    if (offset * SECTOR > Number.MAX_SAFE_INTEGER) throw invalid(`offset of ${f[2]} sectors is out of range`);
  } else if (upper === 'FLAT') {
    throw invalid('a FLAT extent needs an offset');
  }
  return { access: access as ExtentAccess, sectors, type: upper, file: f[1], offset, line: lineNo };
}

function unquote(value: string): string {
  return value.length >= 2 && value.startsWith('"') && value.endsWith('"') ? value.slice(1, -1) : value;
}

function parseCid(value: string, field: string, file: string): number {
  if (!/^[0-9a-fA-F]{1,8}$/.test(value)) throw new CorruptImageError(`${field} '${value.slice(0, 40)}' is not a 32-bit hex number`, { file, field });
  return parseInt(value, 16);
}

/** Adapter types qemu-img accepts; all but IDE use VMware's 255-head geometry. */
export const ADAPTER_TYPES = ['ide', 'buslogic', 'lsilogic', 'legacyESX'] as const;
export type AdapterType = (typeof ADAPTER_TYPES)[number];

export interface DescriptorFields {
  cid: number;
  createType: string;
  /** Extent lines, each ending in a newline. */
  extentLines: string[];
  /** Virtual size in bytes, a multiple of 512. */
  size: number;
  hwVersion: string;
  adapterType: AdapterType;
  toolsVersion: string;
}

/** The descriptor text qemu-img writes for a new image without a parent. */
export function renderDescriptor(d: DescriptorFields): string {
  const heads = d.adapterType === 'ide' ? 16 : 255;
  const cylinders = Math.floor(d.size / (63 * heads * SECTOR));
  return (
    '# Disk DescriptorFile\n' +
    'version=1\n' +
    `CID=${d.cid.toString(16)}\n` +
    'parentCID=ffffffff\n' +
    `createType="${d.createType}"\n` +
    '\n' +
    '# Extent description\n' +
    d.extentLines.join('') +
    '\n' +
    '# The Disk Data Base\n' +
    '#DDB\n' +
    '\n' +
    `ddb.virtualHWVersion = "${d.hwVersion}"\n` +
    `ddb.geometry.cylinders = "${cylinders}"\n` +
    `ddb.geometry.heads = "${heads}"\n` +
    'ddb.geometry.sectors = "63"\n' +
    `ddb.adapterType = "${d.adapterType}"\n` +
    `ddb.toolsVersion = "${d.toolsVersion}"\n`
  );
}

export function sparseExtentLine(sectors: number, name: string): string {
  return `RW ${sectors} SPARSE "${name}"\n`;
}

export function flatExtentLine(sectors: number, name: string): string {
  return `RW ${sectors} FLAT "${name}" 0\n`;
}
