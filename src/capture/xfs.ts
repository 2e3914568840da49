/**
 * Free space of an XFS filesystem, read from each allocation group's free-space B+tree by block number
 * (bnobt), so a capture skips blocks no file uses. The source is hostile input: any field out of range,
 * a checksum mismatch, a loop or a tree that disagrees with itself makes the filesystem "unknown" (copied
 * whole), never a crash or a wrong skip.
 */
import { native } from '../native.js';
import type { ExtUsage } from './ext.js';
import { type ByteRange, type ReadAt, inParallel } from './ranges.js';

/** Same role and fields as ExtUsage; `needsRecovery` means the log may hold allocations the trees miss. */
export interface XfsUsage extends Omit<ExtUsage, 'type'> {
  type: 'xfs';
}

const SB_MAGIC = 0x58465342; // XFSB
const AGF_MAGIC = 0x58414746; // XAGF
const BNOBT_MAGIC_V4 = 0x41425442; // ABTB
const BNOBT_MAGIC_V5 = 0x41423342; // AB3B
const LOG_RECORD_MAGIC = 0xfeedbabe;
const TRANS_HEADER_MAGIC = 0x5452414e; // TRAN
const NULL_AGBLOCK = 0xffffffff;
const BB = 512;

const SB_VERSION_LOGV2 = 0x0400;
/** Incompatible features whose data-device layout is the AG layout read here. */
const KNOWN_INCOMPAT =
  0x1 | // ftype
  0x2 | // sparse inodes
  0x4 | // meta uuid
  0x8 | // bigtime
  0x20 | // large extent counters
  0x40 | // exchange range
  0x80; // parent pointers
const INCOMPAT_META_UUID = 0x4;
/** Log features whose records the log reader understands (extended attribute and mapping exchange intents). */
const KNOWN_LOG_INCOMPAT = 0x1 | 0x2;

const AG_MIN_BYTES = 1 << 24;
const AG_MAX_BYTES = 2 ** 40;
const MAX_AG_COUNT = 1 << 16;
/** The smallest AG (the last one may be shorter than the others) XFS makes: room for its headers and tree roots. */
const MIN_AG_BLOCKS = 64;
const MAX_TREE_LEVELS = 12;
/** B+tree blocks read in all, across AGs: a fragmented 16 TiB filesystem stays far below. */
const MAX_TREE_BYTES = 256 * 1024 * 1024;

/** Eight in-flight log buffers of the largest record size: where torn writes may sit around the head. */
const LOG_WINDOW_BBS = (8 * 256 * 1024) / BB;
const LOG_CYCLE_DATA_PER_HEADER = (32 * 1024) / BB;
const LOG_MAX_RECORD_BYTES = 256 * 1024;
/** An active log region larger than this is a busy log: treated as dirty without parsing it. */
const MAX_ACTIVE_LOG_BYTES = 16 * 1024 * 1024;
const LOG_CLIENT_TRANSACTION = 0x69;
const LOG_CLIENT_LOG = 0xaa;
const OP_START = 0x01;
const OP_COMMIT = 0x02;
const OP_CONTINUE = 0x04;
const OP_WAS_CONTINUED = 0x08;
const OP_END = 0x10;
const OP_UNMOUNT = 0x20;
const LOG_ITEM_BUF = 0x123c;
/** EFI through the mapping-exchange intents: every log item type Linux writes. */
const LOG_ITEM_FIRST = 0x1236;
const LOG_ITEM_LAST = 0x1249;
const LOG_FMT_BIG_ENDIAN = 2;

interface Geometry {
  v5: boolean;
  blockSize: number;
  sectSize: number;
  dblocks: number;
  agBlocks: number;
  agCount: number;
  agBlockLog: number;
  uuid: Buffer;
  logV2: boolean;
  /** Internal log in filesystem blocks (absolute, not AG-encoded); undefined for an external log. */
  log: { firstBlock: number; blocks: number } | undefined;
  logFeaturesKnown: boolean;
}

interface AgFreeSpace {
  /** Free extents [agbno, agbno + count), ascending. */
  extents: Array<[number, number]>;
  /** Daddrs (512-byte units) of the AGF sector and every bnobt block read. */
  readBBs: Array<[number, number]>;
  /** The AGF's free-block count and longest extent agree with the tree. */
  countersAgree: boolean;
}

type LogState = { kind: 'clean' } | { kind: 'logged'; buffers: Array<[number, number]> } | { kind: 'unknown' };

export async function xfsUsage(read: ReadAt, start: number, length: number, parallelism: number): Promise<XfsUsage | undefined> {
  if (length < 4096) return undefined;
  const geo = await readGeometry(read, start, length);
  if (!geo) return undefined;
  const budget = { blocks: Math.floor(MAX_TREE_BYTES / geo.blockSize) };
  const agNumbers = Array.from({ length: geo.agCount }, (_, i) => i);
  const ags: Array<AgFreeSpace | undefined> = new Array(geo.agCount);
  await inParallel(agNumbers, Math.ceil(parallelism / 2), async (agno) => {
    ags[agno] = await agFreeSpace(read, start, geo, agno, budget, parallelism);
  });
  if (ags.some((a) => a === undefined)) return undefined;

  const bbPerBlock = geo.blockSize / BB;
  const headerBlocks = Math.ceil((4 * geo.sectSize) / geo.blockSize);
  const free: ByteRange[] = [];
  let freeBlocks = 0;
  let countersAgree = true;
  for (let agno = 0; agno < geo.agCount; agno++) {
    const ag = ags[agno]!;
    countersAgree &&= ag.countersAgree;
    const agFirst = agno * geo.agBlocks;
    // Metadata the tree itself names as in use must lie outside every free extent.
    const busy: Array<[number, number]> = [[0, headerBlocks]];
    for (const [bb, count] of ag.readBBs) {
      const first = Math.floor(bb / bbPerBlock);
      busy.push([first - agFirst, Math.ceil((bb + count) / bbPerBlock) - first]);
    }
    if (geo.log) busy.push([geo.log.firstBlock - agFirst, geo.log.blocks]);
    for (const [from, count] of busy) if (overlapsExtent(ag.extents, from, from + count)) return undefined;
    for (const [agbno, count] of ag.extents) {
      freeBlocks += count;
      const from = start + (agFirst + agbno) * geo.blockSize;
      const to = from + count * geo.blockSize;
      const last = free[free.length - 1];
      if (last && last[1] === from) last[1] = to;
      else free.push([from, to]);
    }
  }

  const log = geo.log && geo.logFeaturesKnown ? await logState(read, start, geo) : ({ kind: 'unknown' } as const);
  const readBBs = mergeRanges(ags.flatMap((a) => a!.readBBs));
  const needsRecovery = log.kind === 'unknown' || (log.kind === 'logged' && log.buffers.some(([b, n]) => overlapsExtent(readBBs, b, b + n)));
  // With every change home, counters that disagree with the tree mean corruption, not a write in flight.
  if (!countersAgree && !needsRecovery) return undefined;
  return {
    type: 'xfs',
    size: geo.dblocks * geo.blockSize,
    usedBytes: (geo.dblocks - freeBlocks) * geo.blockSize,
    free,
    needsRecovery,
  };
}

async function readGeometry(read: ReadAt, start: number, length: number): Promise<Geometry | undefined> {
  let sb = await read(start, BB);
  if (sb.readUInt32BE(0) !== SB_MAGIC) return undefined;
  const blockSize = sb.readUInt32BE(4);
  const dblocks = u64(sb, 8);
  const logStart = u64(sb, 48);
  const agBlocks = sb.readUInt32BE(84);
  const agCount = sb.readUInt32BE(88);
  const logBlocks = sb.readUInt32BE(96);
  const versionNum = sb.readUInt16BE(100);
  const sectSize = sb.readUInt16BE(102);
  const blockLog = sb.readUInt8(120);
  const sectLog = sb.readUInt8(121);
  const agBlockLog = sb.readUInt8(124);
  const inProgress = sb.readUInt8(126);
  const version = versionNum & 0xf;
  const v5 = version === 5;
  if (
    (version !== 4 && !v5) ||
    inProgress !== 0 ||
    blockLog < 9 ||
    blockLog > 16 ||
    blockSize !== 2 ** blockLog ||
    sectLog < 9 ||
    sectLog > 15 ||
    sectSize !== 2 ** sectLog ||
    sectSize > blockSize ||
    dblocks === undefined ||
    logStart === undefined ||
    agCount < 1 ||
    agCount > MAX_AG_COUNT ||
    agBlocks * blockSize < AG_MIN_BYTES ||
    agBlocks * blockSize > AG_MAX_BYTES ||
    agBlockLog !== Math.ceil(Math.log2(agBlocks)) ||
    dblocks - (agCount - 1) * agBlocks < MIN_AG_BLOCKS ||
    dblocks > agCount * agBlocks ||
    dblocks * blockSize > length
  ) {
    return undefined;
  }
  let uuid = Buffer.from(sb.subarray(32, 48));
  let logFeaturesKnown = true;
  if (v5) {
    if (sectSize > BB) sb = await read(start, sectSize);
    if (!checksumOk(sb, 224)) return undefined;
    const incompat = sb.readUInt32BE(216);
    if (incompat & ~KNOWN_INCOMPAT) return undefined;
    if (incompat & INCOMPAT_META_UUID) uuid = Buffer.from(sb.subarray(248, 264));
    logFeaturesKnown = (sb.readUInt32BE(220) & ~KNOWN_LOG_INCOMPAT) === 0;
  }
  let log: Geometry['log'];
  if (logStart !== 0) {
    // Filesystem block numbers are AG-encoded: the AG number above agblklog bits, the block inside below.
    const agno = Math.floor(logStart / 2 ** agBlockLog);
    const agbno = logStart % 2 ** agBlockLog;
    const agLength = agno === agCount - 1 ? dblocks - agno * agBlocks : agBlocks;
    if (agno >= agCount || logBlocks < 1 || agbno + logBlocks > agLength) return undefined;
    log = { firstBlock: agno * agBlocks + agbno, blocks: logBlocks };
  }
  return { v5, blockSize, sectSize, dblocks, agBlocks, agCount, agBlockLog, uuid, logV2: v5 || (versionNum & SB_VERSION_LOGV2) !== 0, log, logFeaturesKnown };
}

/** Reads one AG's AGF and walks its bnobt level by level, checking every block against its parent and siblings. */
async function agFreeSpace(
  read: ReadAt,
  start: number,
  geo: Geometry,
  agno: number,
  budget: { blocks: number },
  parallelism: number,
): Promise<AgFreeSpace | undefined> {
  const bbPerBlock = geo.blockSize / BB;
  const agFirst = agno * geo.agBlocks;
  const agLength = agno === geo.agCount - 1 ? geo.dblocks - agFirst : geo.agBlocks;
  const agfBB = agFirst * bbPerBlock + geo.sectSize / BB;
  const agf = await read(start + agfBB * BB, geo.sectSize);
  const root = agf.readUInt32BE(16);
  const levels = agf.readUInt32BE(28);
  const freeBlocksField = agf.readUInt32BE(52);
  const longestField = agf.readUInt32BE(56);
  if (
    agf.readUInt32BE(0) !== AGF_MAGIC ||
    agf.readUInt32BE(4) !== 1 ||
    agf.readUInt32BE(8) !== agno ||
    agf.readUInt32BE(12) !== agLength ||
    root === 0 ||
    root >= agLength ||
    levels < 1 ||
    levels > MAX_TREE_LEVELS
  ) {
    return undefined;
  }
  if (geo.v5 && (!agf.subarray(64, 80).equals(geo.uuid) || !checksumOk(agf, 216))) return undefined;

  const header = geo.v5 ? 56 : 16;
  const leafMax = Math.floor((geo.blockSize - header) / 8);
  const nodeMax = Math.floor((geo.blockSize - header) / 12);
  const magic = geo.v5 ? BNOBT_MAGIC_V5 : BNOBT_MAGIC_V4;
  const readBBs: Array<[number, number]> = [[agfBB, geo.sectSize / BB]];
  const seen = new Set<number>();
  const extents: Array<[number, number]> = [];
  // Each entry: a block of the current level and the first start block its parent's key promises.
  let current: Array<{ agbno: number; key: number | undefined }> = [{ agbno: root, key: undefined }];
  for (let level = levels - 1; level >= 0; level--) {
    if (current.length > budget.blocks) return undefined;
    budget.blocks -= current.length;
    for (const { agbno } of current) {
      if (agbno === 0 || agbno >= agLength || seen.has(agbno)) return undefined;
      seen.add(agbno);
    }
    const blocks: Buffer[] = new Array(current.length);
    await inParallel(
      current.map((_, i) => i),
      parallelism,
      async (i) => {
        blocks[i] = await read(start + (agFirst + current[i].agbno) * geo.blockSize, geo.blockSize);
      },
    );
    const next: typeof current = [];
    for (let i = 0; i < current.length; i++) {
      const block = blocks[i];
      const { agbno, key } = current[i];
      const daddr = (agFirst + agbno) * bbPerBlock;
      readBBs.push([daddr, bbPerBlock]);
      const numRecs = block.readUInt16BE(6);
      const left = block.readUInt32BE(8);
      const right = block.readUInt32BE(12);
      if (block.readUInt32BE(0) !== magic || block.readUInt16BE(4) !== level) return undefined;
      if (left !== (i === 0 ? NULL_AGBLOCK : current[i - 1].agbno)) return undefined;
      if (right !== (i === current.length - 1 ? NULL_AGBLOCK : current[i + 1].agbno)) return undefined;
      if (geo.v5) {
        if (u64(block, 16) !== daddr || !block.subarray(32, 48).equals(geo.uuid) || block.readUInt32BE(48) !== agno) return undefined;
        if (!checksumOk(block, 52)) return undefined;
      }
      if (level > 0) {
        if (numRecs < 1 || numRecs > nodeMax) return undefined;
        if (key !== undefined && block.readUInt32BE(header) !== key) return undefined;
        const pointers = header + nodeMax * 8;
        for (let r = 0; r < numRecs; r++) {
          const childKey = block.readUInt32BE(header + r * 8);
          if (r > 0 && childKey <= block.readUInt32BE(header + (r - 1) * 8)) return undefined;
          next.push({ agbno: block.readUInt32BE(pointers + r * 4), key: childKey });
        }
      } else {
        // A root leaf may be empty (no free space in the AG); any other leaf holds records.
        if (numRecs > leafMax || (numRecs === 0 && levels > 1)) return undefined;
        if (key !== undefined && block.readUInt32BE(header) !== key) return undefined;
        for (let r = 0; r < numRecs; r++) {
          const from = block.readUInt32BE(header + r * 8);
          const count = block.readUInt32BE(header + r * 8 + 4);
          const prev = extents[extents.length - 1];
          if (count === 0 || from + count > agLength || (prev && from < prev[0] + prev[1])) return undefined;
          extents.push([from, count]);
        }
      }
    }
    current = next;
  }
  let total = 0;
  let longest = 0;
  for (const [, count] of extents) {
    total += count;
    longest = Math.max(longest, count);
  }
  return { extents, readBBs, countersAgree: total === freeBlocksField && longest === longestField };
}

/**
 * Whether the internal log still holds changes not yet written to their home blocks, as log recovery would
 * see it: the head is where the cycle number stamped in every 512-byte block drops, the tail comes from
 * the last record before it. A clean unmount record (or an empty active region) means nothing is pending;
 * otherwise the records between tail and head are parsed for the buffers they log. A frozen XFS "covers"
 * its log with superblock-only records, which leave the free-space trees exact.
 */
async function logState(read: ReadAt, start: number, geo: Geometry): Promise<LogState> {
  const unknown = { kind: 'unknown' } as const;
  const logBBs = (geo.log!.blocks * geo.blockSize) / BB;
  const logOffset = start + geo.log!.firstBlock * geo.blockSize;
  const readLog = async (fromBB: number, count: number): Promise<Buffer> => {
    const first = Math.min(count, logBBs - fromBB);
    const head = await read(logOffset + fromBB * BB, first * BB);
    return first === count ? head : Buffer.concat([head, await read(logOffset, (count - first) * BB)]);
  };
  const cycleOf = (bb: Buffer, at: number) => (bb.readUInt32BE(at) === LOG_RECORD_MAGIC ? bb.readUInt32BE(at + 4) : bb.readUInt32BE(at));
  const cycleAt = async (bb: number) => cycleOf(await readLog(bb, 1), 0);

  const firstCycle = await cycleAt(0);
  const lastCycle = await cycleAt(logBBs - 1);
  if (firstCycle === 0) return unknown;
  let headBB = logBBs;
  if (lastCycle !== firstCycle) {
    if (lastCycle !== firstCycle - 1) return unknown;
    let lo = 0;
    let hi = logBBs - 1;
    while (hi - lo > 1) {
      const mid = Math.floor((lo + hi) / 2);
      if ((await cycleAt(mid)) === firstCycle) lo = mid;
      else hi = mid;
    }
    headBB = hi;
  }
  const expectedCycle = (bb: number) => (bb < headBB ? firstCycle : firstCycle - 1);

  // Around the head every block must carry the cycle its side of the head implies: a hole means a torn write.
  const window = Math.min(logBBs, 2 * LOG_WINDOW_BBS);
  const windowStart = (headBB - Math.floor(window / 2) + logBBs) % logBBs;
  const around = await readLog(windowStart, window);
  for (let i = 0; i < window; i++) if (cycleOf(around, i * BB) !== expectedCycle((windowStart + i) % logBBs)) return unknown;

  let lastHeader = -1;
  for (let i = Math.floor(window / 2) - 1; i >= 0; i--) {
    if (around.readUInt32BE(i * BB) === LOG_RECORD_MAGIC) {
      lastHeader = i;
      break;
    }
  }
  if (lastHeader < 0) return unknown;
  const last = parseRecordHeader(around.subarray(lastHeader * BB), geo.logV2);
  const lastBB = (windowStart + lastHeader) % logBBs;
  if (!last || last.cycle !== expectedCycle(lastBB) || last.lsnBlock !== lastBB || last.lsnCycle !== last.cycle) return unknown;
  if (last.numOps === 1 && (lastBB + last.headerBBs + last.dataBBs) % logBBs === headBB % logBBs) {
    const data = around.subarray((lastHeader + last.headerBBs) * BB);
    if (data.length >= 12 && data[9] & OP_UNMOUNT) return { kind: 'clean' };
  }

  const tailBB = last.tailBlock;
  let activeBBs: number;
  if (tailBB >= logBBs) return unknown;
  if (last.tailCycle === firstCycle && tailBB < headBB) activeBBs = headBB - tailBB;
  else if (last.tailCycle === firstCycle - 1 && tailBB >= headBB && headBB < logBBs) activeBBs = logBBs - tailBB + headBB;
  else return unknown;
  if (activeBBs * BB > MAX_ACTIVE_LOG_BYTES) return unknown;
  const active = await readLog(tailBB, activeBBs);
  const buffers = loggedBuffers(active, tailBB, logBBs, expectedCycle, geo.logV2);
  return buffers ? { kind: 'logged', buffers } : unknown;
}

interface RecordHeader {
  cycle: number;
  dataLength: number;
  lsnCycle: number;
  lsnBlock: number;
  tailCycle: number;
  tailBlock: number;
  numOps: number;
  headerBBs: number;
  dataBBs: number;
  bigEndianItems: boolean;
}

function parseRecordHeader(h: Buffer, logV2: boolean): RecordHeader | undefined {
  if (h.length < BB || h.readUInt32BE(0) !== LOG_RECORD_MAGIC) return undefined;
  const version = h.readUInt32BE(8);
  const dataLength = h.readUInt32BE(12);
  if (version < 1 || version > 3 || dataLength < 1 || dataLength > LOG_MAX_RECORD_BYTES) return undefined;
  let headerBBs = 1;
  const size = h.readUInt32BE(320);
  if (logV2 && version & 2 && size > LOG_CYCLE_DATA_PER_HEADER * BB) {
    if (size > LOG_MAX_RECORD_BYTES) return undefined;
    headerBBs = Math.ceil(size / (LOG_CYCLE_DATA_PER_HEADER * BB));
  }
  const dataBBs = Math.ceil(dataLength / BB);
  if (dataBBs > headerBBs * LOG_CYCLE_DATA_PER_HEADER) return undefined;
  return {
    cycle: h.readUInt32BE(4),
    dataLength,
    lsnCycle: h.readUInt32BE(16),
    lsnBlock: h.readUInt32BE(20),
    tailCycle: h.readUInt32BE(24),
    tailBlock: h.readUInt32BE(28),
    numOps: h.readUInt32BE(40),
    headerBBs,
    dataBBs,
    bigEndianItems: h.readUInt32BE(300) === LOG_FMT_BIG_ENDIAN,
  };
}

interface OpenTransaction {
  headerSeen: boolean;
  /** Regions still to come for the current item. */
  regionsLeft: number;
  /** First bytes of the current item's format region while they arrive in pieces; undefined once decoded. */
  pending: Buffer | undefined;
}

/**
 * Walks the records of the active log region from the tail and returns the daddr ranges of every buffer
 * they log, or undefined when the region does not parse exactly (treated as a dirty log).
 */
function loggedBuffers(
  active: Buffer,
  tailBB: number,
  logBBs: number,
  expectedCycle: (bb: number) => number,
  logV2: boolean,
): Array<[number, number]> | undefined {
  const buffers: Array<[number, number]> = [];
  const open = new Map<number, OpenTransaction>();
  const totalBBs = active.length / BB;
  let bigEndian = false;

  const decodeItemStart = (t: OpenTransaction): boolean => {
    const p = t.pending!;
    if (p.length < 4) return true;
    const type = bigEndian ? p.readUInt16BE(0) : p.readUInt16LE(0);
    const regions = bigEndian ? p.readUInt16BE(2) : p.readUInt16LE(2);
    if (type < LOG_ITEM_FIRST || type > LOG_ITEM_LAST || regions < 1) return false;
    t.regionsLeft = regions - 1;
    if (type !== LOG_ITEM_BUF) {
      t.pending = undefined;
      return true;
    }
    if (p.length < 16) return true;
    const count = bigEndian ? p.readUInt16BE(6) : p.readUInt16LE(6);
    const blkno = bigEndian ? p.readBigInt64BE(8) : p.readBigInt64LE(8);
    if (blkno < 0n || blkno > BigInt(Number.MAX_SAFE_INTEGER)) return false;
    buffers.push([Number(blkno), Math.max(1, count)]);
    t.pending = undefined;
    return true;
  };

  for (let bb = 0; bb < totalBBs; ) {
    const physical = (tailBB + bb) % logBBs;
    const h = parseRecordHeader(active.subarray(bb * BB), logV2);
    if (!h || h.cycle !== expectedCycle(physical) || h.lsnCycle !== h.cycle || h.lsnBlock !== physical) return undefined;
    if (bb + h.headerBBs + h.dataBBs > totalBBs) return undefined;
    bigEndian = h.bigEndianItems;
    // Restore the first word of each data block, which the writer replaced by the cycle number.
    const data = Buffer.from(active.subarray((bb + h.headerBBs) * BB, (bb + h.headerBBs + h.dataBBs) * BB));
    for (let i = 0; i < h.dataBBs; i++) {
      const headerIndex = Math.floor(i / LOG_CYCLE_DATA_PER_HEADER);
      const saved = (bb + headerIndex) * BB + (headerIndex === 0 ? 44 : 4) + (i % LOG_CYCLE_DATA_PER_HEADER) * 4;
      active.copy(data, i * BB, saved, saved + 4);
    }
    let at = 0;
    for (let op = 0; op < h.numOps; op++) {
      if (at + 12 > h.dataLength) return undefined;
      const tid = data.readUInt32BE(at);
      const length = data.readUInt32BE(at + 4);
      const client = data[at + 8];
      let flags = data[at + 9] & ~OP_END;
      at += 12;
      if (length > h.dataLength - at || (client !== LOG_CLIENT_TRANSACTION && client !== LOG_CLIENT_LOG)) return undefined;
      const body = data.subarray(at, at + length);
      at += length;
      const t = open.get(tid);
      if (!t) {
        // Log recovery ignores operations of transactions that began before the tail: so does this.
        if (flags & OP_START) open.set(tid, { headerSeen: false, regionsLeft: 0, pending: undefined });
        continue;
      }
      if (flags & OP_WAS_CONTINUED) flags &= ~OP_CONTINUE;
      if (flags === OP_COMMIT || flags === OP_UNMOUNT) {
        if (t.pending) return undefined;
        open.delete(tid);
      } else if (flags === OP_WAS_CONTINUED) {
        if (t.pending) {
          t.pending = Buffer.concat([t.pending, body.subarray(0, 16)]).subarray(0, 16);
          if (!decodeItemStart(t)) return undefined;
        }
      } else if (flags === 0 || flags === OP_CONTINUE) {
        if (length === 0) continue;
        if (t.pending) return undefined;
        if (!t.headerSeen) {
          if (length >= 4 && (bigEndian ? body.readUInt32BE(0) : body.readUInt32LE(0)) !== TRANS_HEADER_MAGIC) return undefined;
          t.headerSeen = true;
        } else if (t.regionsLeft > 0) {
          t.regionsLeft--;
        } else {
          t.pending = Buffer.from(body.subarray(0, 16));
          if (!decodeItemStart(t)) return undefined;
        }
      } else {
        return undefined;
      }
    }
    bb += h.headerBBs + h.dataBBs;
  }
  // A buffer item whose description never arrived complete cannot be placed.
  for (const t of open.values()) if (t.pending) return undefined;
  return buffers;
}

/** Sorts [start, count) ranges and joins those that meet, as overlapsExtent needs. */
function mergeRanges(ranges: Array<[number, number]>): Array<[number, number]> {
  const merged: Array<[number, number]> = [];
  for (const [from, count] of [...ranges].sort((a, b) => a[0] - b[0])) {
    const last = merged[merged.length - 1];
    if (last && from <= last[0] + last[1]) last[1] = Math.max(last[1], from + count - last[0]);
    else merged.push([from, count]);
  }
  return merged;
}

/** True when [from, to) meets any of the ascending, disjoint extents [start, start + count). */
function overlapsExtent(extents: Array<[number, number]>, from: number, to: number): boolean {
  let lo = 0;
  let hi = extents.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (extents[mid][0] + extents[mid][1] <= from) lo = mid + 1;
    else hi = mid;
  }
  return lo < extents.length && extents[lo][0] < to;
}

/** XFS checksums are CRC-32C over the whole structure with the 4-byte field taken as zero, stored little-endian. */
function checksumOk(buf: Buffer, at: number): boolean {
  const head = native.crc32c(buf.subarray(0, at));
  const zeroed = native.crc32c(Buffer.alloc(4), head);
  return native.crc32c(buf.subarray(at + 4), zeroed) === buf.readUInt32LE(at);
}

function u64(buf: Buffer, at: number): number | undefined {
  const value = buf.readBigUInt64BE(at);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(value);
}
