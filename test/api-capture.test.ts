import { createHash, randomBytes } from 'node:crypto';
import { copyFile, readdir, readFile, readlink, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { copyGuest, debianGuestImage } from './helpers/debian-guest.js';
import { imagesIdentical, qemuImg, tempDir } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';
import { startRedis, type RedisServer } from './helpers/redis.js';
import { isFinished, startService, startWorker, watchJob, type FerryProcess, type JobView, type Service } from './helpers/service.js';
import { startCuttingProxy, startSshd, startThrottlingProxy, type TestSshd } from './helpers/sshd.js';

const MiB = 1024 * 1024;

let sshd: TestSshd;
/** Where the "remote" source files live: the sshd reads them by absolute path, as it would a device. */
let sources: { dir: string; cleanup: () => Promise<void> };
let data: { dir: string; cleanup: () => Promise<void> };
let service: Service;
let privateKey: string;
let credential: string;

beforeAll(async () => {
  sshd = await startSshd();
  sources = await tempDir('ferry-capture-src-');
  data = await tempDir('ferry-api-capture-');
  service = await startService(data.dir);
  privateKey = await readFile(sshd.userKey, 'utf8');
  credential = await storeKey(service, privateKey);
});

afterAll(async () => {
  await service?.stop();
  await sshd?.stop();
  await sources?.cleanup();
  await data?.cleanup();
});

async function storeKey(on: Service, key: string): Promise<string> {
  const res = await on.request('/v1/credentials', { method: 'POST', json: { type: 'ssh-key', name: 'capture test', privateKey: key } });
  expect(res.status).toBe(201);
  return ((await res.json()) as { id: string }).id;
}

interface CaptureBody {
  device: string;
  target: string;
  format?: string;
  hostKey?: string | string[];
  knownHosts?: string;
  port?: number;
  extra?: Record<string, unknown>;
}

function captureRequest(b: CaptureBody, credentialId = credential) {
  const policy = b.knownHosts !== undefined ? { knownHosts: b.knownHosts } : { hostKey: b.hostKey ?? sshd.fingerprint };
  return {
    type: 'capture',
    source: { host: '127.0.0.1', port: b.port ?? sshd.port, user: 'root', credential: credentialId, disk: b.device, ...policy },
    target: { path: b.target, format: b.format ?? 'qcow2' },
    ...b.extra,
  };
}

async function submit(on: Service, body: unknown): Promise<string> {
  const res = await on.request('/v1/jobs', { method: 'POST', json: body });
  if (res.status !== 202) throw new Error(`POST /v1/jobs: ${res.status} ${await res.text()}`);
  return ((await res.json()) as { id: string }).id;
}

/** Runs a job to its end through the events stream; returns the final record and the job log. */
async function finish(on: Service, id: string): Promise<{ job: JobView; log: string; seen: JobView[] }> {
  const seen = await watchJob(on, id, isFinished);
  const job = seen[seen.length - 1];
  const log = await (await on.request(`/v1/jobs/${id}/log`)).text();
  return { job, log, seen };
}

/** The private key's body lines: any of them in a record, a log or the output is a leak. */
function secretLines(key: string): string[] {
  return key.split('\n').filter((l) => l.length > 20 && !l.startsWith('-----'));
}

/** The stages a job went through, in order, from the records its events stream delivered. */
function stagesOf(seen: JobView[]): string[] {
  return seen.map((j) => j.stage).filter((stage, i, all): stage is string => stage !== null && stage !== all[i - 1]);
}

/** Processes that have `path` open or on their command line (QEMU's -drive, guestfish): none once a job is over. */
async function processesUsing(path: string): Promise<string[]> {
  const users: string[] = [];
  for (const pid of (await readdir('/proc')).filter((n) => /^\d+$/.test(n))) {
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    const open = await Promise.all(fds.map((fd) => readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
    if (cmdline.includes(path) || open.some((target) => target.startsWith(path))) users.push(`${pid}: ${cmdline.replaceAll('\0', ' ').slice(0, 200)}`);
  }
  return users;
}

/** A well-formed SHA256 fingerprint that is not the server's. */
const otherFingerprint = () => 'SHA256:' + createHash('sha256').update('some other host key').digest('base64').replace(/=+$/, '');

describe('capture jobs (embedded queue)', () => {
  test('capture a file over SSH into qcow2 with the host key pinned; the secret appears nowhere', async () => {
    const source = await makePatternedRaw(sources.dir, 'pinned.raw');
    const id = await submit(service, captureRequest({ device: source, target: 'pinned.qcow2' }));
    const { job, log, seen } = await finish(service, id);
    expect(job.state, log).toBe('completed');
    expect(job.stage).toBe('capture');
    expect(job.attempts).toBe(1);
    expect(seen.every((j) => j.stage === null || j.stage === 'capture')).toBe(true);
    // The last phase (verification) reported all of its bytes.
    expect(job.progress.total).toBeGreaterThan(0);
    expect(job.progress.done).toBe(job.progress.total);
    expect(await imagesIdentical(source, join(data.dir, 'pinned.qcow2'))).toBe(true);
    expect(job.result).toMatchObject({ format: 'qcow2', images: [{ path: 'pinned.qcow2', source: `ssh://root@127.0.0.1:${sshd.port}${source}`, start: 'fresh' }] });
    expect(log).toMatch(/copy pass 1/);
    expect(log).toMatch(/verify/);
    // A verified capture leaves no resume files behind.
    expect((await readdir(data.dir)).filter((n) => n.includes('ferry-capture'))).toEqual([]);

    const record = await (await service.request(`/v1/jobs/${id}`)).text();
    expect(JSON.parse(record).spec.source.credential).toBe(credential);
    for (const line of secretLines(privateKey)) {
      expect(record).not.toContain(line);
      expect(log).not.toContain(line);
      expect(service.output()).not.toContain(line);
    }
  });

  test('verify the host against a known_hosts file in the data dir', async () => {
    const source = await makePatternedRaw(sources.dir, 'known.raw');
    await copyFile(sshd.knownHosts, join(data.dir, 'known_hosts'));
    const id = await submit(service, captureRequest({ device: source, target: 'known.raw', format: 'raw', knownHosts: 'known_hosts' }));
    const { job, log } = await finish(service, id);
    expect(job.state, log).toBe('completed');
    expect(await imagesIdentical(source, join(data.dir, 'known.raw'))).toBe(true);
  });

  test('a changed or unknown host key fails the job at once, permanently, before logging in', async () => {
    // Never read: the connection is refused before the login, let alone the agent.
    const source = join(sources.dir, 'never-read.raw');
    // A known_hosts file that knows another port of this address only: the host is unknown.
    await writeFile(join(data.dir, 'other_hosts'), (await readFile(sshd.knownHosts, 'utf8')).replace(`]:${sshd.port} `, `]:${sshd.port + 1} `));
    const cases: Array<[CaptureBody, RegExp]> = [
      [{ device: source, target: 'changed.qcow2', hostKey: otherFingerprint() }, /HOST KEY MISMATCH/],
      [{ device: source, target: 'unknown.qcow2', knownHosts: 'other_hosts' }, /host key .* is unknown/],
    ];
    for (const [body, message] of cases) {
      const { job, log } = await finish(service, await submit(service, captureRequest(body)));
      expect(job.state, log).toBe('failed');
      expect(job.error?.type).toBe('HOST_KEY');
      expect(job.error?.message).toMatch(message);
      expect(job.error?.message).toContain(sshd.fingerprint);
      expect(job.attempts).toBe(1);
      expect(log).not.toMatch(/will retry/);
    }
  });

  test('a dropped connection is retried, and the retry resumes from the journal the first attempt kept', async () => {
    const source = join(sources.dir, 'cut.raw');
    await writeFile(source, randomBytes(48 * MiB));
    // What a worker killed mid-write leaves: removed before the attempt, unlike the capture's resume files.
    const stale = '.cut.qcow2.ferry-0123abcd.tmp';
    await writeFile(join(data.dir, stale), 'partial');
    // The first connection dies after 12 MiB from the server; the retry's goes through.
    const proxy = await startCuttingProxy(sshd.port, 12 * MiB, 1);
    try {
      // Through the proxy's port, so the key is pinned (known_hosts names sshd's port); pins may be a list.
      const id = await submit(service, captureRequest({ device: source, target: 'cut.qcow2', port: proxy.port, hostKey: [otherFingerprint(), sshd.fingerprint] }));
      const { job, log } = await finish(service, id);
      expect(job.state, log).toBe('completed');
      expect(proxy.cuts).toBe(1);
      expect(job.attempts).toBe(2);
      expect(log).toMatch(/capture: attempt 1 failed \(.*(lost|closed).*\); will retry/);
      expect(log).toContain(`removed partial output left by an interrupted attempt: ${stale}`);
      const image = (job.result as { images: Array<{ start: string; resumedBytes: number; bytesOnWire: number }> }).images[0];
      expect(image.start).toBe('resumed');
      expect(image.resumedBytes).toBeGreaterThan(0);
      expect(image.bytesOnWire).toBeLessThan(48 * MiB);
      expect(await imagesIdentical(source, join(data.dir, 'cut.qcow2'))).toBe(true);
      expect((await readdir(data.dir)).filter((n) => n.startsWith('.cut.qcow2'))).toEqual([]);
    } finally {
      await proxy.close();
    }
  });

  test('a cancelled capture stops and removes its resume files', async () => {
    const source = join(sources.dir, 'cancel.raw');
    await writeFile(source, randomBytes(16 * MiB));
    // 4 MiB/s: the copy takes seconds, time enough to cancel it in the middle.
    const proxy = await startThrottlingProxy(sshd.port, 4 * MiB);
    try {
      const id = await submit(service, captureRequest({ device: source, target: 'cancel.qcow2', port: proxy.port }));
      const copying = await watchJob(service, id, (j) => j.progress.done > 2 * MiB || isFinished(j));
      expect(copying[copying.length - 1].state).toBe('running');
      // The resume files exist while the capture runs.
      expect((await readdir(data.dir)).filter((n) => n.startsWith('.cancel.qcow2.ferry-capture')).sort()).toEqual(['.cancel.qcow2.ferry-capture.journal', '.cancel.qcow2.ferry-capture.raw']);
      expect((await service.request(`/v1/jobs/${id}`, { method: 'DELETE' })).status).toBe(200);
      const { job, log } = await finish(service, id);
      expect(job.state, log).toBe('cancelled');
      expect(log).toMatch(/capture: cancelled/);
      expect((await readdir(data.dir)).filter((n) => n.includes('cancel.qcow2'))).toEqual([]);
    } finally {
      await proxy.close();
    }
  });

  test('P2V with driver injection: a Debian guest captured over SSH, converted to qcow2 and made to boot on KVM', async () => {
    const guest = await copyGuest(await debianGuestImage(), sources.dir, 'debian.raw');
    const id = await submit(service, captureRequest({ device: guest, target: 'debian.qcow2', extra: { injectDrivers: { target: 'kvm' } } }));
    const { job, log, seen } = await finish(service, id);
    expect(job.state, log).toBe('completed');
    expect(stagesOf(seen)).toEqual(['capture', 'convert', 'inject']);
    expect(job.stage).toBe('inject');
    expect(job.attempts).toBe(3);
    expect(job.progress.total).toBeGreaterThan(0);
    expect(job.progress.done).toBe(job.progress.total);

    const result = job.result as {
      format: string;
      images: Array<{ path: string; start: string }>;
      injection: {
        target: string;
        images: Array<{ path: string; reportPath: string; os: { type: string }; changes: Array<{ kind: string; path?: string; after?: string; command?: string }>; verification: Array<{ ok: boolean }> }>;
      };
    };
    expect(result.format).toBe('qcow2');
    expect(result.images).toMatchObject([{ path: 'debian.qcow2', start: 'fresh' }]);
    expect(result.injection.target).toBe('kvm');
    const [injected] = result.injection.images;
    expect(injected).toMatchObject({ path: 'debian.qcow2', reportPath: 'debian.qcow2.ferry-inject.json', os: { type: 'linux' } });
    expect(injected.verification.length).toBeGreaterThan(0);
    expect(injected.verification.every((v) => v.ok)).toBe(true);
    expect(injected.changes.find((c) => c.path === '/etc/initramfs-tools/modules')?.after).toContain('virtio_blk\n');
    expect(injected.changes).toContainEqual(expect.objectContaining({ kind: 'guest.command', command: 'dpkg --purge open-vm-tools' }));
    // The report beside the image is the one in the result.
    const stored = JSON.parse(await readFile(join(data.dir, 'debian.qcow2.ferry-inject.json'), 'utf8')) as { changes: unknown[] };
    expect(stored.changes).toEqual(injected.changes);

    expect(log).toMatch(/capturing .* into raw \.debian\.qcow2\.ferry-captured\.raw/);
    expect(log).toMatch(/converting \.debian\.qcow2\.ferry-captured\.raw to qcow2 debian\.qcow2/);
    expect(log).toMatch(/inject: attempt 1 of 3/);
    expect(log).toMatch(/debian\.qcow2: linux .*\(x86_64\): \d+ change\(s\) for kvm/);
    expect(log).toMatch(/ {2}edit \/etc\/fstab: /);
    expect(log).toMatch(/ {2}verified: /);
    // The raw capture and its resume files are gone; the image is a sound qcow2 of the guest's size.
    expect((await readdir(data.dir)).filter((n) => n.includes('debian')).sort()).toEqual(['debian.qcow2', 'debian.qcow2.ferry-inject.json']);
    const info = JSON.parse(await qemuImg('info', '--output=json', join(data.dir, 'debian.qcow2'))) as { format: string; 'virtual-size': number };
    expect(info.format).toBe('qcow2');
    expect(info['virtual-size']).toBe((await stat(guest)).size);
    await qemuImg('check', join(data.dir, 'debian.qcow2'));
  }, 1_200_000);

  test('a captured disk without an operating system fails the inject stage with a typed error and is removed', async () => {
    const source = await makePatternedRaw(sources.dir, 'no-os.raw');
    const id = await submit(service, captureRequest({ device: source, target: 'no-os.qcow2', extra: { injectDrivers: { target: 'hyperv' } } }));
    const { job, log, seen } = await finish(service, id);
    expect(job.state, log).toBe('failed');
    expect(stagesOf(seen)).toEqual(['capture', 'convert', 'inject']);
    expect(job.error).toEqual({ type: 'GUEST_NOT_FIXABLE', message: 'no-os.qcow2: no operating system found on the disk' });
    expect(log).toMatch(/inject: failed: no-os\.qcow2: no operating system found on the disk/);
    expect(log).toContain('removed no-os.qcow2: not made bootable on hyperv');
    expect((await readdir(data.dir)).filter((n) => n.includes('no-os'))).toEqual([]);
  }, 300_000);

  test('cancelling during the inject stage stops libguestfs and removes the image', async () => {
    const source = await makePatternedRaw(sources.dir, 'cancel-inject.raw');
    const id = await submit(service, captureRequest({ device: source, target: 'cancel-inject.qcow2', extra: { injectDrivers: { target: 'kvm' } } }));
    const injecting = await watchJob(service, id, (j) => j.stage === 'inject' || isFinished(j));
    expect(injecting[injecting.length - 1].state).toBe('running');
    expect((await service.request(`/v1/jobs/${id}`, { method: 'DELETE' })).status).toBe(200);
    const { job, log } = await finish(service, id);
    expect(job.state, log).toBe('cancelled');
    expect(log).toMatch(/inject: cancelled/);
    expect((await readdir(data.dir)).filter((n) => n.includes('cancel-inject'))).toEqual([]);
    // The injection's process group (guestfish, the appliance's QEMU) was killed with the job.
    expect(await processesUsing(join(data.dir, 'cancel-inject.qcow2'))).toEqual([]);
  }, 300_000);

  test('refuse a bad hypervisor or drivers path, a missing host key policy and unusable paths when submitted', async () => {
    const source = join(sources.dir, 'never-read.raw');
    await writeFile(join(data.dir, 'exists.qcow2'), '');
    const inject = (injectDrivers: unknown) => captureRequest({ device: source, target: 'x.qcow2', extra: { injectDrivers } });
    const cases: Array<[unknown, number, RegExp, string?]> = [
      [inject({ target: 'virtualbox' }), 400, /^body\.injectDrivers\.target: must be one of kvm, hyperv, vmware, xen, aws, azure$/],
      [inject({ target: 'kvm', drivers: '../virtio-win' }), 400, /injectDrivers\.drivers '\.\.\/virtio-win' leaves the data dir/, 'injectDrivers.drivers'],
      [inject({ target: 'kvm', drivers: '/srv/virtio-win' }), 400, /injectDrivers\.drivers '\/srv\/virtio-win' is absolute/, 'injectDrivers.drivers'],
      [inject({ target: 'kvm', drivers: 'no-such-folder' }), 422, /injectDrivers\.drivers 'no-such-folder' is not in the data dir/, 'injectDrivers.drivers'],
      [inject(true), 400, /body\.injectDrivers: must be object/],
      [
        { ...inject({ target: 'vmware' }), target: { path: 'x.vmdk', format: 'vmdk', options: { subformat: 'streamOptimized' } } },
        400,
        /injectDrivers cannot edit a streamOptimized VMDK once it is written/,
        'injectDrivers',
      ],
      [{ ...captureRequest({ device: source, target: 'x.qcow2' }), source: { host: '127.0.0.1', user: 'root', credential, disk: source } }, 400, /missing required field 'hostKey'.*'knownHosts'/],
      [captureRequest({ device: source, target: 'x.qcow2', hostKey: 'SHA256:short' }), 400, /body\.source\.hostKey: must match pattern/],
      [captureRequest({ device: 'sda', target: 'x.qcow2' }), 400, /body\.source\.disk: must match pattern/],
      [captureRequest({ device: source, target: 'x.qcow2', knownHosts: '../known_hosts' }), 400, /source\.knownHosts '\.\.\/known_hosts' leaves the data dir/],
      [captureRequest({ device: source, target: 'x.qcow2', knownHosts: 'no_such_file' }), 422, /source\.knownHosts 'no_such_file' is not a file/],
      [captureRequest({ device: source, target: 'exists.qcow2' }), 409, /target\.path 'exists\.qcow2' exists/],
      [captureRequest({ device: source, target: 'no/such/folder.qcow2' }), 422, /folder of target\.path/],
      [captureRequest({ device: source, target: 'x.qcow7', format: 'qcow7' }), 400, /qcow7/],
    ];
    for (const [body, status, detail, field] of cases) {
      const res = await service.request('/v1/jobs', { method: 'POST', json: body });
      const problem = (await res.json()) as { status: number; detail: string; field?: string };
      expect(res.status, JSON.stringify(body)).toBe(status);
      expect(problem.detail, JSON.stringify(body)).toMatch(detail);
      if (field) expect(problem.field).toBe(field);
    }
    // The OpenAPI document describes the host key policy and the injection flow with its targets.
    const openapi = JSON.stringify(await (await service.request('/openapi.json')).json());
    expect(openapi).toContain('"oneOf":[{"required":["hostKey"]},{"required":["knownHosts"]}]');
    expect(openapi).toMatch(/injectDrivers.*capture → convert → inject/);
    expect(openapi).toContain('kvm, hyperv, vmware, xen, aws, azure');
  });
});

describe('capture jobs (Redis queue, a separate worker process)', () => {
  let redis: RedisServer;
  let dir: { dir: string; cleanup: () => Promise<void> };
  let api: Service;
  let worker: FerryProcess;

  beforeAll(async () => {
    redis = await startRedis();
    dir = await tempDir('ferry-api-capture-redis-');
    // The API runs no jobs here: the worker reads the credential from the shared data dir's vault.
    api = await startService(dir.dir, { redisUrl: redis.url });
    worker = await startWorker(dir.dir, redis.url);
  });

  afterAll(async () => {
    await worker?.stop();
    await api?.stop();
    await redis?.stop();
    await dir?.cleanup();
  });

  test('a worker process captures with the credential the API stored', async () => {
    const source = await makePatternedRaw(sources.dir, 'redis.raw');
    const id = await submit(api, captureRequest({ device: source, target: 'redis.vmdk', format: 'vmdk' }, await storeKey(api, privateKey)));
    const { job, log } = await finish(api, id);
    expect(job.state, log).toBe('completed');
    expect(job.worker).toMatch(new RegExp(`:${worker.pid}$`));
    expect(await imagesIdentical(source, join(dir.dir, 'redis.vmdk'))).toBe(true);
    for (const line of secretLines(privateKey)) expect(worker.output() + api.output() + log).not.toContain(line);
  });

  test('a P2V flow with driver injection runs its stages on the worker; a typed failure ends it', async () => {
    const source = await makePatternedRaw(sources.dir, 'redis-no-os.raw');
    const id = await submit(api, captureRequest({ device: source, target: 'redis-no-os.qcow2', extra: { injectDrivers: { target: 'xen' } } }, await storeKey(api, privateKey)));
    const { job, log, seen } = await finish(api, id);
    expect(job.state, log).toBe('failed');
    expect(stagesOf(seen)).toEqual(['capture', 'convert', 'inject']);
    expect(job.worker).toMatch(new RegExp(`:${worker.pid}$`));
    expect(job.error?.type).toBe('GUEST_NOT_FIXABLE');
    expect(log).not.toMatch(/will retry|did not finish/);
    expect((await readdir(dir.dir)).filter((n) => n.includes('redis-no-os'))).toEqual([]);
  }, 300_000);
});
