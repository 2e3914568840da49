/**
 * Dirty pages from the kernel's soft-dirty bits (Documentation/admin-guide/mm/soft-dirty.rst): writing "4"
 * to /proc/PID/clear_refs clears them, and bit 55 of each /proc/PID/pagemap entry is set again when the
 * process writes the page. Ferry reads the bits of QEMU's mapping of the guest RAM file.
 *
 * Many kernels are built without CONFIG_MEM_SOFT_DIRTY: clear_refs then still accepts "4" but bit 55 stays
 * 0. So support is probed by watching the running guest dirty its memory, never assumed from the files.
 *
 * Reading the bits and clearing them are two steps; a write between them would be lost. The collection
 * therefore holds the vCPUs stopped across both (a few milliseconds).
 */
import { open, readFile, readdir, realpath, writeFile } from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';
import type { PageLedger } from '../ledger.js';
import type { DirtySliceSink, DirtyTracker } from '../types.js';

const SOFT_DIRTY_BIT = 55n;

/** Where a process maps a file: virtual start address and length. */
export interface FileMapping {
  pid: number;
  start: number;
  length: number;
}

/** Finds the process mapping `path` from offset 0 over `length` bytes (QEMU's view of guest RAM). */
export async function findFileMapping(path: string, length: number): Promise<FileMapping | undefined> {
  const target = await realpath(path);
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let maps: string;
    try {
      maps = await readFile(`/proc/${entry}/maps`, 'utf8');
    } catch {
      continue; // exited, or not ours to read
    }
    for (const line of maps.split('\n')) {
      const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \d+\s+(.*)$/.exec(line);
      if (!m || m[4] !== target || parseInt(m[3], 16) !== 0) continue;
      const start = parseInt(m[1], 16);
      const end = parseInt(m[2], 16);
      if (end - start >= length) return { pid: Number(entry), start, length };
    }
  }
  return undefined;
}

/** Reads the soft-dirty bit of each page of the mapping. */
async function readSoftDirty(mapping: FileMapping, pageSize: number): Promise<Uint8Array> {
  const pages = Math.floor(mapping.length / pageSize);
  const entries = Buffer.alloc(pages * 8);
  const h = await open(`/proc/${mapping.pid}/pagemap`, 'r');
  try {
    let done = 0;
    while (done < entries.length) {
      const { bytesRead } = await h.read(entries, done, entries.length - done, (mapping.start / pageSize) * 8 + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
  } finally {
    await h.close();
  }
  const dirty = new Uint8Array(pages);
  for (let p = 0; p < pages; p++) dirty[p] = Number((entries.readBigUInt64LE(p * 8) >> SOFT_DIRTY_BIT) & 1n);
  return dirty;
}

async function clearSoftDirty(pid: number): Promise<void> {
  await writeFile(`/proc/${pid}/clear_refs`, '4');
}

/**
 * True when the kernel tracks soft-dirty bits for this mapping: clear them, let the (running) guest work for
 * `waitMs`, and look for any bit set. A kernel without the feature never sets one; an idle guest that wrote
 * nothing gives a false "no", which only costs speed (the page-hash tracker is used instead).
 */
export async function probeSoftDirty(mapping: FileMapping, pageSize: number, waitMs = 200): Promise<boolean> {
  try {
    await clearSoftDirty(mapping.pid);
    await delay(waitMs);
    return (await readSoftDirty(mapping, pageSize)).some((bit) => bit === 1);
  } catch {
    return false;
  }
}

/** Runs fn with the vCPUs held stopped (supplied by the backend, which knows the VM's run state). */
export type WithVcpusStopped = <T>(fn: () => Promise<T>) => Promise<T>;

export class SoftDirtyTracker implements DirtyTracker {
  readonly method = 'soft-dirty';

  constructor(
    private readonly mapping: FileMapping,
    private readonly pageSize: number,
    private readonly withVcpusStopped: WithVcpusStopped,
  ) {}

  async start(_ledger: PageLedger): Promise<void> {
    await clearSoftDirty(this.mapping.pid);
  }

  async collect(onSlice?: DirtySliceSink): Promise<Uint32Array> {
    const bits = await this.withVcpusStopped(async () => {
      const b = await readSoftDirty(this.mapping, this.pageSize);
      await clearSoftDirty(this.mapping.pid);
      return b;
    });
    const out: number[] = [];
    for (let p = 0; p < bits.length; p++) if (bits[p]) out.push(p);
    const dirty = Uint32Array.from(out);
    onSlice?.(dirty, bits.length);
    return dirty;
  }

  async close(): Promise<void> {}
}
