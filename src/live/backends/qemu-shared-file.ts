/**
 * Real QEMU VMs whose guest RAM is a shared file:
 *   -object memory-backend-file,id=mem,size=…,mem-path=/dev/shm/vm.ram,share=on -machine memory-backend=mem
 *
 * Source: Ferry reads guest RAM through one shared mapping of the file while QEMU runs (the first round with
 * pread, so that holes stay holes), finds dirty pages with soft-dirty bits when the kernel has them (probed)
 * or by page digests, and pauses/resumes/throttles the vCPUs over QMP. Destination: QEMU waits with `-incoming defer -S` on its own RAM file, which the
 * listener fills. The device state crosses in QEMU's own migration stream with the x-ignore-shared
 * capability (shared RAM is left out of it), tunnelled through Ferry's connection over unix sockets.
 */
import { createServer, connect, type Socket } from 'node:net';
import { mkdtemp, open, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type { Logger } from 'pino';
import { native } from '../../native.js';
import { MigrationError } from '../errors.js';
import type { PageLedger } from '../ledger.js';
import { PageHashTracker } from '../dirty/page-hash.js';
import { SoftDirtyTracker, findFileMapping, probeSoftDirty } from '../dirty/soft-dirty.js';
import { QmpClient, queryStatus, setMigrationCapabilities, waitMigrationStatus, watchMigrationEnd } from '../qmp.js';
import type { NativeIncoming } from '../listener.js';
import type { DestinationVm, DeviceStateSink, DirtySliceSink, DirtyTracker, MemoryBackend } from '../types.js';

export const PAGE_SIZE = 4096;

export type TrackerChoice = 'auto' | 'soft-dirty' | 'page-hash';

export interface QemuSourceOptions {
  qmpSocket: string;
  ramPath: string;
  tracker?: TrackerChoice;
  log?: Logger;
}

/** Checks that QEMU has a shared memory backend of the file's size: x-ignore-shared then leaves it out. */
async function checkSharedBackend(qmp: QmpClient, ramPath: string, size: number): Promise<void> {
  const memdevs = await qmp.execute<Array<{ id?: string; size: number; share: boolean }>>('query-memdev');
  if (!memdevs.some((m) => m.share && m.size === size)) {
    throw new MigrationError(
      `QEMU has no shared memory backend of ${size} bytes for ${ramPath}: start it with -object memory-backend-file,…,mem-path=${ramPath},share=on -machine memory-backend=…`,
    );
  }
}

async function openRam(ramPath: string, flags: 'r' | 'r+'): Promise<{ handle: FileHandle; size: number }> {
  const handle = await open(ramPath, flags);
  const { size } = await handle.stat();
  if (size === 0 || size % PAGE_SIZE !== 0) {
    await handle.close();
    throw new MigrationError(`${ramPath}: ${size} bytes is not a whole number of ${PAGE_SIZE}-byte pages`);
  }
  return { handle, size };
}

/**
 * Who wants the vCPUs stopped: the engine's pause, the throttle's off phase, a soft-dirty collection.
 * QEMU is stopped while any of them holds and continued when the last lets go; commands go out in order.
 */
class VcpuControl {
  private holds = 0;
  private chain: Promise<unknown> = Promise.resolve();

  constructor(private readonly qmp: QmpClient) {}

  hold(): Promise<void> {
    return this.serial(async () => {
      if (this.holds++ === 0) await this.qmp.execute('stop');
    });
  }

  release(): Promise<void> {
    return this.serial(async () => {
      if (--this.holds === 0) await this.qmp.execute('cont');
    });
  }

  private serial(fn: () => Promise<void>): Promise<void> {
    const next = this.chain.then(fn);
    this.chain = next.catch(() => undefined);
    return next;
  }
}

/** Auto-converge without QEMU's help: stop/cont duty cycles over QMP, `fraction` of every 100 ms stopped. */
class DutyCycleThrottle {
  private fraction = 0;
  private loop?: Promise<void>;

  constructor(private readonly vcpus: VcpuControl) {}

  async set(fraction: number): Promise<void> {
    this.fraction = fraction;
    if (fraction > 0) this.loop ??= this.run();
    else if (this.loop) {
      await this.loop;
      this.loop = undefined;
    }
  }

  private async run(): Promise<void> {
    const periodMs = 100;
    while (this.fraction > 0) {
      await this.vcpus.hold();
      await delay(periodMs * this.fraction);
      await this.vcpus.release();
      await delay(periodMs * (1 - this.fraction));
    }
  }
}

export class QemuSharedFileSource implements MemoryBackend {
  readonly pageSize = PAGE_SIZE;
  readonly pageCount: number;
  readonly description: string;
  readonly collectsByContent: boolean;
  private readonly vcpus: VcpuControl;
  private readonly throttle: DutyCycleThrottle;
  private paused = false;
  /** x-ignore-shared is on: it must be off again if the VM stays here, or a later QEMU migration would skip its RAM. */
  private ignoringShared = false;

  readonly mappedMemory: { memory: Uint8Array; fd: number };

  private constructor(
    private readonly qmp: QmpClient,
    private readonly ram: FileHandle,
    memory: Uint8Array,
    size: number,
    private readonly tracker: DirtyTracker,
    vcpus: VcpuControl,
    options: QemuSourceOptions,
  ) {
    this.pageCount = size / PAGE_SIZE;
    this.mappedMemory = { memory, fd: ram.fd };
    this.vcpus = vcpus;
    this.throttle = new DutyCycleThrottle(vcpus);
    this.collectsByContent = tracker.method === 'page-hash';
    this.description = `qemu-shared-file ${options.ramPath} (${tracker.method})`;
  }

  static async open(options: QemuSourceOptions): Promise<QemuSharedFileSource> {
    const qmp = await QmpClient.connect(options.qmpSocket);
    let ram: { handle: FileHandle; size: number } | undefined;
    try {
      const status = await queryStatus(qmp);
      if (status !== 'running') throw new MigrationError(`the source VM is '${status}', not running`);
      ram = await openRam(options.ramPath, 'r');
      await checkSharedBackend(qmp, options.ramPath, ram.size);
      const vcpus = new VcpuControl(qmp);
      // One mapping for hashing and for gathering the pages to send: its page tables are filled once.
      const memory = new Uint8Array(native.mapShared(ram.handle.fd, ram.size));
      const tracker = await chooseTracker(options, ram.handle.fd, memory, vcpus);
      options.log?.info({ tracker: tracker.method }, 'dirty tracking chosen');
      return new QemuSharedFileSource(qmp, ram.handle, memory, ram.size, tracker, vcpus, options);
    } catch (err) {
      await ram?.handle.close();
      qmp.close();
      throw err;
    }
  }

  startTracking(ledger: PageLedger): Promise<void> {
    return this.tracker.start(ledger);
  }

  collectDirty(onSlice?: DirtySliceSink, known?: Uint32Array): Promise<Uint32Array> {
    return this.tracker.collect(onSlice, known);
  }

  async readPages(pages: Uint32Array, count: number, out: Buffer): Promise<void> {
    await native.preadPages(this.ram.fd, this.pageSize, pages, count, out);
  }

  async pause(): Promise<void> {
    await this.vcpus.hold();
    this.paused = true;
  }

  async resume(): Promise<void> {
    if (!this.paused) return;
    this.paused = false;
    await this.vcpus.release();
    if (this.ignoringShared) {
      this.ignoringShared = false;
      // Best effort, after the VM runs again (what matters most); QEMU refuses only while a migration is under way.
      await setMigrationCapabilities(this.qmp, { 'x-ignore-shared': false }).catch(() => undefined);
    }
  }

  setThrottle(fraction: number): Promise<void> {
    return this.throttle.set(fraction);
  }

  /** QEMU's migration of everything but the shared RAM, into a unix socket Ferry listens on. */
  async saveDeviceState(sink: DeviceStateSink): Promise<void> {
    await setMigrationCapabilities(this.qmp, { 'x-ignore-shared': true, events: true });
    this.ignoringShared = true;
    const dir = await mkdtemp(join(tmpdir(), 'ferry-devstate-'));
    const path = join(dir, 'out.sock');
    const server = createServer();
    let socket: Socket | undefined;
    try {
      const accepted = new Promise<Socket>((resolve) => server.once('connection', resolve));
      await new Promise<void>((resolve, reject) => server.listen(path, resolve).once('error', reject));
      const ended = watchMigrationEnd(this.qmp);
      await this.qmp.execute('migrate', { uri: `unix:${path}` });
      const failedEarly = ended(30_000).then((i) => Promise.reject(new MigrationError(`QEMU could not save the device state: ${i['error-desc'] ?? i.status}`)));
      failedEarly.catch(() => undefined);
      socket = await Promise.race([accepted, failedEarly]);
      for await (const chunk of socket) await sink(chunk as Buffer);
      const info = await ended(30_000);
      if (info.status !== 'completed') throw new MigrationError(`QEMU could not save the device state: ${info['error-desc'] ?? info.status}`);
    } catch (err) {
      // QEMU must be done with this migration before the VM can run here again.
      socket?.destroy();
      await this.qmp.execute('migrate_cancel').catch(() => undefined);
      await waitMigrationStatus(this.qmp, ['completed', 'failed', 'cancelled'], 10_000).catch(() => undefined);
      throw err;
    } finally {
      server.close();
      await rm(dir, { recursive: true, force: true });
    }
  }

  async handedOver(): Promise<void> {
    // QEMU stays in 'postmigrate': stopped for good, its memory intact for inspection until the operator quits it.
  }

  async close(): Promise<void> {
    await this.throttle.set(0);
    await this.tracker.close();
    await this.ram.close();
    this.qmp.close();
  }
}

async function chooseTracker(options: QemuSourceOptions, fd: number, memory: Uint8Array, vcpus: VcpuControl): Promise<DirtyTracker> {
  const size = memory.length;
  const choice = options.tracker ?? 'auto';
  if (choice !== 'page-hash') {
    const mapping = await findFileMapping(options.ramPath, size);
    const supported = mapping !== undefined && (await probeSoftDirty(mapping, PAGE_SIZE));
    if (supported) {
      return new SoftDirtyTracker(mapping, PAGE_SIZE, async (fn) => {
        await vcpus.hold();
        try {
          return await fn();
        } finally {
          await vcpus.release();
        }
      });
    }
    if (choice === 'soft-dirty') throw new MigrationError('soft-dirty tracking is not available: the kernel does not set soft-dirty bits for the guest RAM mapping');
  }
  return new PageHashTracker(fd, memory, PAGE_SIZE, size / PAGE_SIZE);
}

export interface QemuDestinationOptions {
  qmpSocket: string;
  ramPath: string;
  /** Address QEMU listens on for --engine qemu (QEMU's own TCP migration). */
  nativeHost?: string;
  log?: Logger;
}

export class QemuSharedFileDestination implements DestinationVm, NativeIncoming {
  readonly description: string;
  private ram?: FileHandle;

  private constructor(
    private readonly qmp: QmpClient,
    private readonly options: QemuDestinationOptions,
  ) {
    this.description = `qemu-shared-file ${options.ramPath}`;
  }

  static async open(options: QemuDestinationOptions): Promise<QemuSharedFileDestination> {
    const qmp = await QmpClient.connect(options.qmpSocket);
    const status = await queryStatus(qmp).catch((err) => {
      qmp.close();
      throw err;
    });
    if (status !== 'inmigrate') {
      qmp.close();
      throw new MigrationError(`the destination VM is '${status}': start it with -incoming defer -S`);
    }
    return new QemuSharedFileDestination(qmp, options);
  }

  async openMemory(pageSize: number, pageCount: number): Promise<number> {
    if (pageSize !== PAGE_SIZE) throw new MigrationError(`page size ${pageSize} is not supported`);
    const { handle, size } = await openRam(this.options.ramPath, 'r+');
    this.ram = handle;
    if (size !== pageSize * pageCount) throw new MigrationError(`${this.options.ramPath} holds ${size} bytes, the source has ${pageSize * pageCount}`);
    await checkSharedBackend(this.qmp, this.options.ramPath, size);
    return handle.fd;
  }

  /**
   * Feeds QEMU's incoming migration (x-ignore-shared: device state only) from a unix socket it listens on.
   * QEMU is set listening and connected at once, so when the chunks come only their loading is left.
   */
  async loadDeviceState(chunks: AsyncIterable<Buffer>): Promise<void> {
    await setMigrationCapabilities(this.qmp, { 'x-ignore-shared': true, events: true });
    const dir = await mkdtemp(join(tmpdir(), 'ferry-devstate-'));
    const path = join(dir, 'in.sock');
    let socket: Socket;
    const ended = watchMigrationEnd(this.qmp);
    try {
      await this.qmp.execute('migrate-incoming', { uri: `unix:${path}` });
      socket = await connectUnix(path, 10_000);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
    for await (const chunk of chunks) {
      if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
    }
    socket.end();
    const info = await ended(30_000);
    if (info.status !== 'completed') throw new MigrationError(`QEMU could not load the device state: ${info['error-desc'] ?? info.status}`);
    await this.checkPaused();
  }

  async open(): Promise<number> {
    const port = await freePort(this.options.nativeHost ?? '0.0.0.0');
    await this.qmp.execute('migrate-incoming', { uri: `tcp:${this.options.nativeHost ?? '0.0.0.0'}:${port}` });
    return port;
  }

  /** Waits for QEMU's incoming migration to finish; the VM must then be paused, waiting for Ferry's go. */
  async completed(): Promise<void> {
    const info = await waitMigrationStatus(this.qmp, ['completed', 'failed', 'cancelled'], 120_000);
    if (info.status !== 'completed') throw new MigrationError(`QEMU could not load the device state: ${info['error-desc'] ?? info.status}`);
    await this.checkPaused();
  }

  private async checkPaused(): Promise<void> {
    const status = await queryStatus(this.qmp);
    if (status !== 'paused') throw new MigrationError(`the destination VM is '${status}' after loading: it must be started with -S so that Ferry decides when it runs`);
  }

  async resume(): Promise<void> {
    await this.qmp.execute('cont');
  }

  async discard(): Promise<void> {
    await this.qmp.execute('quit').catch(() => undefined);
  }

  async close(): Promise<void> {
    await this.ram?.close();
    this.ram = undefined;
    this.qmp.close();
  }
}

async function connectUnix(path: string, timeoutMs: number): Promise<Socket> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<Socket>((resolve, reject) => {
        const s = connect(path);
        s.once('connect', () => {
          s.off('error', reject);
          resolve(s);
        });
        s.once('error', reject);
      });
    } catch (err) {
      if (performance.now() > deadline) throw new MigrationError(`QEMU did not open ${path}: ${(err as Error).message}`);
      await delay(10);
    }
  }
}

async function freePort(host: string): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => server.listen(0, host, resolve).once('error', reject));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}
