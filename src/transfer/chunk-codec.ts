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
 * Turns a DATA frame's payload into the chunk's bytes (decompressing into `scratch`) and checks the hash
 * the agent computed before sending: corruption anywhere between the source's read and this point is an
 * error, never a bad image. Returns undefined for an all-zero chunk.
 */
export async function decodeDataFrame(header: FrameHeader, payload: Buffer, scratch: Buffer, source: string): Promise<Buffer | undefined> {
  if (header.flags & DataFlag.Zero) {
    if (!header.hash.equals(zeroChunkHash(header.length))) {
      throw new ProtocolError(`${source}: zero chunk at ${header.offset} carries the hash of non-zero data`, { field: 'hash' });
    }
    return undefined;
  }
  let data = payload;
  if (header.flags & DataFlag.Zstd) {
    data = scratch.subarray(0, header.length);
    try {
      await native.decompressBlocks(Codec.Zstd, payload, new Float64Array([0, payload.length, 0]), data, header.length);
    } catch (err) {
      throw new ProtocolError(`${source}: chunk at ${header.offset} does not decompress`, { field: 'payload', cause: err });
    }
  }
  const hash = await hashChunks(data, header.length, header.length);
  if (!hash.equals(header.hash)) throw new ProtocolError(`${source}: chunk at ${header.offset} does not match its hash`, { field: 'hash' });
  return data;
}
