import { open, type FileHandle } from 'node:fs/promises';
import { CorruptImageError, InvalidOptionError } from '../../errors.js';
import { native } from '../../native.js';
import type { DiskWriter, Extent, FormatDetails, ImageLayer } from '../disk.js';
import type { CreateRequest, FormatDriver, MeasureResult } from '../format.js';
import { OutputFile, readFully } from '../output-file.js';
import { fileRuns } from '../sparse-file.js';
import type { OptionValues } from '../options.js';

class RawLayer implements ImageLayer {
  readonly format = 'raw';
  constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    readonly virtualSize: number,
  ) {}

  get dataFd(): number {
    return this.handle.fd;
  }

  /** Data where the filesystem has blocks, zeroes in holes: found with SEEK_DATA/SEEK_HOLE, never by reading. */
  async *blockStatus(offset: number, length: number): AsyncIterable<Extent> {
    for (const run of fileRuns(this.handle.fd, offset, offset + length)) {
      yield { offset: run.start, length: run.end - run.start, kind: run.data ? 'data' : 'zero', depth: 0, hostOffset: run.start };
    }
  }

  async readAllocated(offset: number, length: number, into: Buffer, intoOffset: number): Promise<void> {
    const got = await readFully(this.handle, into, intoOffset, length, offset);
    if (got < length) into.fill(0, intoOffset + got, intoOffset + length);
  }

  details(): FormatDetails {
    return {};
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

class RawWriter implements DiskWriter {
  readonly granularity = 512;
  readonly sequential = false;
  readonly zeroInitialized = true;

  constructor(
    private readonly out: OutputFile,
    readonly virtualSize: number,
    private readonly durable: boolean,
  ) {}

  get path(): string {
    return this.out.finalPath;
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.out.writeAt(data, offset);
  }

  async writeZeroes(): Promise<void> {
    // A new sparse file already reads as zeroes.
  }

  finish(): Promise<void> {
    return this.out.commit(this.durable);
  }

  abort(): Promise<void> {
    return this.out.discard();
  }
}

/** Writes into an existing file in place (convert -n): zero ranges are punched out or overwritten. */
class RawInPlaceWriter implements DiskWriter {
  readonly granularity = 512;
  readonly sequential = false;
  readonly zeroInitialized = false;

  constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    readonly virtualSize: number,
  ) {}

  async write(offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) done += (await this.handle.write(data, done, data.length - done, offset + done)).bytesWritten;
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    if (native.punchHole(this.handle.fd, offset, length)) return;
    const zero = Buffer.alloc(Math.min(length, 4 * 1024 * 1024));
    for (let pos = offset; pos < offset + length; pos += zero.length) await this.write(pos, zero.subarray(0, Math.min(zero.length, offset + length - pos)));
  }

  async finish(): Promise<void> {
    await this.handle.close();
  }

  async abort(): Promise<void> {
    await this.handle.close();
  }
}

export const rawDriver: FormatDriver = {
  name: 'raw',
  aliases: ['img'],
  description: 'Raw disk image: the bytes of the disk, sparse where the filesystem allows',
  compression: false,
  createOptions: [],

  // Anything is a valid raw image, so raw only wins when no other driver claims the file.
  probe: () => 1,

  async open(path: string): Promise<ImageLayer> {
    const handle = await open(path, 'r');
    const { size } = await handle.stat();
    if (!Number.isSafeInteger(size)) throw new CorruptImageError('file size out of range', { file: path });
    return new RawLayer(path, handle, size);
  },

  async create(req: CreateRequest): Promise<DiskWriter> {
    if (req.compress) throw new InvalidOptionError('raw images cannot be compressed', { field: 'compress' });
    const out = await OutputFile.create(req.path);
    try {
      await out.handle.truncate(req.virtualSize);
    } catch (err) {
      await out.discard();
      throw err;
    }
    return new RawWriter(out, req.virtualSize, req.durable ?? false);
  },

  async openWriter(path: string, virtualSize: number): Promise<DiskWriter> {
    const handle = await open(path, 'r+');
    const { size } = await handle.stat();
    if (size < virtualSize) {
      await handle.close();
      throw new InvalidOptionError(`target ${path} is ${size} bytes, smaller than the source (${virtualSize} bytes)`, { file: path });
    }
    return new RawInPlaceWriter(path, handle, virtualSize);
  },

  // qemu-img reports the full size for raw either way: the file is that long, sparse or not.
  async measure(virtualSize: number, _allocated: AsyncIterable<Extent>, _options: OptionValues): Promise<MeasureResult> {
    return { required: virtualSize, fullyAllocated: virtualSize };
  },
};
