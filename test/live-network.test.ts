// The engine over the real protocol on loopback: a synthetic VM (wall clock) to a listener writing a RAM file.
import { createServer, connect, type AddressInfo, type Server, type Socket } from 'node:net';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { wallClock } from '../src/live/clock.js';
import { FerryMigration } from '../src/live/engine.js';
import { MigrationListener } from '../src/live/listener.js';
import { NetworkSender } from '../src/live/sender.js';
import { SyntheticDestination, SyntheticVm } from '../src/live/backends/synthetic.js';
import { hotSetModel } from '../src/live/workloads.js';
import { tempDir } from './helpers/env.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const PAGES = 4096; // 16 MiB

describe('live migration over loopback (synthetic VM)', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => ({ dir, cleanup } = await tempDir('ferry-live-')));
  afterAll(() => cleanup());

  async function setup(name: string, options: { rate?: number; zeroFraction?: number; via?: (port: number) => Promise<number> } = {}) {
    const vm = new SyntheticVm({ pageCount: PAGES, pageSize: PAGE, model: hotSetModel(0.1, 40 * MiB, 1 * MiB), clock: wallClock, zeroFraction: options.zeroFraction, seed: 3 });
    const destination = new SyntheticDestination(join(dir, `${name}.ram`));
    const listener = await MigrationListener.listen({ host: '127.0.0.1', port: 0, destination });
    const port = options.via ? await options.via(listener.address.port) : listener.address.port;
    const sender = await NetworkSender.connect({ host: '127.0.0.1', port, backend: vm, streams: 2 });
    const migration = new FerryMigration({
      backend: vm,
      transport: sender,
      limits: { maxDowntimeMs: 200, initialBandwidth: options.rate ?? 64 * MiB },
      statsIntervalMs: 20,
    });
    return { vm, destination, listener, migration };
  }

  it('migrates: the destination holds exactly the source memory and device state, resumes, and the source stays stopped', async () => {
    const { vm, destination, listener, migration } = await setup('complete');
    const stats: number[] = [];
    migration.on('stats', (s) => stats.push(s.round));
    const report = await migration.start();
    const incoming = await listener.result;
    await listener.close();

    expect(report, report.reason).toMatchObject({ outcome: 'completed', memoryVerified: true, verification: 'sent-pages', sourceRunning: false });
    expect(report.rounds).toBeGreaterThanOrEqual(1);
    expect(stats.length).toBeGreaterThan(0);
    expect(incoming.outcome).toBe('resumed');
    expect(destination.state).toBe('running');
    expect(vm.events).toEqual(['pause', 'handed-over']);

    // Independent of the digests: rebuild every page from the source's final versions and compare bytes.
    const ram = await readFile(destination.ramPath);
    const expected = Buffer.alloc(PAGES * PAGE);
    for (let p = 0; p < PAGES; p++) vm.fillPage(p, vm.versions[p], expected, p * PAGE);
    expect(ram.length).toBe(expected.length);
    expect(ram.equals(expected)).toBe(true);
    expect(destination.deviceState?.equals(Buffer.concat(vm.deviceState()))).toBe(true);
  });

  it('abort mid-migration: the source keeps running untouched and the destination is discarded', async () => {
    const { vm, destination, listener, migration } = await setup('abort', { rate: 4 * MiB });
    migration.on('stats', (s) => s.transferredBytes > 1 * MiB && migration.abort());
    const report = await migration.start();
    const incoming = await listener.result;
    await listener.close();
    expect(report).toMatchObject({ outcome: 'cancelled', sourceRunning: true });
    expect(vm.events).toEqual([]);
    expect(vm.isPaused).toBe(false);
    expect(incoming.outcome).toBe('discarded');
    expect(destination.state).toBe('discarded');
    await expect(stat(destination.ramPath)).rejects.toThrow(/ENOENT/);
  });

  it('a destination that dies mid-migration: the source keeps running', async () => {
    const { vm, listener, migration } = await setup('dies', { rate: 4 * MiB });
    let killed = false;
    migration.on('stats', (s) => {
      if (!killed && s.transferredBytes > 1 * MiB) {
        killed = true;
        void listener.close(); // drops every connection, as a crashed process would
      }
    });
    const report = await migration.start();
    expect(killed).toBe(true);
    expect(report.outcome).toBe('failed');
    expect(report.sourceRunning).toBe(true);
    expect(vm.isPaused).toBe(false);
    expect(vm.events).toEqual([]);
  });

  it('a destination whose memory differs at switchover never resumes, and the source resumes', async () => {
    // A proxy that swaps the first two page numbers of one batch of cold pages: the destination then holds
    // two pages in each other's place, which no later round repairs.
    let tampered = 0;
    const proxies: Server[] = [];
    const via = (target: number) => tamperingProxy(target, proxies, (pages) => {
      if (tampered === 0 && pages[0] >= 1024 && pages[1] === pages[0] + 1) {
        tampered++;
        [pages[0], pages[1]] = [pages[1], pages[0]];
      }
    });
    const { vm, destination, listener, migration } = await setup('mismatch', { zeroFraction: 0, via });
    const report = await migration.start();
    const incoming = await listener.result;
    await listener.close();
    for (const p of proxies) p.close();
    expect(tampered).toBe(1);
    expect(report.outcome).toBe('failed');
    expect(report.reason).toMatch(/digest .* differs/);
    expect(report.memoryVerified).toBe(false);
    expect(report.sourceRunning).toBe(true);
    expect(vm.events).toEqual(['pause', 'resume']);
    expect(incoming.outcome).toBe('discarded');
    expect(destination.state).toBe('discarded');
  });
});

/** A TCP proxy that lets `edit` change the page numbers of PAGES frames (type 4) going to the destination. */
async function tamperingProxy(targetPort: number, servers: Server[], edit: (pages: Uint32Array) => void): Promise<number> {
  const server = createServer((client: Socket) => {
    const upstream = connect({ host: '127.0.0.1', port: targetPort });
    upstream.setNoDelay(true);
    client.setNoDelay(true);
    upstream.on('data', (d) => client.write(d));
    upstream.on('close', () => client.destroy());
    client.on('close', () => upstream.destroy());
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    let pending = Buffer.alloc(0);
    client.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= 5) {
        const length = pending.readUInt32LE(1);
        if (pending.length < 5 + length) break;
        const frame = Buffer.from(pending.subarray(0, 5 + length));
        pending = pending.subarray(5 + length);
        if (frame[0] === 4) {
          const count = frame.readUInt32LE(5);
          const pages = new Uint32Array(count);
          for (let i = 0; i < count; i++) pages[i] = frame.readUInt32LE(9 + i * 4);
          edit(pages);
          for (let i = 0; i < count; i++) frame.writeUInt32LE(pages[i], 9 + i * 4);
        }
        upstream.write(frame);
      }
    });
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return (server.address() as AddressInfo).port;
}
