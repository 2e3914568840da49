import { InvalidOptionError } from '../../../errors.js';
import type { DiskWriter } from '../../disk.js';
import type { CreateRequest, FormatDriver } from '../../format.js';
import type { OptionSpec } from '../../options.js';
import { OutputFile } from '../../output-file.js';
import { checkVdi } from './check.js';
import { TYPE_DYNAMIC, TYPE_STATIC, planGeometry, probeVdi } from './layout.js';
import { VdiLayer } from './reader.js';
import { VdiWriter } from './writer.js';

/** qemu-img's vdi options; its block size option is compiled out, so the block size is always 1 MiB. */
const options: OptionSpec[] = [{ name: 'static', type: 'bool', default: false, description: 'preallocate every block (a VirtualBox fixed-size image)' }];

export const vdiDriver: FormatDriver = {
  name: 'vdi',
  aliases: [],
  description: 'VirtualBox disk image: dynamic or static, 1 MiB blocks',
  compression: false,
  createOptions: options,

  probe: (head) => probeVdi(head),

  open: (path) => VdiLayer.open(path),

  async create(req: CreateRequest): Promise<DiskWriter> {
    if (req.compress) throw new InvalidOptionError('vdi images cannot be compressed', { field: 'compress' });
    // Planned first, so an oversized disk is refused before anything is written.
    const geometry = planGeometry(req.virtualSize);
    const out = await OutputFile.create(req.path);
    return new VdiWriter(out, req.virtualSize, geometry, req.options.static === true ? TYPE_STATIC : TYPE_DYNAMIC, req.durable ?? false);
  },

  check: (path) => checkVdi(path),
};
