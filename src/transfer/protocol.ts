/**
 * The capture agent's wire protocol (native/agent/ferry-agent.c is the other end): fixed 32-byte requests
 * and frames, little-endian. Everything here treats the agent's bytes as hostile: every length is checked
 * against a cap before anything is allocated for it.
 */
import { FerryError } from '../errors.js';

export const PROTOCOL_VERSION = 2;
/** "FERRYAG1" as a little-endian u64: the HELLO frame's hash field, so a stray shell banner is not taken for an agent. */
export const AGENT_MAGIC = 0x3147415952524546n;
export const HEADER_SIZE = 32;

/** The agent refuses chunks outside this range; Ferry never asks for more. A DATA frame carries at most MAX_CHUNK bytes. */
export const MIN_CHUNK = 512;
export const MAX_CHUNK = 4 * 1024 * 1024;
/** HASH: the most chunks one hash may stand for (a frame's worth of the smallest chunks). */
export const MAX_HASH_GROUP = MAX_CHUNK / MIN_CHUNK;
const MAX_HASHES_PER_FRAME = 65536;
const MAX_SEGMENTS_PER_FRAME = 4096;
const MAX_ERROR_TEXT = 4096;
const INFO_SIZE = 16;
/** Mount point lists for FREEZE. */
export const MAX_REQUEST_EXTRA = 65536;

export const enum Op {
  Info = 1,
  Read = 2,
  Hash = 3,
  Segments = 4,
  Freeze = 5,
  Thaw = 6,
  /** Remove the pushed binary the agent runs from, and its directory, once every agent runs. */
  UnlinkSelf = 7,
}

export const enum FrameType {
  Hello = 1,
  Info = 2,
  Data = 3,
  Hashes = 4,
  Segments = 5,
  End = 6,
  Error = 7,
  Frozen = 8,
  Thawed = 9,
  Unlinked = 10,
}

export const enum DataFlag {
  Zero = 1,
  Zstd = 2,
}

/** THAWED flag: the watchdog had already thawed (the freeze outlived its timeout). */
export const THAWED_BY_WATCHDOG = 1;

export interface Request {
  op: Op;
  chunk?: number;
  offset?: number;
  length?: number;
  /** READ: the zstd level (0: plain); HASH: chunks per hash. */
  arg?: number;
  extra?: Buffer;
}

export interface FrameHeader {
  type: FrameType;
  flags: number;
  payloadLength: number;
  offset: number;
  /** DATA: the bytes of the run of chunks it carries; HASHES/SEGMENTS: the number of entries. */
  length: number;
  /** 8 little-endian bytes (a view into the header; copy to keep). DATA: the run hash of its chunks. */
  hash: Buffer;
}

/**
 * How many chunks a DATA frame carries (the agent fills each frame with as many as fit in MAX_CHUNK bytes),
 * so Ferry knows where every frame of a READ must start and end.
 */
export function chunksPerFrame(chunkSize: number): number {
  return chunkSize >= MAX_CHUNK ? 1 : Math.floor(MAX_CHUNK / chunkSize);
}

/** The agent broke the protocol: bad lengths, frames out of order, a hash that does not match its data. */
export class ProtocolError extends FerryError {
  readonly code = 'PROTOCOL_ERROR';
}

/** The agent could not do what was asked (a read error on the source, a failed freeze). */
export class AgentError extends FerryError {
  readonly code = 'AGENT_ERROR';
}

export function encodeRequest(req: Request): Buffer {
  const extra = req.extra ?? Buffer.alloc(0);
  if (extra.length > MAX_REQUEST_EXTRA) throw new RangeError('request argument too large');
  const b = Buffer.alloc(HEADER_SIZE + extra.length);
  b.writeUInt8(req.op, 0);
  b.writeUInt32LE(req.chunk ?? 0, 4);
  b.writeBigUInt64LE(BigInt(req.offset ?? 0), 8);
  b.writeBigUInt64LE(BigInt(req.length ?? 0), 16);
  b.writeInt32LE(req.arg ?? 0, 24);
  b.writeUInt32LE(extra.length, 28);
  extra.copy(b, HEADER_SIZE);
  return b;
}

export function decodeHeader(b: Buffer): FrameHeader {
  const offset = b.readBigUInt64LE(8);
  if (offset > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`frame offset ${offset} out of range`, { field: 'offset' });
  return {
    type: b.readUInt8(0),
    flags: b.readUInt8(1),
    payloadLength: b.readUInt32LE(4),
    offset: Number(offset),
    length: b.readUInt32LE(16),
    hash: b.subarray(24, 32),
  };
}

/**
 * Refuses a frame whose payload length does not fit its type before the payload is read, so a hostile
 * agent can make Ferry allocate at most one maximum-size chunk per channel.
 */
export function checkPayloadLength(h: FrameHeader): void {
  const bad = (why: string) => new ProtocolError(`agent frame type ${h.type}: ${why}`, { field: 'payload_length' });
  switch (h.type) {
    case FrameType.Data:
      if (h.length === 0 || h.length > MAX_CHUNK) throw bad(`chunk length ${h.length} out of range`);
      if (h.flags & DataFlag.Zero) {
        if (h.payloadLength !== 0) throw bad('zero chunk with a payload');
      } else if (h.flags & DataFlag.Zstd) {
        if (h.payloadLength === 0 || h.payloadLength >= h.length) throw bad(`compressed payload of ${h.payloadLength} bytes for ${h.length} bytes of data`);
      } else if (h.payloadLength !== h.length) throw bad(`plain payload of ${h.payloadLength} bytes for ${h.length} bytes of data`);
      return;
    case FrameType.Hashes:
      if (h.length === 0 || h.length > MAX_HASHES_PER_FRAME || h.payloadLength !== h.length * 8) throw bad(`${h.length} hashes in ${h.payloadLength} bytes`);
      return;
    case FrameType.Segments:
      if (h.length === 0 || h.length > MAX_SEGMENTS_PER_FRAME || h.payloadLength !== h.length * 16) throw bad(`${h.length} segments in ${h.payloadLength} bytes`);
      return;
    case FrameType.Info:
      if (h.payloadLength !== INFO_SIZE) throw bad(`info of ${h.payloadLength} bytes`);
      return;
    case FrameType.Error:
      if (h.payloadLength > MAX_ERROR_TEXT) throw bad(`error text of ${h.payloadLength} bytes`);
      return;
    case FrameType.Hello:
    case FrameType.End:
    case FrameType.Frozen:
    case FrameType.Thawed:
    case FrameType.Unlinked:
      if (h.payloadLength !== 0) throw bad('unexpected payload');
      return;
    default:
      throw new ProtocolError(`unknown agent frame type ${h.type}`, { field: 'type' });
  }
}

export interface AgentInfo {
  size: number;
  sectorSize: number;
  blockDevice: boolean;
}

export function decodeInfo(payload: Buffer): AgentInfo {
  const size = payload.readBigUInt64LE(0);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`source size ${size} out of range`, { field: 'size' });
  const sectorSize = payload.readUInt32LE(8);
  if (sectorSize < 512 || sectorSize > 65536 || (sectorSize & (sectorSize - 1)) !== 0) {
    throw new ProtocolError(`sector size ${sectorSize} out of range`, { field: 'sector_size' });
  }
  return { size: Number(size), sectorSize, blockDevice: payload.readUInt32LE(12) === 1 };
}
