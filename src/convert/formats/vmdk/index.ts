import { InvalidOptionError } from '../../../errors.js';
import type { DiskWriter } from '../../disk.js';
import type { CreateRequest, FormatDriver } from '../../format.js';
import type { OptionSpec, OptionValues } from '../../options.js';
import { ADAPTER_TYPES, type AdapterType } from './descriptor.js';
import { COWD_MAGIC, SPARSE_MAGIC } from './layout.js';
import { VmdkLayer } from './reader.js';
import { SUBFORMATS, createVmdkWriter, type Subformat, type VmdkCreateOptions } from './writer.js';

/** ddb.toolsVersion qemu-img writes when none is given. */
const DEFAULT_TOOLS_VERSION = '2147483647';
const DEFAULT_HW_VERSION = '4';
const MAX_VERSION_LENGTH = 256;

const options: OptionSpec[] = [
  {
    name: 'subformat',
    type: 'enum',
    values: SUBFORMATS,
    default: 'monolithicSparse',
    description: 'monolithicSparse, streamOptimized (compressed, for OVF/vSphere), monolithicFlat, twoGbMaxExtentSparse or twoGbMaxExtentFlat',
  },
  { name: 'adapter_type', type: 'enum', values: ADAPTER_TYPES, default: 'ide', description: 'virtual adapter recorded in the descriptor; sets the geometry' },
  { name: 'hwversion', type: 'string', default: 'undefined', description: "VMware virtual hardware version for ddb.virtualHWVersion ('undefined' means 4)" },
  { name: 'toolsversion', type: 'string', description: `VMware tools version for ddb.toolsVersion (default ${DEFAULT_TOOLS_VERSION})` },
  { name: 'compat6', type: 'bool', default: false, description: 'VMDK version 6 image: hardware version 6' },
  { name: 'zeroed_grain', type: 'bool', default: false, description: 'enable zeroed-grain table entries (sparse subformats)' },
];

function createOptions(values: OptionValues, durable: boolean): VmdkCreateOptions {
  const bad = (field: string, msg: string) => new InvalidOptionError(msg, { field });
  const subformat = values.subformat as Subformat;
  const zeroedGrain = values.zeroed_grain === true;
  let hwVersion = values.hwversion === 'undefined' ? undefined : (values.hwversion as string | undefined);
  if (values.compat6 === true) {
    if (hwVersion !== undefined) throw bad('compat6', 'compat6 cannot be enabled with hwversion set');
    hwVersion = '6';
  }
  const toolsVersion = (values.toolsversion as string | undefined) ?? DEFAULT_TOOLS_VERSION;
  // Both end up inside quotes on a descriptor line, and the descriptor must fit its 10 KiB area.
  for (const [field, value] of [['hwversion', hwVersion], ['toolsversion', toolsVersion]] as const) {
    if (value !== undefined && /["\r\n\0]/.test(value)) throw bad(field, `${field} must not contain quotes or line breaks`);
    if (value !== undefined && value.length > MAX_VERSION_LENGTH) throw bad(field, `${field} is longer than ${MAX_VERSION_LENGTH} characters`);
  }
  if (zeroedGrain && (subformat === 'monolithicFlat' || subformat === 'twoGbMaxExtentFlat')) {
    throw bad('zeroed_grain', "flat images can't enable zeroed grain");
  }
  return { subformat, adapterType: values.adapter_type as AdapterType, hwVersion: hwVersion ?? DEFAULT_HW_VERSION, toolsVersion, zeroedGrain, durable };
}

/**
 * QEMU's test for a text descriptor: comment lines and lines of spaces may precede "version=1|2|3".
 * VMware's own first line, "# Disk DescriptorFile", is enough on its own.
 */
function looksLikeDescriptor(head: Buffer): boolean {
  const text = head.toString('latin1');
  if (text.startsWith('# Disk DescriptorFile')) return true;
  let at = 0;
  while (at < text.length) {
    if (text[at] === '#') {
      const nl = text.indexOf('\n', at);
      if (nl < 0) return false;
      at = nl + 1;
      continue;
    }
    const spaces = /^ +\r?\n/.exec(text.slice(at, at + 4096));
    if (spaces) {
      at += spaces[0].length;
      continue;
    }
    return /^version=[123]\r?\n/.test(text.slice(at, at + 12));
  }
  return false;
}

export const vmdkDriver: FormatDriver = {
  name: 'vmdk',
  aliases: [],
  description: 'VMware virtual disk: sparse, stream-optimized (OVF), flat and split variants; parent links',
  // qemu-img accepts -c for every subformat; only streamOptimized stores grains compressed (always).
  compression: true,
  createOptions: options,

  probe(head: Buffer): number {
    if (head.length >= 4) {
      const magic = head.readUInt32BE(0);
      if (magic === SPARSE_MAGIC || magic === COWD_MAGIC) return 100;
    }
    return looksLikeDescriptor(head) ? 100 : 0;
  },

  open: (path, ctx) => VmdkLayer.open(path, ctx),

  create(req: CreateRequest): Promise<DiskWriter> {
    return createVmdkWriter(req.path, req.virtualSize, createOptions(req.options, req.durable ?? false));
  },
};
