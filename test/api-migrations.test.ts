// The migrations API end to end: two QEMU guests under TCG, `ferry migrate-listen` on the destination side,
// and the migration started, watched, retuned, forced and aborted through `ferry serve`.
import type { ChildProcess } from 'node:child_process';
import { setTimeout as delay } from 'node:timers/promises';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { tempDir } from './helpers/env.js';
import { ferryCli, freePort, statusOf } from './helpers/ferry-process.js';
import { buildGuest, lastSeq, startVm, waitSerial, type GuestImage, type TestVm } from './helpers/qemu-guest.js';
import { startService, type Service } from './helpers/service.js';

const MEM_MIB = 192;

describe('migrations API (TCG guests, loopback)', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let guest: GuestImage;
  let service: Service;
  const vms: TestVm[] = [];
  const processes: ChildProcess[] = [];

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir('ferry-api-migrations-'));
    guest = await buildGuest(dir, { totalMiB: 48, hotMiB: 8, rateMiBs: 16 });
    service = await startService(dir);
  });
  afterEach(async () => {
    for (const p of processes.splice(0)) if (p.exitCode === null) p.kill('SIGKILL');
    for (const vm of vms.splice(0)) await vm.stop();
  });
  afterAll(async () => {
    await service.stop();
    await cleanup();
  });

  async function pair(tag: string) {
    const src = await startVm({ dir, name: `${tag}-src`, guest, memMiB: MEM_MIB });
    const dst = await startVm({ dir, name: `${tag}-dst`, guest, memMiB: MEM_MIB, incoming: true });
    vms.push(src, dst);
    await waitSerial(src, /WORKLOAD OK seq=2\b/, 90_000);
    const port = await freePort();
    const listen = ferryCli(['migrate-listen', '--listen', `127.0.0.1:${port}`, '--qmp', dst.qmpPath, '--ram', dst.ramPath]);
    processes.push(listen.child);
    await listen.line(/^listening on/, 20_000);
    return { src, dst, port, listen };
  }

  async function until(id: string, done: (m: { state: string; stats: { round: number } }) => boolean) {
    for (let i = 0; i < 600; i++) {
      const m = await (await service.request(`/v1/migrations/${id}`)).json();
      if (done(m)) return m;
      await delay(200);
    }
    throw new Error(`migration ${id} never reached the expected state`);
  }

  it('refuses bad requests: relative or missing paths, unknown ids, no token', async () => {
    const bad = await service.request('/v1/migrations', { method: 'POST', json: { source: { qmpSocket: 'qmp.sock', ramPath: '/dev/shm/x' }, to: { host: '127.0.0.1', port: 1 } } });
    expect(bad.status).toBe(400);
    expect((await bad.json()).detail).toMatch(/source\.qmpSocket must be an absolute path/);
    const missing = await service.request('/v1/migrations', { method: 'POST', json: { source: { qmpSocket: '/nonexistent.sock', ramPath: '/dev/shm/x' }, to: { host: '127.0.0.1', port: 1 } } });
    expect(missing.status).toBe(400);
    const extra = await service.request('/v1/migrations', { method: 'POST', json: { source: { qmpSocket: '/a', ramPath: '/b' }, to: { host: 'h', port: 1 }, surprise: 1 } });
    expect(extra.status).toBe(400);
    expect((await service.request('/v1/migrations/nope')).status).toBe(404);
    expect((await fetch(`${service.baseUrl}/v1/migrations`)).status).toBe(401);
  });

  it('runs a migration: live stats, PATCH of the limits, force-complete, and a verified report', async () => {
    const { src, dst, port, listen } = await pair('api');
    // 1 ms cannot be met, so only force-complete ends it.
    const res = await service.request('/v1/migrations', {
      method: 'POST',
      json: { source: { qmpSocket: src.qmpPath, ramPath: src.ramPath }, to: { host: '127.0.0.1', port }, maxDowntimeMs: 1 },
    });
    expect(res.status).toBe(202);
    const { id, state } = await res.json();
    expect(state).toBe('running');
    await until(id, (m) => m.stats.round >= 1);
    const patched = await service.request(`/v1/migrations/${id}`, { method: 'PATCH', json: { maxDowntimeMs: 2, maxBandwidth: 512 * 1024 * 1024 } });
    expect(patched.status).toBe(200);
    expect((await patched.json()).stats).toMatchObject({ maxDowntimeMs: 2, maxBandwidth: 512 * 1024 * 1024 });
    await until(id, (m) => m.stats.round >= 2);
    expect((await service.request(`/v1/migrations/${id}:force-complete`, { method: 'POST' })).status).toBe(200);
    const done = await until(id, (m) => m.state !== 'running');
    expect(done).toMatchObject({ state: 'completed', report: { outcome: 'completed', memoryVerified: true, sourceRunning: false } });
    expect(await listen.exit).toBe(0);
    expect(await statusOf(src)).toBe('postmigrate');
    expect(await statusOf(dst)).toBe('running');
    await waitSerial(dst, new RegExp(`WORKLOAD OK seq=${lastSeq(await src.serial()) + 2}\\b`), 60_000);
    expect(await dst.serial()).not.toMatch(/FAILURE/);
    const list = await (await service.request('/v1/migrations')).json();
    expect(list.map((m: { id: string }) => m.id)).toContain(id);
  });

  it('DELETE aborts: the source keeps running', async () => {
    const { src, port } = await pair('abort');
    const res = await service.request('/v1/migrations', {
      method: 'POST',
      json: { source: { qmpSocket: src.qmpPath, ramPath: src.ramPath }, to: { host: '127.0.0.1', port }, maxBandwidth: 2 * 1024 * 1024 },
    });
    const { id } = await res.json();
    await until(id, (m) => m.stats.round >= 0 && (m as unknown as { stats: { transferredBytes: number } }).stats.transferredBytes > 1024 * 1024);
    expect((await service.request(`/v1/migrations/${id}`, { method: 'DELETE' })).status).toBe(200);
    const done = await until(id, (m) => m.state !== 'running');
    expect(done).toMatchObject({ state: 'cancelled', report: { sourceRunning: true } });
    expect(await statusOf(src)).toBe('running');
    await waitSerial(src, new RegExp(`WORKLOAD OK seq=${lastSeq(await src.serial()) + 2}\\b`), 60_000);
  });
});
