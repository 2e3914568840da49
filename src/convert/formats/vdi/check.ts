import { open } from 'node:fs/promises';
import type { CheckReport } from '../../format.js';
import { readFully } from '../../output-file.js';
import { PAGE_ENTRIES, firstUnreadableEntry, pageCount, readPage, unreadableReason } from './block-map.js';
import { BLOCK_DISCARDED, HEADER_BYTES, parseHeader } from './layout.js';

/** Reports beyond this many are summarised: a wrecked map should not print millions of lines. */
const MAX_LISTED = 100;

/**
 * What `qemu-img check` verifies for VDI: every allocated block map entry names a distinct data block, and
 * their count equals blocks_allocated. Entries Ferry's reader would refuse (beyond blocks_allocated, past
 * the end of the file) are corruptions too. VDI has no reference counts, so nothing can leak.
 */
export async function checkVdi(path: string): Promise<CheckReport> {
  const handle = await open(path, 'r');
  try {
    const { size } = await handle.stat();
    const head = Buffer.alloc(Math.min(size, HEADER_BYTES));
    await readFully(handle, head, 0, head.length, 0);
    const h = parseHeader(head, size, path);
    // One bit per data block: at most 2^29 blocks, 64 MiB.
    const used = new Uint8Array(Math.ceil(h.blocksInImage / 8));
    const corruptions: string[] = [];
    let problems = 0;
    const report = (message: string) => {
      if (problems++ < MAX_LISTED) corruptions.push(`ERROR: ${message}`);
    };
    let allocated = 0;
    const limit = firstUnreadableEntry(h, size);
    for (let p = 0; p < pageCount(h); p++) {
      const entries = await readPage(handle, h, p, path);
      for (let i = 0; i < entries.length; i++) {
        const block = p * PAGE_ENTRIES + i;
        const entry = entries[i];
        if (entry >= BLOCK_DISCARDED) continue;
        // Counted as QEMU counts them: entries that could name a data block at all.
        if (entry < h.blocksInImage) allocated++;
        if (entry >= limit) {
          report(unreadableReason(block, entry, h));
          continue;
        }
        if (used[entry >>> 3] & (1 << (entry & 7))) report(`data block ${entry} is used again by block map entry ${block}`);
        used[entry >>> 3] |= 1 << (entry & 7);
      }
    }
    if (allocated !== h.blocksAllocated) report(`allocated blocks mismatch: the block map has ${allocated}, the header says ${h.blocksAllocated}`);
    if (problems > MAX_LISTED) corruptions.push(`ERROR: ${problems - MAX_LISTED} more problems not listed`);
    return {
      corruptions,
      leaks: [],
      leakedClusters: 0,
      allocatedClusters: allocated,
      totalClusters: h.blocksInImage,
      imageEndOffset: h.offsetData + h.blocksAllocated * h.blockSize,
    };
  } finally {
    await handle.close();
  }
}
