import { PageLedger, digestFilePages } from '../ledger.js';
import type { DirtyTracker } from '../types.js';

/**
 * Dirty pages by content: every collection digests all of guest RAM (XXH64 per page, on every core) and
 * reports the pages whose digest differs from the ledger — the version the destination holds. It needs
 * nothing from the kernel, and it is exact: a page written back to the value the destination already has
 * is not resent, and one changed between its collection and its read is caught next time.
 * Cost: one pass over RAM per round, at memory speed.
 */
export class PageHashTracker implements DirtyTracker {
  readonly method = 'page-hash';
  private ledger?: PageLedger;
  private readonly current: Uint32Array;

  constructor(
    private readonly fd: number,
    private readonly pageSize: number,
    private readonly pageCount: number,
  ) {
    this.current = new Uint32Array(pageCount * 2);
  }

  async start(ledger: PageLedger): Promise<void> {
    this.ledger = ledger;
  }

  async collect(): Promise<Uint32Array> {
    if (!this.ledger) throw new Error('PageHashTracker.collect before start');
    await digestFilePages(this.fd, this.pageSize, this.pageCount, this.current);
    return this.ledger.differing(this.current);
  }

  async close(): Promise<void> {}
}
