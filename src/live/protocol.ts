/**
 * The wire protocol between `ferry migrate` (source) and `ferry migrate-listen` (destination): frames of
 * [type u8][length u32 LE][payload] over TCP. One control connection, plus one connection per page stream.
 *
 *   control  HELLO {json} → WELCOME {json} | ERROR
 *   stream   JOIN {session, stream}, then PAGES…, FLUSH seq → FLUSHED seq
 *   control  DEVICE bytes…, DEVICE_END → DEVICE_LOADED | ERROR   (while the last pages go, in any order with:)
 *            VERIFY digest u64 → VERIFIED {ok}
 *            COMMIT (only after both) → RESUMED | ERROR
 *            ABORT {reason} (the destination discards)
 *   qemu mode: NATIVE_INCOMING → NATIVE_READY {port}; COMMIT → RESUMED
 *
 * PAGES payload: count u32, page numbers u32[count], (kind u32, size u32)[count], then the encoded pages.
 */
import type { Socket } from 'node:net';
import { MigrationError } from './errors.js';

export const PROTOCOL_VERSION = 1;

export const enum MessageType {
  Hello = 1,
  Welcome = 2,
  Join = 3,
  Pages = 4,
  Flush = 5,
  Flushed = 6,
  Verify = 7,
  Verified = 8,
  Device = 9,
  DeviceEnd = 10,
  DeviceLoaded = 11,
  Commit = 12,
  Resumed = 13,
  Abort = 14,
  Error = 15,
  NativeIncoming = 16,
  NativeReady = 17,
}

/** How a page travels (the native encoder's choice). */
export const enum LivePageKind {
  Zero = 0,
  Raw = 1,
  Zstd = 2,
  /** zstd of the XOR with the version sent before (XBZRLE's idea, with zstd for the run lengths). */
  Delta = 3,
}

export const FRAME_HEADER_BYTES = 5;
/** Per page in a PAGES frame: number, kind, size. */
export const PAGE_HEADER_BYTES = 12;
const MAX_FRAME_BYTES = 256 * 1024 * 1024;
/** Frames queued before the socket is paused (backpressure towards the sender). */
const QUEUE_HIGH_WATER = 8;

export interface Frame {
  type: MessageType;
  payload: Buffer;
}

export interface HelloMessage {
  protocol: number;
  session: string;
  mode: 'ferry' | 'qemu';
  pageSize: number;
  pageCount: number;
  streams: number;
}

/**
 * A socket carrying frames: send() with backpressure, next() for the next incoming frame. An ERROR frame,
 * a socket error or an early close fails the channel: pending and later calls reject with the cause.
 */
export class FrameChannel {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private readonly queue: Frame[] = [];
  private waiter?: { resolve: (f: Frame) => void; reject: (e: Error) => void };
  private failure?: Error;

  constructor(
    readonly socket: Socket,
    private readonly peer: string,
  ) {
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.fail(new MigrationError(`${peer}: ${err.message}`, { cause: err })));
    socket.on('close', () => this.fail(new MigrationError(`${peer} closed the connection`)));
  }

  get failed(): Error | undefined {
    return this.failure;
  }

  async send(type: MessageType, ...parts: Uint8Array[]): Promise<void> {
    await this.sendTracked(type, parts);
  }

  /**
   * As send(), once the socket takes more; `written` then resolves when the socket has handed every part to
   * the kernel (or was closed): until then the parts must not change.
   */
  async sendTracked(type: MessageType, parts: Uint8Array[]): Promise<{ written: Promise<void> }> {
    if (this.failure) throw this.failure;
    const length = parts.reduce((n, p) => n + p.length, 0);
    const header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
    header.writeUInt8(type, 0);
    header.writeUInt32LE(length, 1);
    let flowing = true;
    const written = new Promise<void>((resolve) => {
      this.socket.cork();
      flowing = this.socket.write(header);
      parts.forEach((p, i) => (flowing = this.socket.write(p, i === parts.length - 1 ? () => resolve() : undefined)));
      if (parts.length === 0) resolve();
      this.socket.uncork();
    });
    if (!flowing) await this.drained();
    return { written };
  }

  sendJson(type: MessageType, body: unknown): Promise<void> {
    return this.send(type, Buffer.from(JSON.stringify(body)));
  }

  next(): Promise<Frame> {
    const frame = this.queue.shift();
    if (frame) {
      if (this.queue.length < QUEUE_HIGH_WATER && this.socket.isPaused()) this.socket.resume();
      return Promise.resolve(frame);
    }
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.waiter = { resolve, reject }));
  }

  /** The next frame, which must be of `type`. */
  async expect(type: MessageType): Promise<Frame> {
    const frame = await this.next();
    if (frame.type !== type) throw new MigrationError(`${this.peer}: expected message ${type}, got ${frame.type}`);
    return frame;
  }

  close(): void {
    this.socket.end();
    this.socket.destroySoon();
  }

  destroy(): void {
    this.socket.destroy();
  }

  private drained(): Promise<void> {
    return new Promise((resolve, reject) => {
      const done = () => {
        this.socket.off('drain', done);
        this.socket.off('close', done);
        if (this.failure) reject(this.failure);
        else resolve();
      };
      this.socket.on('drain', done);
      this.socket.on('close', done);
    });
  }

  private onData(chunk: Buffer): void {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    for (;;) {
      if (this.pendingBytes < FRAME_HEADER_BYTES) return;
      if (this.pending[0].length < FRAME_HEADER_BYTES) this.pending = [Buffer.concat(this.pending)];
      const length = this.pending[0].readUInt32LE(1);
      if (length > MAX_FRAME_BYTES) {
        this.fail(new MigrationError(`${this.peer}: frame of ${length} bytes exceeds the ${MAX_FRAME_BYTES} limit`));
        this.socket.destroy();
        return;
      }
      // Chunks are joined once the whole frame is there, not on every arrival (a frame spans many chunks).
      if (this.pendingBytes < FRAME_HEADER_BYTES + length) return;
      const head = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending);
      const type = head.readUInt8(0) as MessageType;
      const payload = head.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + length);
      const rest = head.subarray(FRAME_HEADER_BYTES + length);
      this.pending = rest.length ? [rest] : [];
      this.pendingBytes = rest.length;
      if (type === MessageType.Error) {
        this.fail(new MigrationError(`${this.peer}: ${parseJson<{ message: string }>(payload).message}`));
        return;
      }
      this.deliver({ type, payload });
    }
  }

  private deliver(frame: Frame): void {
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve(frame);
      return;
    }
    this.queue.push(frame);
    if (this.queue.length >= QUEUE_HIGH_WATER) this.socket.pause();
  }

  private fail(err: Error): void {
    this.failure ??= err;
    if (this.waiter && this.queue.length === 0) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(this.failure);
    }
  }
}

export function parseJson<T>(payload: Buffer): T {
  try {
    return JSON.parse(payload.toString('utf8')) as T;
  } catch {
    throw new MigrationError('malformed message from the peer');
  }
}

/** Copies a little-endian u32 array out of a (possibly unaligned) buffer. */
export function readU32Array(buf: Buffer, offset: number, count: number): Uint32Array {
  const bytes = new Uint8Array(count * 4);
  bytes.set(buf.subarray(offset, offset + count * 4));
  return new Uint32Array(bytes.buffer);
}

export function u64Bytes(value: bigint): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64LE(value);
  return b;
}
