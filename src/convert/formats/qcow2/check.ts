import { open, type FileHandle } from 'node:fs/promises';
import { CorruptImageError } from '../../../errors.js';
import type { CheckReport } from '../../format.js';
import { readFully } from '../../output-file.js';
import { compressedRange, l2Entries, readHeader, readRefcount, type Qcow2Header } from './layout.js';

/** Checking needs a counter per host cluster; beyond this the image is too large to check in memory. */
const MAX_CHECK_CLUSTERS = 256 * 1024 * 1024;

/**
 * Recomputes every host cluster's reference count from the header, tables and snapshots and compares it
 * with the stored refcounts, as `qemu-img check` does: a stored count below the references is corruption,
 * above them a leak.
 */
export async function checkQcow2(path: string): Promise<CheckReport> {
  const handle = await open(path, 'r');
  try {
    return await new Checker(path, handle).run();
  } finally {
    await handle.close();
  }
}

class Checker {
  private h!: Qcow2Header;
  private fileSize = 0;
  private refs!: Uint32Array;
  private readonly corruptions: string[] = [];
  private readonly leaks: string[] = [];
  private allocated = 0;
  private fragmented = 0;
  private compressed = 0;
  private totalGuestClusters = 0;
  /** (l2 table offset, entry index) pairs whose COPIED flag must match refcount == 1. */
  private readonly copiedChecks: Array<{ cluster: number; copied: boolean; what: string }> = [];

  constructor(
    private readonly path: string,
    private readonly handle: FileHandle,
  ) {}

  async run(): Promise<CheckReport> {
    const { fileSize, header, extensions: ext } = await readHeader(this.handle, this.path);
    this.fileSize = fileSize;
    this.h = header;
    const cs = this.h.clusterSize;
    const nbClusters = Math.ceil(this.fileSize / cs);
    if (nbClusters > MAX_CHECK_CLUSTERS) throw new CorruptImageError(`image has ${nbClusters} clusters, too many to check`, { file: this.path });
    this.refs = new Uint32Array(nbClusters);
    this.totalGuestClusters = Math.ceil(this.h.virtualSize / cs);

    this.reference(0, cs, 'header');
    await this.countL1(this.h.l1TableOffset, this.h.l1Size, true);
    if (this.h.nbSnapshots) await this.countSnapshots();
    this.reference(this.h.refcountTableOffset, this.h.refcountTableClusters * cs, 'refcount table');
    if (ext.bitmaps) this.corruptions.push('persistent dirty bitmaps are present; Ferry does not check them');

    const stored = await this.readRefcounts();
    let leaked = 0;
    for (let i = 0; i < Math.max(this.refs.length, stored.length); i++) {
      const have = stored[i] ?? 0;
      const want = this.refs[i] ?? 0;
      if (have === want) continue;
      if (have < want) this.corruptions.push(`ERROR cluster ${i} refcount=${have} reference=${want}`);
      else {
        this.leaks.push(`Leaked cluster ${i} refcount=${have} reference=${want}`);
        leaked++;
      }
    }
    for (const c of this.copiedChecks) {
      const refcount = stored[c.cluster] ?? 0;
      if ((refcount === 1) !== c.copied) this.corruptions.push(`ERROR OFLAG_COPIED ${c.what}: offset=${c.cluster * cs} refcount=${refcount}`);
    }
    let end = 0;
    for (let i = stored.length - 1; i >= 0; i--) {
      if (stored[i]) {
        end = (i + 1) * cs;
        break;
      }
    }
    return {
      corruptions: this.corruptions,
      leaks: this.leaks,
      leakedClusters: leaked,
      allocatedClusters: this.allocated,
      totalClusters: this.totalGuestClusters,
      fragmentedClusters: this.fragmented,
      compressedClusters: this.compressed,
      imageEndOffset: end,
    };
  }

  private reference(offset: number, length: number, what: string): void {
    const cs = this.h.clusterSize;
    for (let c = Math.floor(offset / cs); c * cs < offset + length; c++) {
      if (c >= this.refs.length) {
        this.corruptions.push(`ERROR ${what} at ${offset} is outside the image`);
        return;
      }
      this.refs[c]++;
    }
  }

  private async countL1(l1Offset: number, l1Size: number, active: boolean): Promise<void> {
    const cs = this.h.clusterSize;
    if (l1Size === 0) return;
    this.reference(l1Offset, l1Size * 8, 'L1 table');
    const l1 = Buffer.alloc(l1Size * 8);
    await readFully(this.handle, l1, 0, l1.length, l1Offset);
    const entries = l2Entries(this.h);
    const stride = this.h.extendedL2 ? 16 : 8;
    const table = Buffer.alloc(cs);
    let lastHost = -1;
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const l2Offset = (hi & 0x00ffffff) * 2 ** 32 + (l1.readUInt32BE(i * 8 + 4) & 0xfffffe00);
      if (!l2Offset) continue;
      if (l2Offset % cs) {
        this.corruptions.push(`ERROR L2 table offset ${l2Offset} in L1 entry ${i} is not cluster aligned`);
        continue;
      }
      this.reference(l2Offset, cs, 'L2 table');
      if (active) this.copiedChecks.push({ cluster: l2Offset / cs, copied: (hi & 0x80000000) !== 0, what: `L2 table in L1 entry ${i}` });
      if (l2Offset + cs > this.fileSize) continue;
      await readFully(this.handle, table, 0, cs, l2Offset);
      for (let j = 0; j < entries; j++) {
        const eh = table.readUInt32BE(j * stride);
        const el = table.readUInt32BE(j * stride + 4);
        if (eh & 0x40000000) {
          const entry = (BigInt(eh) << 32n) | BigInt(el);
          const r = compressedRange(entry, this.h.clusterBits);
          this.reference(r.sectorStart, r.offset - r.sectorStart + r.length, 'compressed cluster');
          if (active) {
            this.allocated++;
            this.compressed++;
            this.fragmented++;
            lastHost = -1;
          }
          continue;
        }
        const host = (eh & 0x00ffffff) * 2 ** 32 + (el & 0xfffffe00);
        if (!host) continue;
        if (host % cs) {
          this.corruptions.push(`ERROR offset=${host}: data cluster is not properly aligned; L2 entry corrupted`);
          continue;
        }
        this.reference(host, cs, 'data cluster');
        if (active) {
          this.copiedChecks.push({ cluster: host / cs, copied: (eh & 0x80000000) !== 0, what: `data cluster at L2 ${l2Offset} entry ${j}` });
          this.allocated++;
          if (lastHost >= 0 && host !== lastHost + cs) this.fragmented++;
          lastHost = host;
        }
      }
    }
  }

  private async countSnapshots(): Promise<void> {
    const cs = this.h.clusterSize;
    let at = this.h.snapshotsOffset;
    const start = at;
    const fixed = Buffer.alloc(40);
    for (let i = 0; i < this.h.nbSnapshots; i++) {
      if ((await readFully(this.handle, fixed, 0, 40, at)) < 40) {
        this.corruptions.push(`ERROR snapshot table entry ${i} lies past the end of the file`);
        return;
      }
      const l1Offset = Number(fixed.readBigUInt64BE(0));
      const l1Size = fixed.readUInt32BE(8);
      const idLen = fixed.readUInt16BE(12);
      const nameLen = fixed.readUInt16BE(14);
      const extraLen = fixed.readUInt32BE(36);
      if (l1Offset % cs || l1Offset + l1Size * 8 > this.fileSize) this.corruptions.push(`ERROR snapshot ${i} L1 table out of range`);
      else await this.countL1(l1Offset, l1Size, false);
      at += 40 + extraLen + idLen + nameLen;
      at = Math.ceil(at / 8) * 8;
    }
    this.reference(start, at - start, 'snapshot table');
  }

  private async readRefcounts(): Promise<Uint32Array> {
    const h = this.h;
    const cs = h.clusterSize;
    const bits = 2 ** h.refcountOrder;
    const perBlock = (cs * 8) / bits;
    const table = Buffer.alloc(h.refcountTableClusters * cs);
    await readFully(this.handle, table, 0, table.length, h.refcountTableOffset);
    const stored = new Uint32Array(this.refs.length);
    const block = Buffer.alloc(cs);
    for (let i = 0; i < table.length / 8; i++) {
      const offset = Number(table.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
      if (!offset) continue;
      if (offset % cs || offset + cs > this.fileSize) {
        this.corruptions.push(`ERROR refcount block ${i} at ${offset} is invalid`);
        continue;
      }
      this.reference(offset, cs, 'refcount block');
      await readFully(this.handle, block, 0, cs, offset);
      for (let j = 0; j < perBlock; j++) {
        const cluster = i * perBlock + j;
        const v = readRefcount(block, j, bits);
        if (!v) continue;
        if (cluster >= stored.length) {
          this.leaks.push(`Leaked cluster ${cluster} refcount=${v} reference=0 (past the end of the file)`);
          continue;
        }
        stored[cluster] = v;
      }
    }
    return stored;
  }
}
