import type { Readable, Writable } from 'node:stream';
import { decodeDataFrame } from '../transfer/chunk-codec.js';
import { FrameReader, type Frame } from '../transfer/frame-reader.js';
import {
  AGENT_MAGIC,
  AgentError,
  chunksPerFrame,
  decodeInfo,
  encodeRequest,
  FrameType,
  HEADER_SIZE,
  MAX_CHUNK,
  MAX_HASH_GROUP,
  Op,
  PROTOCOL_VERSION,
  ProtocolError,
  THAWED_BY_WATCHDOG,
  type AgentInfo,
  type Request,
} from '../transfer/protocol.js';
import type { RateLimiter } from '../transfer/rate-limiter.js';
import { SourceConnectionError } from './errors.js';
import type { ReceivedRun } from './source.js';

/** The byte streams of one running agent, however it was started (an SSH exec channel, a local process). */
export interface AgentStreams {
  /** The agent's stdout. */
  output: Readable;
  /** The agent's stdin. */
  input: Writable;
  /** Its stderr, kept for error messages. */
  errors: Readable;
  /** For messages: where the agent runs. */
  where: string;
}

interface PendingReply {
  /** Handles one frame of the reply; resolves true when the reply is complete. */
  onFrame(frame: Frame): Promise<boolean>;
  reject(err: Error): void;
}

const STDERR_TAIL = 2048;

/**
 * Client for one agent process. Requests are written at once and answered in order, so several can be in
 * flight (pipelining hides the round trip); one loop reads the replies and hands each frame to the oldest
 * pending request. A protocol violation or a lost stream fails every pending request and the channel.
 */
export class AgentChannel {
  private readonly reader: FrameReader;
  private readonly queue: PendingReply[] = [];
  private failure: Error | undefined;
  private stderrTail = '';
  /** Scratch for decompressing DATA frames: one frame per channel, reused. */
  private readonly scratch = Buffer.allocUnsafe(MAX_CHUNK);
  /** Source bytes the agent read for this channel. */
  bytesRead = 0;

  private constructor(
    private readonly streams: AgentStreams,
    private readonly limiter: RateLimiter | undefined,
  ) {
    this.reader = new FrameReader(streams.output, `agent at ${streams.where}`);
    streams.errors.on('data', (d: Buffer) => (this.stderrTail = (this.stderrTail + d.toString('utf8')).slice(-STDERR_TAIL)));
    // Writes after the agent died fail through the reader; the error event must not crash the process.
    streams.input.on('error', () => undefined);
  }

  /** Waits for the agent's HELLO and checks that it speaks this protocol. */
  static async start(streams: AgentStreams, limiter?: RateLimiter): Promise<AgentChannel> {
    const channel = new AgentChannel(streams, limiter);
    let hello: Frame | undefined;
    try {
      hello = await channel.reader.next();
    } catch (err) {
      throw channel.lost(err);
    }
    if (!hello) throw channel.lost(undefined);
    const h = hello.header;
    if (h.type !== FrameType.Hello || h.hash.readBigUInt64LE(0) !== AGENT_MAGIC) throw new ProtocolError(`${streams.where}: the agent did not start (no HELLO)`);
    if (h.offset !== PROTOCOL_VERSION) throw new ProtocolError(`${streams.where}: agent speaks protocol ${h.offset}, Ferry ${PROTOCOL_VERSION}`);
    void channel.pump();
    return channel;
  }

  /** Requests in flight: the pool sends new work to the least busy channel. */
  get pending(): number {
    return this.queue.length;
  }

  info(): Promise<AgentInfo> {
    let info: AgentInfo | undefined;
    return this.request({ op: Op.Info }, async ({ header, payload }) => {
      expect(header.type === FrameType.Info, 'INFO', header.type);
      info = decodeInfo(payload);
      return true;
    }).then(() => info!);
  }

  /** READ: DATA frames, each a run of chunksPerFrame chunks (the last shorter), strictly in order, then END. */
  read(offset: number, length: number, chunkSize: number, level: number, onRun: (run: ReceivedRun) => Promise<void>): Promise<void> {
    let next = offset;
    const end = offset + length;
    const frameBytes = chunksPerFrame(chunkSize) * chunkSize;
    return this.request({ op: Op.Read, offset, length, chunk: chunkSize, arg: level }, async ({ header, payload }) => {
      if (header.type === FrameType.End) {
        if (next !== end) throw new ProtocolError(`${this.streams.where}: READ ended at ${next}, before ${end}`);
        return true;
      }
      expect(header.type === FrameType.Data, 'DATA', header.type);
      const want = Math.min(frameBytes, end - next);
      if (header.offset !== next || header.length !== want) {
        throw new ProtocolError(`${this.streams.where}: data ${header.offset}+${header.length} where ${next}+${want} was due`);
      }
      const { data, hashes } = await decodeDataFrame(header, payload, chunkSize, this.scratch, this.streams.where);
      this.bytesRead += header.length;
      next += header.length;
      await onRun({ offset: header.offset, length: header.length, hashes, data });
      return false;
    });
  }

  /** HASH: 8 bytes per `group` chunks of the range (see BlockSource.hashes). */
  hashes(offset: number, length: number, chunkSize: number, group = 1): Promise<Buffer> {
    if (!Number.isInteger(group) || group < 1 || group > MAX_HASH_GROUP) throw new RangeError(`hash group of ${group} chunks`);
    const span = chunkSize * group;
    const count = Math.ceil(length / span);
    const out = Buffer.alloc(count * 8);
    let got = 0;
    return this.request({ op: Op.Hash, offset, length, chunk: chunkSize, arg: group }, async ({ header, payload }) => {
      if (header.type === FrameType.End) {
        if (got !== count) throw new ProtocolError(`${this.streams.where}: ${got} hashes where ${count} were due`);
        return true;
      }
      expect(header.type === FrameType.Hashes, 'HASHES', header.type);
      if (header.offset !== offset + got * span || got + header.length > count) throw new ProtocolError(`${this.streams.where}: hashes out of order`);
      payload.copy(out, got * 8);
      got += header.length;
      this.bytesRead += Math.min(header.length * span, offset + length - header.offset);
      return false;
    }).then(() => out);
  }

  /** UNLINK_SELF: removes the pushed binary this agent runs from, and its directory, on the source. */
  unlinkSelf(): Promise<void> {
    return this.request({ op: Op.UnlinkSelf }, async ({ header }) => {
      expect(header.type === FrameType.Unlinked, 'UNLINKED', header.type);
      return true;
    });
  }

  /** SEGMENTS: the ranges of [offset, offset+length) that hold data, ascending and inside the range. */
  segments(offset: number, length: number): Promise<Array<[number, number]>> {
    const out: Array<[number, number]> = [];
    let last = offset;
    return this.request({ op: Op.Segments, offset, length }, async ({ header, payload }) => {
      if (header.type === FrameType.End) return true;
      expect(header.type === FrameType.Segments, 'SEGMENTS', header.type);
      for (let i = 0; i < header.length; i++) {
        const start = Number(payload.readBigUInt64LE(i * 16));
        const stop = Number(payload.readBigUInt64LE(i * 16 + 8));
        if (!(start >= last && stop > start && stop <= offset + length)) throw new ProtocolError(`${this.streams.where}: segment ${start}-${stop} out of order or range`);
        out.push([start, stop]);
        last = stop;
      }
      return false;
    }).then(() => out);
  }

  freeze(mountPoints: string[], timeoutMs: number): Promise<void> {
    const extra = Buffer.concat(mountPoints.map((m) => Buffer.from(m + '\0')));
    return this.request({ op: Op.Freeze, length: timeoutMs, extra }, async ({ header }) => {
      expect(header.type === FrameType.Frozen, 'FROZEN', header.type);
      return true;
    });
  }

  thaw(): Promise<{ heldUntilThaw: boolean }> {
    let held = false;
    return this.request({ op: Op.Thaw }, async ({ header }) => {
      expect(header.type === FrameType.Thawed, 'THAWED', header.type);
      held = (header.flags & THAWED_BY_WATCHDOG) === 0;
      return true;
    }).then(() => ({ heldUntilThaw: held }));
  }

  /** Ends the agent's stdin: it exits (thawing anything it froze). */
  close(): void {
    this.fail(new SourceConnectionError(`${this.streams.where}: channel closed`));
    this.streams.input.end();
  }

  private request(req: Request, onFrame: PendingReply['onFrame']): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<void>((resolve, reject) => {
      this.queue.push({
        onFrame: async (f) => {
          const done = await onFrame(f);
          if (done) resolve();
          return done;
        },
        reject,
      });
      this.streams.input.write(encodeRequest(req));
    });
  }

  private async pump(): Promise<void> {
    try {
      for (;;) {
        let frame: Frame | undefined;
        try {
          frame = await this.reader.next();
        } catch (err) {
          throw this.lost(err);
        }
        if (!frame) {
          if (this.queue.length || !this.failure) throw this.lost(undefined);
          return;
        }
        await this.limiter?.take(HEADER_SIZE + frame.payload.length);
        const current = this.queue[0];
        if (!current) throw new ProtocolError(`${this.streams.where}: frame type ${frame.header.type} without a request`);
        if (frame.header.type === FrameType.Error) {
          // The request failed at the source; the agent goes on serving the next one.
          this.queue.shift();
          current.reject(new AgentError(`${this.streams.where}: ${frame.payload.toString('utf8')}`));
          continue;
        }
        if (await current.onFrame(frame)) this.queue.shift();
      }
    } catch (err) {
      // Protocol violations, a lost stream, or the consumer's own failure (a full disk): all end the channel.
      this.fail(err instanceof Error ? err : new Error(String(err)));
      this.streams.output.destroy();
      this.streams.input.destroy();
    }
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const p of this.queue.splice(0)) p.reject(this.failure);
  }

  private lost(cause: unknown): Error {
    if (cause instanceof ProtocolError && !cause.message.includes('closed in the middle')) return cause;
    if (cause instanceof SourceConnectionError || cause instanceof AgentError) return cause;
    const said = this.stderrTail.trim();
    const sudoSaid = said
      .split('\n')
      .reverse()
      .find((line) => line.startsWith('sudo: '));
    if (sudoSaid) {
      return new SourceConnectionError(
        `${this.streams.where}: sudo would not run Ferry's agent as root (${sudoSaid.trim()}): the login user needs sudo rights, and --password-env when sudo asks for a password`,
        { cause },
      );
    }
    return new SourceConnectionError(
      `${this.streams.where}: the connection to the agent was lost${said ? ` (agent said: ${said.split('\n').slice(-3).join(' ')})` : ''}`,
      { cause },
    );
  }
}

function expect(ok: boolean, what: string, got: number): void {
  if (!ok) throw new ProtocolError(`agent sent frame type ${got} where ${what} was due`);
}
