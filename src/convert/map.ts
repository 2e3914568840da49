import type { Extent } from './disk.js';
import { openDisk } from './open.js';

/** One row of `map --output=json`, as qemu-img prints it. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

export interface MapOptions {
  format?: string;
  allowExternal?: boolean;
  start?: number;
  maxLength?: number;
}

/** The composed allocation map of an image and its backing chain. */
export async function* imageMap(path: string, opts: MapOptions = {}): AsyncIterable<MapEntry & { file?: string }> {
  const disk = await openDisk(path, { format: opts.format, allowExternal: opts.allowExternal });
  try {
    const start = opts.start ?? 0;
    const length = Math.min(disk.virtualSize - start, opts.maxLength ?? Infinity);
    let pending: (MapEntry & { file?: string }) | undefined;
    for await (const ext of disk.extents(start, Math.max(0, length))) {
      const entry = { ...toEntry(ext), file: ext.hostFile ?? disk.layers[ext.depth].path };
      if (pending && mergeable(pending, entry)) {
        pending.length += entry.length;
        continue;
      }
      if (pending) yield pending;
      pending = entry;
    }
    if (pending) yield pending;
  } finally {
    await disk.close();
  }
}

function toEntry(ext: Extent): MapEntry {
  const entry: MapEntry = {
    start: ext.offset,
    length: ext.length,
    depth: ext.depth,
    present: ext.kind !== 'unallocated',
    zero: ext.kind !== 'data',
    data: ext.kind === 'data',
  };
  if (ext.hostOffset !== undefined) entry.offset = ext.hostOffset;
  return entry;
}

function mergeable(a: MapEntry & { file?: string }, b: MapEntry & { file?: string }): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data || a.file !== b.file) return false;
  if (a.start + a.length !== b.start) return false;
  if (a.offset === undefined || b.offset === undefined) return a.offset === b.offset;
  return a.offset + a.length === b.offset;
}
