import { Codec, native } from '../native.js';
import { DataFlag, ProtocolError, type FrameHeader } from './protocol.js';

/** A chunk's hash: XXH64 (seed 0) of its bytes, as 8 little-endian bytes, computed identically on both ends. */
export type ChunkHash = Buffer;

export const HASH_SIZE = 8;

const zeroHashes = new Map<number, ChunkHash>();

/** The hash of `length` zero bytes, cached: zero chunks travel as a flag and are hashed here instead. */
export function zeroChunkHash(length: number): ChunkHash {
  let h = zeroHashes.get(length);
  if (!h) {
    h = Buffer.alloc(HASH_SIZE);
    h.writeBigUInt64LE(native.xxh64(Buffer.alloc(length)));
    zeroHashes.set(length, h);
  }
  return h;
}

/** Hashes of consecutive `chunkSize` pieces of data[0, length), on the thread pool. */
export async function hashChunks(data: Buffer, length: number, chunkSize: number): Promise<Buffer> {
  const out = Buffer.allocUnsafe(Math.ceil(length / chunkSize) * HASH_SIZE);
  await native.hashBlocks(data, length, chunkSize, out);
  return out;
}

/**
 * The run hash of consecutive chunks, from their hashes (8 bytes each): a chunk's own hash for a run of one,
 * else the XXH64 of the hashes. DATA frames and grouped HASH replies carry it, so one field checks a run.
 */
export function runHash(hashes: Buffer): ChunkHash {
  if (hashes.length === HASH_SIZE) return Buffer.from(hashes);
  const h = Buffer.allocUnsafe(HASH_SIZE);
  h.writeBigUInt64LE(native.xxh64(hashes));
  return h;
}

/** The hashes of the `chunkSize` chunks of `length` zero bytes (the last one possibly shorter). */
export function zeroChunkHashes(length: number, chunkSize: number): Buffer {
  const count = Math.ceil(length / chunkSize);
  const out = Buffer.allocUnsafe(count * HASH_SIZE);
  for (let i = 0; i < count; i++) zeroChunkHash(Math.min(chunkSize, length - i * chunkSize)).copy(out, i * HASH_SIZE);
  return out;
}

export interface DecodedRun {
  /** The run's bytes (in `scratch` when decompressed, else the payload); undefined when all zero. */
  data: Buffer | undefined;
  /** The hash of each chunk of the run, 8 bytes each. */
  hashes: Buffer;
}

/**
 * Turns a DATA frame's payload into its chunks' bytes (decompressing into `scratch`) and hashes, and checks
 * them against the run hash the agent computed before sending: corruption anywhere between the source's
 * read and this point is an error, never a bad image.
 */
export async function decodeDataFrame(header: FrameHeader, payload: Buffer, chunkSize: number, scratch: Buffer, source: string): Promise<DecodedRun> {
  if (header.flags & DataFlag.Zero) {
    const hashes = zeroChunkHashes(header.length, chunkSize);
    if (!runHash(hashes).equals(header.hash)) {
      throw new ProtocolError(`${source}: zero data at ${header.offset} carries the hash of non-zero data`, { field: 'hash' });
    }
    return { data: undefined, hashes };
  }
  let data = payload;
  if (header.flags & DataFlag.Zstd) {
    data = scratch.subarray(0, header.length);
    try {
      await native.decompressBlocks(Codec.Zstd, payload, new Float64Array([0, payload.length, 0]), data, header.length);
    } catch (err) {
      throw new ProtocolError(`${source}: data at ${header.offset} does not decompress`, { field: 'payload', cause: err });
    }
  }
  const hashes = await hashChunks(data, header.length, chunkSize);
  if (!runHash(hashes).equals(header.hash)) throw new ProtocolError(`${source}: data at ${header.offset} does not match its hash`, { field: 'hash' });
  return { data, hashes };
}
