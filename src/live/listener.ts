/**
 * The destination end (`ferry migrate-listen`): accepts one migration, writes pages into the destination's
 * RAM file, keeps the digest of every page it holds, and lets the VM resume only after the source's digest
 * of its whole final memory matched. Anything but a commit — an abort, a lost connection, a mismatch —
 * discards the destination VM.
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import { errorMessage } from '../errors.js';
import { native } from '../native.js';
import { MigrationError } from './errors.js';
import { PageLedger, digestFilePages } from './ledger.js';
import { FrameChannel, MessageType, PROTOCOL_VERSION, parseJson, readU32Array, type Frame, type HelloMessage } from './protocol.js';
import type { DestinationVm } from './types.js';

export interface ListenerOptions {
  host: string;
  port: number;
  destination: DestinationVm;
  /** For `--engine qemu`: QEMU's own incoming migration on the destination VM. */
  nativeIncoming?: NativeIncoming;
  log?: Logger;
}

/** QEMU's own incoming migration, for the QEMU-native mode. */
export interface NativeIncoming {
  /** Starts QEMU listening; returns the TCP port on the listen address. */
  open(): Promise<number>;
  /** Resolves when QEMU's incoming migration completed (the VM is loaded and paused). */
  completed(): Promise<void>;
}

export interface IncomingReport {
  outcome: 'resumed' | 'discarded';
  reason?: string;
  mode?: 'ferry' | 'qemu';
  pagesReceived: number;
  bytesReceived: number;
}

/** Accepts one migration on host:port. `result` settles when it resumed the VM or discarded it. */
export class MigrationListener {
  readonly result: Promise<IncomingReport>;
  private settle!: (r: IncomingReport) => void;
  private session?: Session;
  private readonly orphans = new Set<Socket>();

  private constructor(
    private readonly server: Server,
    private readonly options: ListenerOptions,
  ) {
    this.result = new Promise((resolve) => (this.settle = resolve));
    server.on('connection', (socket) => this.accept(socket));
  }

  static listen(options: ListenerOptions): Promise<MigrationListener> {
    return new Promise((resolve, reject) => {
      const server = createServer();
      server.once('error', reject);
      server.listen(options.port, options.host, () => {
        server.off('error', reject);
        resolve(new MigrationListener(server, options));
      });
    });
  }

  get address(): { host: string; port: number } {
    const a = this.server.address() as AddressInfo;
    return { host: a.address, port: a.port };
  }

  async close(): Promise<void> {
    for (const s of this.orphans) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(socket: Socket): void {
    const channel = new FrameChannel(socket, `source ${socket.remoteAddress}:${socket.remotePort}`);
    this.orphans.add(socket);
    socket.on('close', () => this.orphans.delete(socket));
    channel
      .next()
      .then(async (first) => {
        if (first.type === MessageType.Hello) {
          if (this.session) throw new MigrationError('a migration is already in progress');
          this.session = new Session(channel, parseJson<HelloMessage>(first.payload), this.options);
          const report = await this.session.run();
          this.settle(report);
        } else if (first.type === MessageType.Join) {
          const join = parseJson<{ session: string; stream: number }>(first.payload);
          if (!this.session || this.session.id !== join.session) throw new MigrationError('a page stream for an unknown session');
          await this.session.runStream(channel);
        } else {
          throw new MigrationError(`unexpected first message ${first.type}`);
        }
      })
      .catch(async (err) => {
        this.options.log?.warn({ err: errorMessage(err) }, 'migration connection failed');
        await channel.sendJson(MessageType.Error, { message: errorMessage(err) }).catch(() => undefined);
        channel.destroy();
      });
  }
}

class Session {
  readonly id: string;
  /** The destination's RAM file, mapped writable: pages are decoded straight into it. */
  private memory?: Uint8Array;
  private ledger?: PageLedger;
  private pagesReceived = 0;
  private bytesReceived = 0;
  private readonly streams: FrameChannel[] = [];
  /** Set once the memory was verified: from then on no page may change. */
  private sealed = false;
  /** Set when the session ends: page streams stop applying what they still hold. */
  private ended = false;
  /** Page batches being written. The session ends only once they are done: no page may change after it. */
  private readonly applying = new Set<Promise<unknown>>();

  constructor(
    private readonly control: FrameChannel,
    private readonly hello: HelloMessage,
    private readonly options: ListenerOptions,
  ) {
    this.id = hello.session;
  }

  async run(): Promise<IncomingReport> {
    const { destination, log } = this.options;
    const { hello, control } = this;
    let resumed = false;
    try {
      if (hello.protocol !== PROTOCOL_VERSION) throw new MigrationError(`protocol ${hello.protocol} is not supported (this side speaks ${PROTOCOL_VERSION})`);
      if (hello.mode === 'qemu') return await this.runNative();
      const fd = await destination.openMemory(hello.pageSize, hello.pageCount);
      this.ledger = await digestFile(fd, hello.pageSize, hello.pageCount);
      this.memory = new Uint8Array(native.mapShared(fd, hello.pageSize * hello.pageCount, true));
      await control.sendJson(MessageType.Welcome, { destination: destination.description });
      log?.info({ pageSize: hello.pageSize, pageCount: hello.pageCount, streams: hello.streams }, 'incoming migration');

      // The destination gets ready for the device state now, so that at switchover only the state itself
      // is left to load; it may then load while the last pages arrive, since the VM resumes only on COMMIT.
      const device = new ChunkQueue();
      const loading = destination.loadDeviceState(device);
      loading.catch(() => undefined); // awaited at DEVICE_END and COMMIT
      let deviceEnded = false;
      let deviceBytes = 0;
      for (;;) {
        const frame = await control.next();
        if (frame.type === MessageType.Verify) {
          const theirs = frame.payload.readBigUInt64LE(0);
          const ours = this.ledger.combined();
          this.sealed = theirs === ours;
          await control.sendJson(MessageType.Verified, { ok: this.sealed, digest: ours.toString(16) });
          log?.info({ ok: this.sealed }, 'memory digest compared');
        } else if (frame.type === MessageType.Device) {
          if (deviceEnded) throw new MigrationError('device state after its end');
          deviceBytes += frame.payload.length;
          device.push(frame.payload);
        } else if (frame.type === MessageType.DeviceEnd) {
          if (deviceBytes === 0) throw new MigrationError('no device state was sent');
          deviceEnded = true;
          device.end();
          // Answered when loaded, without holding up the digest comparison; a failed load ends the session.
          loading.then(
            () => control.send(MessageType.DeviceLoaded).catch(() => undefined),
            (err) => this.failControl(err),
          );
        } else if (frame.type === MessageType.Commit) {
          if (!deviceEnded) throw new MigrationError('commit before the device state');
          if (!this.sealed) throw new MigrationError('commit before the memory was verified');
          await loading;
          await destination.resume();
          resumed = true;
          await control.send(MessageType.Resumed);
          log?.info('destination resumed');
          return this.report('resumed');
        } else if (frame.type === MessageType.Abort) {
          throw new MigrationError(`the source aborted: ${parseJson<{ reason: string }>(frame.payload).reason}`);
        } else {
          throw new MigrationError(`unexpected message ${frame.type} on the control connection`);
        }
      }
    } catch (err) {
      if (resumed) return this.report('resumed');
      this.ended = true;
      for (const s of this.streams) s.destroy();
      await Promise.allSettled(this.applying);
      await destination.discard().catch((e) => log?.error({ err: errorMessage(e) }, 'discarding the destination failed'));
      log?.warn({ reason: errorMessage(err) }, 'incoming migration discarded');
      return this.report('discarded', errorMessage(err));
    } finally {
      this.ended = true;
      await Promise.allSettled(this.applying);
      this.memory = undefined; // unmapped when collected
      await destination.close().catch(() => undefined);
    }
  }

  /** Tells the source why, then closes the control connection: the session's loop then discards the VM. */
  private failControl(err: unknown): void {
    const { control } = this;
    void control
      .sendJson(MessageType.Error, { message: errorMessage(err) })
      .catch(() => undefined)
      .finally(() => control.close());
  }

  /** A page stream: apply PAGES in order, answer FLUSH once everything before it is in the file. */
  async runStream(channel: FrameChannel): Promise<void> {
    this.streams.push(channel);
    const { pageSize } = this.hello;
    for (;;) {
      let frame: Frame;
      try {
        frame = await channel.next();
      } catch {
        return; // the session notices a lost source through its control connection
      }
      if (this.ended) return;
      if (frame.type === MessageType.Pages) {
        if (this.sealed || !this.ledger || !this.memory) throw new MigrationError('pages after the memory was verified');
        const p = frame.payload;
        const count = p.readUInt32LE(0);
        const pages = readU32Array(p, 4, count);
        const kinds = readU32Array(p, 4 + count * 4, count * 2);
        for (let i = 0; i < count; i++) if (pages[i] >= this.hello.pageCount) throw new MigrationError(`page ${pages[i]} is beyond the memory`);
        const meta = new Uint32Array(count * 4);
        for (let i = 0; i < count; i++) {
          meta[i * 4] = kinds[i * 2];
          meta[i * 4 + 1] = kinds[i * 2 + 1];
        }
        const payload = p.subarray(4 + count * 12);
        const applied = native.applyPages(this.memory, pageSize, count, pages, payload, meta, this.ledger.digests);
        this.applying.add(applied);
        try {
          await applied;
        } finally {
          this.applying.delete(applied);
        }
        this.ledger.recordBatch(pages, count, meta);
        this.pagesReceived += count;
        this.bytesReceived += p.length;
      } else if (frame.type === MessageType.Flush) {
        await channel.send(MessageType.Flushed, frame.payload);
      } else {
        throw new MigrationError(`unexpected message ${frame.type} on a page stream`);
      }
    }
  }

  /** QEMU-native mode: QEMU moves the memory itself; this side opens QEMU's incoming and resumes on commit. */
  private async runNative(): Promise<IncomingReport> {
    const { control, options } = this;
    if (!options.nativeIncoming) throw new MigrationError('this destination cannot take a QEMU-native migration');
    await control.sendJson(MessageType.Welcome, { destination: options.destination.description });
    await control.expect(MessageType.NativeIncoming);
    const port = await options.nativeIncoming.open();
    await control.sendJson(MessageType.NativeReady, { port });
    const frame = await control.next();
    if (frame.type === MessageType.Abort) throw new MigrationError(`the source aborted: ${parseJson<{ reason: string }>(frame.payload).reason}`);
    if (frame.type !== MessageType.Commit) throw new MigrationError(`unexpected message ${frame.type}`);
    await options.nativeIncoming.completed();
    await options.destination.resume();
    await control.send(MessageType.Resumed);
    return { ...this.report('resumed'), mode: 'qemu' };
  }

  private report(outcome: IncomingReport['outcome'], reason?: string): IncomingReport {
    return { outcome, reason, mode: this.hello.mode, pagesReceived: this.pagesReceived, bytesReceived: this.bytesReceived };
  }
}

/** Digests of what the RAM file holds now: its content is not assumed. */
async function digestFile(fd: number, pageSize: number, pageCount: number): Promise<PageLedger> {
  const ledger = new PageLedger(pageCount);
  await digestFilePages(fd, pageSize, pageCount, ledger.digests);
  return ledger;
}

/** Device state chunks as they arrive, consumed by the destination VM as an async iterable. */
class ChunkQueue implements AsyncIterable<Buffer> {
  private readonly chunks: Buffer[] = [];
  private done = false;
  private wake?: () => void;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.wake?.();
  }

  end(): void {
    this.done = true;
    this.wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Buffer> {
    for (;;) {
      const chunk = this.chunks.shift();
      if (chunk) {
        yield chunk;
        continue;
      }
      if (this.done) return;
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
  }
}
