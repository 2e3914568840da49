import { InvalidOptionError } from '../../../errors.js';
import type { DiskWriter } from '../../disk.js';
import type { CreateRequest, FormatDriver } from '../../format.js';
import type { OptionSpec, OptionValues } from '../../options.js';
import { OutputFile } from '../../output-file.js';
import { BLOCK_SIZE_MAX, FILE_SIGNATURE, MAX_VIRTUAL_SIZE, MiB } from './layout.js';
import { VhdxLayer } from './reader.js';
import { SECTOR_SIZE, VhdxWriter, type VhdxWriterOptions } from './writer.js';

const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

const options: OptionSpec[] = [
  { name: 'subformat', type: 'enum', values: ['dynamic', 'fixed'], default: 'dynamic', description: 'dynamic (blocks allocated as written) or fixed (every block preallocated)' },
  {
    name: 'block_size',
    type: 'size',
    default: 0,
    description: 'payload block size, rounded up to 1 MiB, at most 256 MiB, a power of two; 0 chooses by disk size as QEMU does',
  },
  { name: 'log_size', type: 'size', default: MiB, description: 'size of the metadata log, rounded up to 1 MiB' },
  {
    name: 'block_state_zero',
    type: 'bool',
    default: true,
    description: 'blocks that receive no data are marked ZERO; off leaves them NOT_PRESENT (dynamic) or FULLY_PRESENT over their preallocated zeroes (fixed)',
  },
];

/** Validates and completes options as qemu-img does: sizes rounded up to 1 MiB, the block size picked by disk size when 0. */
function writerOptions(values: OptionValues, virtualSize: number, durable: boolean): VhdxWriterOptions {
  const bad = (field: string, msg: string) => new InvalidOptionError(msg, { field });
  const diskSize = Math.ceil(virtualSize / SECTOR_SIZE) * SECTOR_SIZE;
  if (diskSize > MAX_VIRTUAL_SIZE) throw bad('size', `virtual size ${virtualSize} exceeds the VHDX limit of 64 TiB`);
  const logSize = Math.ceil((values.log_size as number) / MiB) * MiB;
  if (logSize < MiB) throw bad('log_size', 'log_size must be at least 1 MiB');
  if (logSize > 0xffffffff) throw bad('log_size', 'log_size must be smaller than 4 GiB');
  let blockSize = Math.min(BLOCK_SIZE_MAX, Math.ceil((values.block_size as number) / MiB) * MiB);
  if (blockSize === 0) {
    // QEMU's choice, meant to keep the BAT small.
    blockSize = diskSize > 32 * TiB ? 64 * MiB : diskSize > 100 * GiB ? 32 * MiB : diskSize > GiB ? 16 * MiB : 8 * MiB;
  }
  if ((blockSize & (blockSize - 1)) !== 0) throw bad('block_size', `block_size ${blockSize} must be a power of two`);
  return { fixed: values.subformat === 'fixed', blockSize, logSize, blockStateZero: values.block_state_zero !== false, durable };
}

export const vhdxDriver: FormatDriver = {
  name: 'vhdx',
  aliases: [],
  description: 'Hyper-V VHDX: dynamic, fixed and (read-only) differencing images',
  compression: false,
  createOptions: options,

  probe: (head) => (head.length >= 8 && head.toString('latin1', 0, 8) === FILE_SIGNATURE ? 100 : 0),

  open: (path, ctx) => VhdxLayer.open(path, ctx),

  check: (path) => VhdxLayer.check(path),

  async create(req: CreateRequest): Promise<DiskWriter> {
    const opts = writerOptions(req.options, req.virtualSize, req.durable ?? false);
    const out = await OutputFile.create(req.path);
    return new VhdxWriter(out, req.virtualSize, opts);
  },
};
