import type { Readable } from 'node:stream';
import { checkPayloadLength, decodeHeader, HEADER_SIZE, ProtocolError, type FrameHeader } from './protocol.js';

export interface Frame {
  header: FrameHeader;
  payload: Buffer;
}

/**
 * Pulls whole frames off a byte stream. It reads only as fast as frames are consumed, so a slow writer
 * (or the rate limiter) stalls the stream, and SSH flow control stalls the agent: memory stays at the
 * stream's buffer plus one frame, and a frame is never larger than checkPayloadLength allows.
 *
 * A frame's payload is valid until the next call of `next`: a payload split across stream pieces is
 * joined in one buffer the reader reuses, since allocating a frame's worth (up to 4 MiB) per frame keeps
 * the garbage collector busy for nothing.
 */
export class FrameReader {
  private readonly pieces: Buffer[] = [];
  private buffered = 0;
  private joined = Buffer.alloc(0);
  private readonly source: AsyncIterator<Buffer>;

  constructor(
    stream: Readable,
    private readonly describeSource: string,
  ) {
    this.source = stream[Symbol.asyncIterator]();
  }

  /** The next frame, or undefined when the stream ended cleanly between frames. */
  async next(): Promise<Frame | undefined> {
    if (!(await this.fill(HEADER_SIZE, true))) return undefined;
    const header = decodeHeader(this.take(HEADER_SIZE, false));
    checkPayloadLength(header);
    await this.fill(header.payloadLength, false);
    return { header, payload: this.take(header.payloadLength, true) };
  }

  private async fill(n: number, endAllowed: boolean): Promise<boolean> {
    while (this.buffered < n) {
      const { value, done } = await this.source.next();
      if (done) {
        if (endAllowed && this.buffered === 0) return false;
        throw new ProtocolError(`${this.describeSource} closed in the middle of a frame`);
      }
      const piece = Buffer.isBuffer(value) ? value : Buffer.from(value);
      this.pieces.push(piece);
      this.buffered += piece.length;
    }
    return true;
  }

  /** The next n bytes; `reuse`: joined (when split) in the reused buffer instead of a new one. */
  private take(n: number, reuse: boolean): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.pieces[0];
    if (first.length >= n) {
      // The common case for headers and small frames: no copy.
      const out = first.subarray(0, n);
      if (first.length === n) this.pieces.shift();
      else this.pieces[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    if (reuse && this.joined.length < n) this.joined = Buffer.allocUnsafe(n);
    const out = reuse ? this.joined.subarray(0, n) : Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const piece = this.pieces[0];
      const used = Math.min(piece.length, n - at);
      piece.copy(out, at, 0, used);
      at += used;
      if (used === piece.length) this.pieces.shift();
      else this.pieces[0] = piece.subarray(used);
    }
    this.buffered -= n;
    return out;
  }
}
