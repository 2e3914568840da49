import { InvalidOptionError } from '../../../errors.js';
import type { DiskWriter, Extent } from '../../disk.js';
import type { CreateRequest, FormatDriver, MeasureResult } from '../../format.js';
import type { OptionSpec, OptionValues } from '../../options.js';
import { OutputFile } from '../../output-file.js';
import { checkQcow2 } from './check.js';
import { Qcow2InPlaceWriter } from './in-place-writer.js';
import { fullyAllocatedSize } from './geometry.js';
import { QCOW2_MAGIC } from './layout.js';
import { Qcow2Layer } from './reader.js';
import { Qcow2Writer, type Qcow2WriterOptions } from './writer.js';

const options: OptionSpec[] = [
  { name: 'compat', type: 'enum', values: ['0.10', '1.1'], synonyms: { v2: '0.10', v3: '1.1' }, default: '1.1', description: 'qcow2 version: 0.10 (v2, readable by very old QEMU) or 1.1 (v3)' },
  { name: 'cluster_size', type: 'size', default: 65536, description: 'cluster size, a power of two from 512 bytes to 2 MiB' },
  { name: 'refcount_bits', type: 'int', default: 16, description: 'width of a refcount entry: 1, 2, 4, 8, 16, 32 or 64 (v2 needs 16)' },
  { name: 'extended_l2', type: 'bool', default: false, description: 'split clusters into 32 subclusters allocated separately (v3, cluster_size >= 16k)' },
  { name: 'lazy_refcounts', type: 'bool', default: false, description: 'mark the image as using lazy refcounts (v3); Ferry always writes exact refcounts' },
  { name: 'compression_type', type: 'enum', values: ['zlib', 'zstd'], default: 'zlib', description: 'codec for compressed clusters (zstd needs v3)' },
  { name: 'compression_level', type: 'int', description: 'codec level for -c (Ferry extension): zlib 1-9 (default 6), zstd 1-19 (default 3)' },
  { name: 'backing_file', type: 'string', description: 'file name of a backing image, recorded in the header' },
  { name: 'backing_fmt', type: 'string', description: 'format of the backing image' },
];

function writerOptions(values: OptionValues, compress: boolean, durable = false): Qcow2WriterOptions {
  const version = values.compat === '0.10' ? 2 : 3;
  const clusterSize = values.cluster_size as number;
  const refcountBits = values.refcount_bits as number;
  const extendedL2 = values.extended_l2 === true;
  const compressionType = values.compression_type as 'zlib' | 'zstd';
  const bad = (field: string, msg: string) => new InvalidOptionError(msg, { field });
  if (clusterSize < 512 || clusterSize > 2 * 1024 * 1024 || (clusterSize & (clusterSize - 1)) !== 0) {
    throw bad('cluster_size', `cluster_size ${clusterSize} must be a power of two between 512 and 2M`);
  }
  if (![1, 2, 4, 8, 16, 32, 64].includes(refcountBits)) throw bad('refcount_bits', `refcount_bits ${refcountBits} must be a power of two up to 64`);
  if (version === 2 && refcountBits !== 16) throw bad('refcount_bits', 'compat=0.10 requires refcount_bits=16');
  if (version === 2 && extendedL2) throw bad('extended_l2', 'extended_l2 requires compat=1.1');
  if (version === 2 && compressionType !== 'zlib') throw bad('compression_type', 'compression_type=zstd requires compat=1.1');
  if (version === 2 && values.lazy_refcounts) throw bad('lazy_refcounts', 'lazy_refcounts requires compat=1.1');
  if (extendedL2 && clusterSize < 16384) throw bad('extended_l2', 'extended_l2 requires cluster_size of at least 16k');
  if (values.backing_fmt && !values.backing_file) throw bad('backing_fmt', 'backing_fmt needs backing_file');
  const level = (values.compression_level as number | undefined) ?? (compressionType === 'zstd' ? 3 : 6);
  if (compressionType === 'zlib' ? level < 1 || level > 9 : level < 1 || level > 19) {
    throw bad('compression_level', `compression_level ${level} out of range for ${compressionType}`);
  }
  return {
    version,
    clusterSize,
    refcountBits,
    extendedL2,
    lazyRefcounts: values.lazy_refcounts === true,
    compressionType,
    compress,
    compressionLevel: level,
    backingFile: values.backing_file as string | undefined,
    backingFormat: values.backing_fmt as string | undefined,
    durable,
  };
}

export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  aliases: [],
  description: 'QEMU copy-on-write v2/v3: sparse, compressed clusters, backing files',
  compression: true,
  createOptions: options,

  probe: (head) => (head.length >= 8 && head.readUInt32BE(0) === QCOW2_MAGIC && head.readUInt32BE(4) >= 2 ? 100 : 0),

  open: (path, ctx) => Qcow2Layer.open(path, ctx),

  async create(req: CreateRequest): Promise<DiskWriter> {
    const opts = writerOptions(req.options, req.compress, req.durable);
    const out = await OutputFile.create(req.path);
    try {
      return new Qcow2Writer(out, req.virtualSize, opts);
    } catch (err) {
      await out.discard();
      throw err;
    }
  },

  openWriter: (path, virtualSize, opts) => Qcow2InPlaceWriter.open(path, virtualSize, { allowExternal: opts?.allowExternal }),

  /** As qemu-img measure: allocated data rounded to clusters, plus fully-allocated metadata. */
  async measure(virtualSize: number, allocated: AsyncIterable<Extent>, values: OptionValues): Promise<MeasureResult> {
    const opts = writerOptions(values, false);
    const cs = opts.clusterSize;
    let required = 0;
    let countedUpTo = 0;
    for await (const ext of allocated) {
      if (ext.kind !== 'data') continue;
      const start = Math.max(ext.offset, countedUpTo);
      const end = ext.offset + ext.length;
      if (start >= end) continue;
      const roundedEnd = Math.ceil(end / cs) * cs;
      required += roundedEnd - (start - (start % cs));
      countedUpTo = roundedEnd;
    }
    const fullyAllocated = fullyAllocatedSize(virtualSize, cs, opts.refcountBits, opts.extendedL2);
    return { required: fullyAllocated - virtualSize + required, fullyAllocated };
  },

  check: (path) => checkQcow2(path),
};
