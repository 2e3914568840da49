import { availableParallelism } from 'node:os';
import { native } from '../../native.js';
import { subtractPages, type PageLedger } from '../ledger.js';
import type { DirtySliceSink, DirtyTracker } from '../types.js';

/** Pages hashed per task: 32 MiB of 4 KiB pages, small enough for the first dirty pages to go out early. */
const SLICE_PAGES = 8192;

/**
 * Dirty pages by content: every collection digests guest RAM (XXH64 per page, in slices on every core) and
 * reports the pages whose digest differs from the ledger — the version the destination holds. It needs
 * nothing from the kernel, and it is exact: a page written back to the value the destination already has is
 * not resent, and one changed between its collection and its read is caught next time.
 * Cost: one pass over the RAM the guest has touched, at memory speed, through the backend's shared read-only
 * mapping of the file (no copy). Holes of the file (memory the guest never wrote) are known zero without being
 * read; the file is asked where they are only in ranges that still had holes at the previous pass (asking
 * walks its pages too). Pages the caller already counts as dirty are not read either: at switchover, that is
 * the last round's dirty set, about to be sent anyway. Slices are reported in page order as they finish, so
 * while paused the last pages are sent during the pass rather than after it.
 */
export class PageHashTracker implements DirtyTracker {
  readonly method = 'page-hash';
  private ledger?: PageLedger;
  private readonly current: Uint32Array;
  private readonly skip: Uint8Array;
  /** Per page, 1 once a pass found it holding data: later passes read it without looking for holes first. */
  private readonly knownData: Uint8Array;

  /** `memory` maps all of fd (mapShared). */
  constructor(
    private readonly fd: number,
    private readonly memory: Uint8Array,
    private readonly pageSize: number,
    private readonly pageCount: number,
  ) {
    this.current = new Uint32Array(pageCount * 2);
    this.skip = new Uint8Array(pageCount);
    this.knownData = new Uint8Array(pageCount);
  }

  async start(ledger: PageLedger): Promise<void> {
    this.ledger = ledger;
  }

  async collect(onSlice?: DirtySliceSink, known?: Uint32Array): Promise<Uint32Array> {
    const { ledger, memory, skip } = this;
    if (!ledger) throw new Error('PageHashTracker.collect before start');
    const { pageSize, pageCount, current } = this;
    if (known) {
      skip.fill(0);
      for (const page of known) skip[page] = 1;
    }
    const slices = Math.ceil(pageCount / SLICE_PAGES);
    const hashed: Array<Promise<number>> = [];
    const hash = (i: number) => {
      const first = i * SLICE_PAGES;
      const count = Math.min(SLICE_PAGES, pageCount - first);
      const start = first * pageSize;
      const done = native.hashMappedPages(
        memory.subarray(start, start + count * pageSize),
        this.fd,
        start,
        pageSize,
        count,
        current.subarray(first * 2, (first + count) * 2),
        known ? skip.subarray(first, first + count) : undefined,
        this.knownData.subarray(first, first + count),
      );
      done.catch(() => undefined); // awaited in order below; a failure there must not leave the others unhandled
      return done;
    };
    // As many slices in flight as cores; each finished slice starts the next one.
    const inFlight = Math.max(1, availableParallelism());
    for (let i = 0; i < Math.min(inFlight, slices); i++) hashed.push(hash(i));
    const found: Uint32Array[] = [];
    let total = 0;
    let nextKnown = 0;
    for (let i = 0; i < slices; i++) {
      await hashed[i];
      if (i + inFlight < slices) hashed.push(hash(i + inFlight));
      const end = Math.min(pageCount, (i + 1) * SLICE_PAGES);
      // Compared only now, against the ledger as it stands: pages sent since the pass began count as sent.
      let pages = ledger.differing(current, i * SLICE_PAGES, end);
      if (known) {
        // Skipped pages kept stale digests: leave them out rather than report them by chance.
        let upTo = nextKnown;
        while (upTo < known.length && known[upTo] < end) upTo++;
        pages = subtractPages(pages, known.subarray(nextKnown, upTo));
        nextKnown = upTo;
      }
      found.push(pages);
      total += pages.length;
      onSlice?.(pages, end);
    }
    const all = new Uint32Array(total);
    let n = 0;
    for (const pages of found) {
      all.set(pages, n);
      n += pages.length;
    }
    return all;
  }

  async close(): Promise<void> {}
}
