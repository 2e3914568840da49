import { InvalidOptionError } from '../../../errors.js';
import type { DiskWriter } from '../../disk.js';
import type { CreateRequest, FormatDriver } from '../../format.js';
import type { OptionSpec, OptionValues } from '../../options.js';
import { OutputFile } from '../../output-file.js';
import { DiskType, FOOTER_SIZE, hasFooterCookie, planSize, vhdChecksum } from './layout.js';
import { VhdLayer } from './reader.js';
import { VhdDynamicWriter, VhdFixedWriter, type VhdImagePlan } from './writer.js';

const MIB = 1024 * 1024;
const DEFAULT_BLOCK_SIZE = 2 * MIB;

// subformat and force_size have no declared default, so that azure=on can tell an explicit conflicting value.
const options: OptionSpec[] = [
  { name: 'subformat', type: 'enum', values: ['dynamic', 'fixed'], description: 'dynamic (sparse, the default) or fixed (the guest bytes followed by a footer)' },
  {
    name: 'force_size',
    type: 'bool',
    description: 'keep the exact size instead of rounding it up to a CHS geometry (off by default; on makes the image incompatible with Virtual PC)',
  },
  {
    name: 'block_size',
    type: 'size',
    default: DEFAULT_BLOCK_SIZE,
    description: 'block size of a dynamic disk, a power of two from 512k to 2M (Ferry extension; qemu always writes 2M)',
  },
  {
    name: 'azure',
    type: 'bool',
    default: false,
    description: 'an image Azure accepts (Ferry extension): fixed, force_size=on, size rounded up to a whole MiB with zeroes',
  },
];

/** Turns the creation options and the source size into the image to write, rounding as qemu-img does. */
function planImage(requestedSize: number, values: OptionValues): VhdImagePlan {
  const bad = (field: string, msg: string) => new InvalidOptionError(msg, { field });
  const azure = values.azure === true;
  if (azure && values.subformat === 'dynamic') throw bad('azure', 'azure=on writes a fixed VHD: it cannot be combined with subformat=dynamic');
  if (azure && values.force_size === false) throw bad('azure', 'azure=on needs the exact size: it cannot be combined with force_size=off');
  const fixed = azure || values.subformat === 'fixed';
  const forceSize = azure || values.force_size === true;
  const blockSize = values.block_size as number;
  if (blockSize < 512 * 1024 || blockSize > DEFAULT_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw bad('block_size', `block_size ${blockSize} must be a power of two from 512k to 2M`);
  }
  if (fixed && blockSize !== DEFAULT_BLOCK_SIZE) throw bad('block_size', 'block_size applies to dynamic VHDs only');
  // Azure wants whole MiB; the padding reads as zeroes.
  const size = azure ? Math.ceil(requestedSize / MIB) * MIB : requestedSize;
  const planned = planSize(size, forceSize);
  if (!planned) throw bad('size', `virtual size ${requestedSize} exceeds the VHD maximum of 2040 GiB`);
  return {
    diskType: fixed ? DiskType.Fixed : DiskType.Dynamic,
    virtualSize: planned.virtualSize,
    geometry: planned.geometry,
    creatorApp: forceSize ? 'qem2' : 'qemu',
    blockSize,
  };
}

/** A fixed disk has only its footer, at the end: recognised by a valid footer there describing a fixed disk. */
function isFixedFooter(tail: Buffer): boolean {
  return tail.length === FOOTER_SIZE && hasFooterCookie(tail) && tail.readUInt32BE(60) === DiskType.Fixed && tail.readUInt32BE(64) === vhdChecksum(tail, 64);
}

export const vhdDriver: FormatDriver = {
  name: 'vhd',
  aliases: ['vpc'],
  description: 'Microsoft Virtual Hard Disk (qemu "vpc"): fixed and dynamic, differencing read with its parent',
  compression: false,
  createOptions: options,

  // qemu only looks at offset 0 (dynamic disks start with a footer copy) and so takes fixed disks for raw;
  // Ferry also recognises the footer at the end, so the footer is never copied as guest data.
  probe: (head, _fileSize, tail) => (hasFooterCookie(head) || isFixedFooter(tail) ? 100 : 0),

  open: (path) => VhdLayer.open(path),

  async create(req: CreateRequest): Promise<DiskWriter> {
    if (req.compress) throw new InvalidOptionError('vhd images cannot be compressed', { field: 'compress' });
    const plan = planImage(req.virtualSize, req.options);
    const out = await OutputFile.create(req.path);
    try {
      if (plan.diskType === DiskType.Fixed) return await VhdFixedWriter.create(out, plan, req.durable ?? false);
      return new VhdDynamicWriter(out, plan, req.durable ?? false);
    } catch (err) {
      await out.discard();
      throw err;
    }
  },
};
