/**
 * The source end of the protocol: pages read from the MemoryBackend, encoded natively in batches (zero
 * flag, zstd, or a zstd delta against the version sent before) and sent over several TCP streams. After the
 * first round, pages are gathered straight from the backend's mapping of guest RAM when it has one (dirty
 * pages lie scattered: one read per page would cost more than the encoding).
 *
 * Pages are assigned to streams by 2 MiB block, so a page always travels on the same stream: its versions
 * arrive in order, and each stream's delta cache (direct-mapped by page number, like QEMU's XBZRLE cache)
 * is touched by one encode at a time. Each stream reads, encodes and sends its own batches, so with N
 * streams N batches are encoded in parallel on the libuv pool.
 */
import { connect, type Socket } from 'node:net';
import { randomUUID } from 'node:crypto';
import { CacheMode, native } from '../native.js';
import { MigrationError } from './errors.js';
import { unionPages } from './ledger.js';
import { FrameChannel, MessageType, PAGE_HEADER_BYTES, PROTOCOL_VERSION, parseJson, u64Bytes, LivePageKind, type Frame, type HelloMessage } from './protocol.js';
import type { MemoryBackend, PageTransport, SendContext, SendCounters } from './types.js';

export interface SenderOptions {
  host: string;
  port: number;
  backend: MemoryBackend;
  /** Parallel page streams (default 2). */
  streams?: number;
  /** Pages per batch (default 256: 1 MiB of 4 KiB pages). */
  batchPages?: number;
  /** Total delta cache, bytes, split over the streams (default 64 MiB, as QEMU's xbzrle-cache-size; 0 disables deltas). */
  cacheBytes?: number;
  /** zstd level (default 1). */
  compressionLevel?: number;
  /** Timeout for connecting and for each answer of the destination, ms. */
  timeoutMs?: number;
}

/** Pages per stream block: 512 pages of 4 KiB = 2 MiB. */
const STREAM_BLOCK_SHIFT = 9;
/** Encoded batches per stream that may wait in its socket while the next one is encoded. */
const OUT_BUFFERS = 2;

interface Stream {
  index: number;
  channel: FrameChannel;
  cache: Buffer;
  tags: Int32Array;
  src: Buffer;
  /** Encoded batches, reused in turn once the socket has written them (fresh megabytes per batch cost page faults). */
  outs: Array<{ buffer: Buffer; written: Promise<void> }>;
  nextOut: number;
}

export class NetworkSender implements PageTransport {
  private flushSeq = 0;
  private deviceStateStarted = false;
  /**
   * Per page, the encoder's state: whether it held data when last read (a mapping read of it then allocates
   * nothing) and its raw sends in a row (the encoder stops trying zstd on pages that never compress).
   */
  private readonly pageStates: Uint8Array;
  /**
   * Control replies not claimed yet. The destination answers in its own order, not in the order the
   * answers are awaited: the device state may finish loading before or after the digests are compared.
   */
  private readonly replies: Frame[] = [];
  private reading?: Promise<void>;

  private constructor(
    private readonly control: FrameChannel,
    private readonly streams: Stream[],
    private readonly backend: MemoryBackend,
    private readonly batchPages: number,
    private readonly level: number,
    private readonly timeoutMs: number,
  ) {
    this.pageStates = new Uint8Array(backend.pageCount);
  }

  private measuredRttMs = 0;

  get rttMs(): number {
    return this.measuredRttMs;
  }

  static async connect(options: SenderOptions): Promise<NetworkSender> {
    const { backend } = options;
    const streamCount = options.streams ?? 2;
    const batchPages = options.batchPages ?? 256;
    const timeoutMs = options.timeoutMs ?? 30_000;
    const session = randomUUID();
    const peer = `destination ${options.host}:${options.port}`;
    const control = new FrameChannel(await open(options.host, options.port, timeoutMs), peer);
    const opened: FrameChannel[] = [control];
    try {
      const hello: HelloMessage = { protocol: PROTOCOL_VERSION, session, mode: 'ferry', pageSize: backend.pageSize, pageCount: backend.pageCount, streams: streamCount };
      await control.sendJson(MessageType.Hello, hello);
      await withTimeout(control.expect(MessageType.Welcome), timeoutMs, `${peer} did not answer`);
      const cachePages = Math.floor((options.cacheBytes ?? 64 * 1024 * 1024) / backend.pageSize / streamCount);
      const streams: Stream[] = [];
      for (let index = 0; index < streamCount; index++) {
        const channel = new FrameChannel(await open(options.host, options.port, timeoutMs), `${peer} (stream ${index})`);
        opened.push(channel);
        await channel.sendJson(MessageType.Join, { session, stream: index });
        streams.push({
          index,
          channel,
          cache: Buffer.alloc(cachePages * backend.pageSize),
          tags: new Int32Array(cachePages).fill(-1),
          src: Buffer.allocUnsafe(batchPages * backend.pageSize),
          outs: Array.from({ length: OUT_BUFFERS }, () => ({ buffer: Buffer.allocUnsafe(batchPages * backend.pageSize), written: Promise.resolve() })),
          nextOut: 0,
        });
      }
      const sender = new NetworkSender(control, streams, backend, batchPages, options.compressionLevel ?? 1, timeoutMs);
      // The round trip of an empty flush: what each of the switchover's exchanges costs besides its work.
      const started = performance.now();
      await sender.flush();
      sender.measuredRttMs = performance.now() - started;
      return sender;
    } catch (err) {
      for (const c of opened) c.destroy();
      throw err;
    }
  }

  async sendPages(pages: Uint32Array, count: number, send: SendContext) {
    const n = this.streams.length;
    // Split by stream: count, then fill, keeping each list sorted.
    const sizes = new Uint32Array(n);
    for (let i = 0; i < count; i++) sizes[(pages[i] >>> STREAM_BLOCK_SHIFT) % n]++;
    const lists = Array.from(sizes, (s) => new Uint32Array(s));
    const fill = new Uint32Array(n);
    for (let i = 0; i < count; i++) {
      const s = (pages[i] >>> STREAM_BLOCK_SHIFT) % n;
      lists[s][fill[s]++] = pages[i];
    }
    const results = await Promise.all(this.streams.map((s) => this.sendStream(s, lists[s.index], send)));
    const counters: SendCounters = { pages: 0, zeroPages: 0, deltaPages: 0, compressedPages: 0, rawPages: 0, wireBytes: 0 };
    let unsent: Uint32Array = new Uint32Array(0);
    for (const r of results) {
      counters.pages += r.counters.pages;
      counters.zeroPages += r.counters.zeroPages;
      counters.deltaPages += r.counters.deltaPages;
      counters.compressedPages += r.counters.compressedPages;
      counters.rawPages += r.counters.rawPages;
      counters.wireBytes += r.counters.wireBytes;
      unsent = unionPages(unsent, r.unsent);
    }
    return { counters, unsent };
  }

  private async sendStream(s: Stream, list: Uint32Array, { round, final, pacer, stop, ledger }: SendContext) {
    const { pageSize, mappedMemory } = this.backend;
    const counters: SendCounters = { pages: 0, zeroPages: 0, deltaPages: 0, compressedPages: 0, rawPages: 0, wireBytes: 0 };
    // The first round reads every page, holes of the RAM file included: pread leaves them holes.
    const gather = round >= 2 ? mappedMemory : undefined;
    // Pages cached only from the second round: the first sends everything once, the later ones are the hot set;
    // the stop-and-copy has no later round to cache for.
    const cacheMode = final ? CacheMode.Lookup : round >= 2 ? CacheMode.Insert : CacheMode.Refresh;
    for (let first = 0; first < list.length; first += this.batchPages) {
      if (stop()) return { counters, unsent: list.slice(first) };
      const count = Math.min(this.batchPages, list.length - first);
      // A copy: the batch's page numbers are sent as they are and must not change while queued.
      const batch = list.slice(first, first + count);
      if (!gather) await this.backend.readPages(batch, count, s.src);
      const out = s.outs[s.nextOut];
      s.nextOut = (s.nextOut + 1) % s.outs.length;
      await out.written;
      const meta = new Uint32Array(count * 4);
      const bytes = await native.encodePages(
        gather ? gather.memory : s.src,
        gather ? gather.fd : -1,
        pageSize,
        count,
        batch,
        s.cache,
        s.tags,
        cacheMode,
        this.level,
        out.buffer,
        meta,
        this.pageStates,
      );
      ledger.recordBatch(batch, count, meta);
      const head = Buffer.allocUnsafe(4);
      head.writeUInt32LE(count, 0);
      const kinds = new Uint32Array(count * 2);
      for (let i = 0; i < count; i++) {
        const kind = meta[i * 4];
        kinds[i * 2] = kind;
        kinds[i * 2 + 1] = meta[i * 4 + 1];
        if (kind === LivePageKind.Zero) counters.zeroPages++;
        else if (kind === LivePageKind.Delta) counters.deltaPages++;
        else if (kind === LivePageKind.Zstd) counters.compressedPages++;
        else counters.rawPages++;
      }
      const wire = 4 + count * PAGE_HEADER_BYTES + bytes + 5;
      await pacer.consume(wire);
      ({ written: out.written } = await s.channel.sendTracked(MessageType.Pages, [head, new Uint8Array(batch.buffer), new Uint8Array(kinds.buffer), out.buffer.subarray(0, bytes)]));
      counters.pages += count;
      counters.wireBytes += wire;
    }
    return { counters, unsent: new Uint32Array(0) };
  }

  async flush(): Promise<void> {
    const seq = ++this.flushSeq;
    const body = Buffer.allocUnsafe(4);
    body.writeUInt32LE(seq);
    await Promise.all(
      this.streams.map(async (s) => {
        await s.channel.send(MessageType.Flush, body);
        const reply = await withTimeout(s.channel.expect(MessageType.Flushed), this.timeoutMs, 'the destination did not confirm the pages');
        if (reply.payload.readUInt32LE(0) !== seq) throw new MigrationError('the destination confirmed the wrong flush');
      }),
    );
  }

  async verify(digest: bigint): Promise<void> {
    await this.control.send(MessageType.Verify, u64Bytes(digest));
    const reply = parseJson<{ ok: boolean; digest: string }>((await this.reply(MessageType.Verified, 'no verification answer')).payload);
    if (!reply.ok) {
      throw new MigrationError(`the destination's memory digest ${reply.digest} differs from the source's ${digest.toString(16)}; not switching over`);
    }
  }

  sendDeviceState = async (chunk: Buffer): Promise<void> => {
    this.deviceStateStarted = true;
    await this.control.send(MessageType.Device, chunk);
  };

  async endDeviceState(): Promise<void> {
    if (!this.deviceStateStarted) throw new MigrationError('the source produced no device state');
    await this.control.send(MessageType.DeviceEnd);
    await this.reply(MessageType.DeviceLoaded, 'the destination did not load the device state');
  }

  async commit(): Promise<void> {
    await this.control.send(MessageType.Commit);
    await this.reply(MessageType.Resumed, 'the destination did not confirm that it resumed');
  }

  /** The next control reply of `type`, whatever came before it. */
  private reply(type: MessageType, silence: string): Promise<Frame> {
    const claim = async (): Promise<Frame> => {
      for (;;) {
        const i = this.replies.findIndex((f) => f.type === type);
        if (i >= 0) return this.replies.splice(i, 1)[0];
        // One read at a time; every waiter looks at what it brought.
        this.reading ??= this.control
          .next()
          .then((f) => void this.replies.push(f))
          .finally(() => (this.reading = undefined));
        await this.reading;
      }
    };
    return withTimeout(claim(), this.timeoutMs, silence);
  }

  async abort(reason: string): Promise<void> {
    if (!this.control.failed) await this.control.sendJson(MessageType.Abort, { reason });
  }

  async close(): Promise<void> {
    for (const c of [this.control, ...this.streams.map((s) => s.channel)]) c.close();
  }
}

function open(host: string, port: number, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new MigrationError(`cannot connect to ${host}:${port}: timed out`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.off('error', onError);
      resolve(socket);
    });
    const onError = (err: Error) => {
      clearTimeout(timer);
      reject(new MigrationError(`cannot connect to ${host}:${port}: ${err.message}`, { cause: err }));
    };
    socket.once('error', onError);
  });
}

export function withTimeout<T>(promise: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new MigrationError(`${message} within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}
