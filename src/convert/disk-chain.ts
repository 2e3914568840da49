import { native } from '../native.js';
import type { DiskReader, Extent, ImageLayer, ScannedRange } from './disk.js';

/**
 * A disk read through its backing chain, the way QEMU's block layer does it generically: each layer
 * reports its own allocation, and unallocated ranges fall through to the next layer (zeroes past the end
 * of a shorter backing image, or past the bottom of the chain).
 */
export class DiskChain implements DiskReader {
  constructor(readonly layers: readonly ImageLayer[]) {}

  get format(): string {
    return this.layers[0].format;
  }
  get path(): string {
    return this.layers[0].path;
  }
  get virtualSize(): number {
    return this.layers[0].virtualSize;
  }

  async *extents(offset = 0, length = this.virtualSize - offset): AsyncIterable<Extent> {
    let pending: Extent | undefined;
    for await (const ext of this.compose(0, offset, length)) {
      if (pending && canMerge(pending, ext)) {
        pending.length += ext.length;
        continue;
      }
      if (pending) yield pending;
      pending = { ...ext };
    }
    if (pending) yield pending;
  }

  private async *compose(depth: number, offset: number, length: number): AsyncIterable<Extent> {
    const layer = this.layers[depth];
    const next = this.layers[depth + 1];
    for await (const ext of layer.blockStatus(offset, length)) {
      if (ext.kind !== 'unallocated' || !next) {
        yield { ...ext, depth };
        continue;
      }
      const end = ext.offset + ext.length;
      const inBacking = Math.min(end, next.virtualSize);
      if (inBacking > ext.offset) yield* this.compose(depth + 1, ext.offset, inBacking - ext.offset);
      if (end > Math.max(inBacking, ext.offset)) {
        const from = Math.max(inBacking, ext.offset);
        yield { offset: from, length: end - from, kind: 'unallocated', depth };
      }
    }
  }

  async read(offset: number, length: number, into: Buffer): Promise<void> {
    for await (const ext of this.compose(0, offset, length)) {
      const at = ext.offset - offset;
      if (ext.kind === 'data') await this.layers[ext.depth].readAllocated(ext.offset, ext.length, into, at);
      else into.fill(0, at, at + ext.length);
    }
  }

  async readScanned(offset: number, length: number, into: Buffer, granularity: number): Promise<ScannedRange> {
    const direct = await this.singleHostRange(offset, length);
    if (direct) {
      const mapped = await native.mapScanned(direct.fd, direct.position, length, granularity);
      if (mapped) return { data: mapped.buffer, runs: mapped.runs, release: () => native.releaseMapping(mapped.buffer) };
      // Not wholly inside the file: read what is there, the rest reads as zeroes.
      const { bytesRead, runs } = await native.preadScan(direct.fd, into, length, direct.position, granularity);
      if (bytesRead === length) return { data: into.subarray(0, length), runs, release: noop };
      into.fill(0, bytesRead, length);
    } else {
      await this.read(offset, length, into);
    }
    return { data: into.subarray(0, length), runs: (await native.scanZeroes(into, length, granularity)).runs, release: noop };
  }

  /** The file range holding all of [offset, offset+length), when one plain contiguous range does. */
  private async singleHostRange(offset: number, length: number): Promise<{ fd: number; position: number } | undefined> {
    let found: { fd: number; position: number } | undefined;
    for await (const ext of this.compose(0, offset, length)) {
      const fd = ext.hostFd ?? this.layers[ext.depth].dataFd;
      if (found || ext.kind !== 'data' || ext.hostOffset === undefined || fd === undefined || ext.length !== length) return undefined;
      found = { fd, position: ext.hostOffset };
    }
    return found;
  }

  async close(): Promise<void> {
    await Promise.all(this.layers.map((l) => l.close()));
  }
}

const noop = () => undefined;

function canMerge(a: Extent, b: Extent): boolean {
  if (a.kind !== b.kind || a.depth !== b.depth || a.offset + a.length !== b.offset || a.hostFd !== b.hostFd) return false;
  if (a.hostOffset === undefined || b.hostOffset === undefined) return a.hostOffset === b.hostOffset;
  return a.hostOffset + a.length === b.hostOffset;
}
