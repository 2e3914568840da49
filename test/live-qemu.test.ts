// End to end: two QEMU guests under TCG on loopback, a workload in the guest that rewrites memory and
// checks what it wrote, and Ferry migrating it (CLI processes, and the programmatic API for force-complete).
import type { ChildProcess } from 'node:child_process';
import { setTimeout as delay } from 'node:timers/promises';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startMigration } from '../src/live/index.js';
import { tempDir } from './helpers/env.js';
import { ferryCli, freePort, statusOf } from './helpers/ferry-process.js';
import { buildGuest, lastSeq, startVm, waitSerial, type GuestImage, type TestVm } from './helpers/qemu-guest.js';

const MEM_MIB = 192;
const BOOT_MS = 90_000;

function progressBytes(line: string): number {
  try {
    const m = JSON.parse(line);
    return m.type === 'progress' ? m.transferredBytes : 0;
  } catch {
    return 0;
  }
}

describe('live migration of QEMU guests (TCG, loopback)', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let guest: GuestImage;
  const vms: TestVm[] = [];
  const processes: ChildProcess[] = [];

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir('ferry-live-qemu-'));
    // 48 MiB checked continually, 8 MiB of it rewritten at 16 MiB/s.
    guest = await buildGuest(dir, { totalMiB: 48, hotMiB: 8, rateMiBs: 16 });
  });
  afterEach(async () => {
    for (const p of processes.splice(0)) if (p.exitCode === null) p.kill('SIGKILL');
    for (const vm of vms.splice(0)) await vm.stop();
  });
  afterAll(() => cleanup());

  /** A running source guest (workload verified twice) and a destination waiting with -incoming defer -S. */
  async function pair(tag: string) {
    const src = await startVm({ dir, name: `${tag}-src`, guest, memMiB: MEM_MIB });
    vms.push(src);
    const dst = await startVm({ dir, name: `${tag}-dst`, guest, memMiB: MEM_MIB, incoming: true });
    vms.push(dst);
    await waitSerial(src, /WORKLOAD OK seq=2\b/, BOOT_MS);
    const port = await freePort();
    const listen = ferryCli(['migrate-listen', '--listen', `127.0.0.1:${port}`, '--qmp', dst.qmpPath, '--ram', dst.ramPath]);
    processes.push(listen.child);
    await listen.line(/^listening on/, 20_000);
    return { src, dst, port, listen };
  }

  /** The guest keeps running on `vm`: its console shows `more` new seconds of verified work, and no failure. */
  async function keepsRunning(vm: TestVm, after: number, more: number) {
    await waitSerial(vm, new RegExp(`WORKLOAD OK seq=${after + more}\\b`), 60_000);
    expect(await vm.serial()).not.toMatch(/FAILURE/);
  }

  it('migrates a running guest: it continues on the destination with every in-guest check passing, the source stopped', async () => {
    const { src, dst, port, listen } = await pair('move');
    const migrate = ferryCli(['migrate', '--qmp', src.qmpPath, '--ram', src.ramPath, '--to', `127.0.0.1:${port}`, '--progress=json']);
    processes.push(migrate.child);
    expect(await migrate.exit, migrate.stderr()).toBe(0);
    expect(await listen.exit, listen.stderr()).toBe(0);
    const report = JSON.parse(await migrate.line(/"type":"done"/, 1000));
    expect(report).toMatchObject({ outcome: 'completed', memoryVerified: true, verification: 'content', sourceRunning: false });
    expect(report.downtimeMs).toBeGreaterThan(0);

    expect(await statusOf(src)).toBe('postmigrate');
    expect(await statusOf(dst)).toBe('running');
    const seqAtHandover = lastSeq(await src.serial());
    await keepsRunning(dst, seqAtHandover, 3);
    expect(await src.serial()).not.toMatch(/FAILURE/);
    // The source printed nothing more: it is stopped for good.
    expect(lastSeq(await src.serial())).toBe(seqAtHandover);
  });

  it('abort mid-migration: the source keeps running unaffected and the destination QEMU is discarded', async () => {
    const { src, dst, port, listen } = await pair('abort');
    const migrate = ferryCli(['migrate', '--qmp', src.qmpPath, '--ram', src.ramPath, '--to', `127.0.0.1:${port}`, '--max-bandwidth', '2M', '--progress=json']);
    processes.push(migrate.child);
    await migrate.line((l) => progressBytes(l) > 1024 * 1024, 60_000);
    migrate.child.kill('SIGINT');
    expect(await migrate.exit).toBe(1);
    expect(migrate.stderr()).toMatch(/migration cancelled: .*the source VM is still running/);
    expect(await listen.exit).toBe(1);
    expect(await statusOf(src)).toBe('running');
    await keepsRunning(src, lastSeq(await src.serial()), 2);
    for (let i = 0; i < 100 && !dst.exited; i++) await delay(100);
    expect(dst.exited).toBe(true);
  });

  it('a destination that dies mid-migration: the source keeps running', async () => {
    const { src, port, listen } = await pair('dies');
    const migrate = ferryCli(['migrate', '--qmp', src.qmpPath, '--ram', src.ramPath, '--to', `127.0.0.1:${port}`, '--max-bandwidth', '2M', '--progress=json']);
    processes.push(migrate.child);
    await migrate.line((l) => progressBytes(l) > 1024 * 1024, 60_000);
    listen.child.kill('SIGKILL');
    expect(await migrate.exit).toBe(1);
    expect(migrate.stderr()).toMatch(/migration failed: .*the source VM is still running/);
    expect(await statusOf(src)).toBe('running');
    await keepsRunning(src, lastSeq(await src.serial()), 2);
  });

  it('force-complete switches over a migration that would not meet its downtime limit', async () => {
    const { src, dst, port, listen } = await pair('force');
    const migration = await startMigration({
      source: { kind: 'qemu-shared-file', qmpSocket: src.qmpPath, ramPath: src.ramPath },
      to: { host: '127.0.0.1', port },
      // 1 ms cannot be met (the final page-hash pass alone takes longer): only force-complete ends this.
      limits: { maxDowntimeMs: 1 },
    });
    migration.on('stats', (s) => s.round >= 2 && migration.forceComplete());
    const report = await migration.start();
    expect(report).toMatchObject({ outcome: 'completed', forced: true, memoryVerified: true });
    expect(report.rounds).toBeGreaterThanOrEqual(2);
    expect(await listen.exit).toBe(0);
    expect(await statusOf(dst)).toBe('running');
    await keepsRunning(dst, lastSeq(await src.serial()), 3);
  });
});
