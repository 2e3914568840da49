import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { open, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { doneLine, ferry, imagesIdentical, jsonLines, qemuImg, requireTool, tempDir } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';
import { startCuttingProxy, startSshd, type TestSshd } from './helpers/sshd.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

let sshd: TestSshd;
let work: { dir: string; cleanup: () => Promise<void> };

beforeAll(async () => {
  sshd = await startSshd();
  work = await tempDir('ferry-capture-');
});

afterAll(async () => {
  await sshd?.stop();
  await work?.cleanup();
});

/**
 * `ferry capture` against the test sshd, authenticated with the test key. The host key is checked against
 * the known_hosts entry for sshd's port, or pinned by fingerprint when going through a proxy's port.
 */
function capture(source: string, dest: string | undefined, extra: string[] = [], port = sshd.port) {
  const url = `ssh://root@127.0.0.1:${port}${source}`;
  const hostKey = port === sshd.port ? ['--known-hosts', sshd.knownHosts] : ['--host-key', sshd.fingerprint];
  return ferry(['capture', '-i', sshd.userKey, ...hostKey, url, ...(dest ? [dest] : []), ...extra], { timeoutMs: 90_000 });
}

/** Writes `count` blocks of random data at pseudo-random offsets of a file, in place. */
async function scribble(path: string, count: number, blockSize: number, size: number): Promise<void> {
  const h = await open(path, 'r+');
  try {
    for (let i = 0; i < count; i++) {
      const offset = Math.floor(Math.random() * (size / blockSize)) * blockSize;
      await h.write(randomBytes(blockSize), 0, blockSize, offset);
    }
  } finally {
    await h.close();
  }
}

describe('ferry capture over SSH', () => {
  it('captures a file into raw, identical to the source, leaving nothing behind', async () => {
    const source = await makePatternedRaw(work.dir, 'plain.raw');
    const dest = join(work.dir, 'plain-out.raw');
    const tmpBefore = (await stat(sshd.tmpDir)).mtimeMs;
    const r = await capture(source, dest, ['--progress=json']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(await imagesIdentical(source, dest)).toBe(true);
    const done = doneLine(r.stdout);
    expect(done.format).toBe('raw');
    // Only the working files' absence proves the journal was cleaned up after a verified success.
    expect((await readdir(work.dir)).filter((f) => f.includes('ferry-capture'))).toEqual([]);
    // The agent deleted its temporary directory on the source (here, the same machine): pushed there, and gone.
    expect((await stat(sshd.tmpDir)).mtimeMs).toBeGreaterThan(tmpBefore);
    const leftovers = (await readdir(sshd.tmpDir)).filter((f) => f.startsWith('ferry-agent.'));
    expect(leftovers).toEqual([]);
    // JSON progress carries the wire and write counters, phase by phase.
    const phases = new Set(jsonLines(r.stdout).filter((l) => l.type === 'phase').map((l) => l.phase));
    expect(phases.has('copy')).toBe(true);
    expect(phases.has('verify')).toBe(true);
    expect(done.bytesOnWire).toBeGreaterThan(0);
  });

  it('captures into qcow2 with compression and parallel channels', async () => {
    const source = await makePatternedRaw(work.dir, 'q.raw');
    const dest = join(work.dir, 'q-out.qcow2');
    const r = await capture(source, dest, ['-O', 'qcow2', '--channels', '3', '--level', '3']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const info = JSON.parse(await qemuImg('info', '--output=json', dest)) as { format: string };
    expect(info.format).toBe('qcow2');
    expect(await imagesIdentical(source, dest)).toBe(true);
  });

  it('captures into streamOptimized VMDK', async () => {
    const source = await makePatternedRaw(work.dir, 'v.raw');
    const dest = join(work.dir, 'v-out.vmdk');
    const r = await capture(source, dest, ['-O', 'vmdk', '-o', 'subformat=streamOptimized']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(await imagesIdentical(source, dest)).toBe(true);
  });

  it('sends zero chunks as flags and compressible data compressed: few bytes on the wire', async () => {
    const source = join(work.dir, 'sparse.raw');
    const h = await open(source, 'w');
    await h.truncate(256 * MiB);
    // 16 MiB of text in the middle, zeroes written explicitly over 32 MiB (allocated, but zero).
    const line = Buffer.from('a very compressible line of text, repeated many times over.\n');
    const text = Buffer.alloc(16 * MiB);
    for (let i = 0; i < text.length; i += line.length) line.copy(text, i);
    await h.write(text, 0, text.length, 100 * MiB);
    await h.write(Buffer.alloc(32 * MiB), 0, 32 * MiB, 160 * MiB);
    await h.close();
    const dest = join(work.dir, 'sparse-out.raw');
    const r = await capture(source, dest, ['--progress=json']);
    expect(r.code).toBe(0);
    expect(await imagesIdentical(source, dest)).toBe(true);
    const done = doneLine(r.stdout);
    // 48 MiB were allocated at the source; zstd shrinks the text at least tenfold and zero chunks are flags.
    expect(done.capturedBytes).toBe(48 * MiB);
    expect(done.bytesOnWire as number).toBeLessThan(4 * MiB);
  });

  it('limits the rate with --bandwidth', async () => {
    const source = join(work.dir, 'rate.raw');
    await writeFile(source, randomBytes(6 * MiB));
    const dest = join(work.dir, 'rate-out.raw');
    const r = await capture(source, dest, ['--bandwidth', '2M', '--progress=json']);
    expect(r.code).toBe(0);
    expect(await imagesIdentical(source, dest)).toBe(true);
    // Counters, not clocks: the limiter must not have changed what was sent.
    expect(doneLine(r.stdout).bytesOnWire as number).toBeGreaterThan(6 * MiB);
  });

  it('refuses an unknown host key, and a changed one, before logging in', async () => {
    const source = await makePatternedRaw(work.dir, 'hk.raw');
    const empty = join(work.dir, 'empty_known_hosts');
    await writeFile(empty, '');
    const url = `ssh://root@127.0.0.1:${sshd.port}${source}`;
    const unknown = await ferry(['capture', '-i', sshd.userKey, '--known-hosts', empty, url, join(work.dir, 'hk1.raw')]);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toMatch(/host key .*SHA256:.* is unknown/);
    expect(unknown.stderr).toContain(sshd.fingerprint);
    expect(existsSync(join(work.dir, 'hk1.raw'))).toBe(false);

    const wrongPin = `SHA256:${'A'.repeat(43)}`;
    const changed = await ferry(['capture', '-i', sshd.userKey, '--host-key', wrongPin, url, join(work.dir, 'hk2.raw')]);
    expect(changed.code).toBe(1);
    expect(changed.stderr).toMatch(/HOST KEY MISMATCH/);

    const pinned = await ferry(['capture', '-i', sshd.userKey, '--host-key', sshd.fingerprint, url, join(work.dir, 'hk3.raw')]);
    expect(pinned.stderr).toBe('');
    expect(pinned.code).toBe(0);
    expect(await imagesIdentical(source, join(work.dir, 'hk3.raw'))).toBe(true);
  });

  it('resumes after the connection is cut several times, re-sending nothing already durable', async () => {
    const source = join(work.dir, 'cut.raw');
    await writeFile(source, randomBytes(48 * MiB));
    const dest = join(work.dir, 'cut-out.qcow2');
    // Each of the first three connections dies after 12 MiB from the server.
    const proxy = await startCuttingProxy(sshd.port, 12 * MiB, 3);
    try {
      const runs: Array<Awaited<ReturnType<typeof capture>>> = [];
      for (let i = 0; i < 6; i++) {
        const r = await capture(source, dest, ['-O', 'qcow2', '--progress=json', '--channels', '2'], proxy.port);
        runs.push(r);
        if (r.code === 0) break;
        expect(r.stderr).toMatch(/lost|closed/);
      }
      expect(proxy.cuts).toBe(3);
      expect(runs.length).toBe(4);
      const last = runs[runs.length - 1];
      expect(last.code).toBe(0);
      const done = doneLine(last.stdout);
      expect(done.start).toBe('resumed');
      expect(done.resumedBytes as number).toBeGreaterThan(0);
      // The last run fetched only what the cut runs had not made durable: well under the whole source.
      expect(done.bytesOnWire as number).toBeLessThan(40 * MiB);
      expect(await imagesIdentical(source, dest)).toBe(true);
    } finally {
      await proxy.close();
    }
  });

  it('resumes after Ferry is killed, from what its journal recorded', async () => {
    const source = join(work.dir, 'kill.raw');
    await writeFile(source, randomBytes(40 * MiB));
    const dest = join(work.dir, 'kill-out.raw');
    const url = `ssh://root@127.0.0.1:${sshd.port}${source}`;
    const { spawn } = await import('node:child_process');
    const { FERRY } = await import('./helpers/env.js');
    // Slowed down so that several journal flushes happen before the kill.
    const child = spawn(process.execPath, [FERRY, 'capture', '-i', sshd.userKey, '--known-hosts', sshd.knownHosts, '--bandwidth', '8M', '--progress=json', url, dest]);
    let stdout = '';
    child.stdout.on('data', (d) => (stdout += d));
    // Killed once 20 MiB are in the working image: no chance to clean up or flush the journal on the way out.
    await new Promise<void>((resolve) => {
      const timer = setInterval(() => {
        const last = jsonLines(stdout).pop();
        if (child.exitCode !== null || ((last?.bytesWritten as number) ?? 0) >= 20 * MiB) {
          clearInterval(timer);
          child.kill('SIGKILL');
          resolve();
        }
      }, 50);
    });
    await new Promise((r) => child.once('close', r));
    expect(existsSync(dest)).toBe(false);
    const r = await capture(source, dest, ['--progress=json']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const done = doneLine(r.stdout);
    expect(done.start).toBe('resumed');
    expect(done.resumedBytes as number).toBeGreaterThanOrEqual(8 * MiB);
    expect(done.bytesOnWire as number).toBeLessThan(34 * MiB);
    expect(await imagesIdentical(source, dest)).toBe(true);
  });

  it('converges on a source written to during the capture', async () => {
    const size = 64 * MiB;
    const source = join(work.dir, 'live.raw');
    await writeFile(source, randomBytes(size));
    // qcow2: DEST is converted while each incremental pass runs, and thrown away when the pass finds changes.
    const dest = join(work.dir, 'live-out.qcow2');
    const url = `ssh://root@127.0.0.1:${sshd.port}${source}`;
    const { spawn } = await import('node:child_process');
    const { FERRY } = await import('./helpers/env.js');
    const child = spawn(process.execPath, [FERRY, 'capture', '-i', sshd.userKey, '--known-hosts', sshd.knownHosts, '--progress=json', '--bandwidth', '24M', '-O', 'qcow2', url, dest]);
    let stdout = '';
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    // The writer scribbles while the first pass runs and stops once an incremental pass has started.
    let writing = true;
    let writes = 0;
    child.stdout.on('data', (d) => {
      stdout += d;
      if (/"phase":"sync"/.test(stdout)) writing = false;
    });
    const exited = new Promise<number>((resolve) => child.on('close', (code) => resolve(code ?? -1)));
    while (writing && child.exitCode === null) {
      await scribble(source, 4, 64 * 1024, size);
      writes += 4;
      await new Promise((r) => setTimeout(r, 20));
    }
    const code = await exited;
    expect(stderr).toBe('');
    expect(code).toBe(0);
    expect(writes).toBeGreaterThan(0);
    const done = doneLine(stdout);
    expect(done.passes as number).toBeGreaterThanOrEqual(2);
    expect(await imagesIdentical(source, dest)).toBe(true);
    expect((await readdir(work.dir)).filter((f) => f.includes('ferry-capture'))).toEqual([]);
  });

  it('--sync brings an existing image up to date, fetching only what changed', async () => {
    const size = 32 * MiB;
    const source = join(work.dir, 'sync.raw');
    await writeFile(source, randomBytes(size));
    const dest = join(work.dir, 'sync-out.qcow2');
    expect((await capture(source, dest, ['-O', 'qcow2'])).code).toBe(0);
    const again = await capture(source, dest, ['-O', 'qcow2']);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/exists: use --sync/);
    await scribble(source, 8, 64 * 1024, size);
    const r = await capture(source, dest, ['-O', 'qcow2', '--sync', '--progress=json']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const done = doneLine(r.stdout);
    expect(done.start).toBe('seeded');
    // At most 8 changed chunks of 256 KiB came over the wire, not the 32 MiB.
    expect(done.bytesOnWire as number).toBeLessThan(8 * MiB);
    expect(await imagesIdentical(source, dest)).toBe(true);
  });

  it('--all-disks --inventory-only writes machine.json describing this machine, capturing nothing', async () => {
    const out = join(work.dir, 'machine');
    const url = `ssh://root@127.0.0.1:${sshd.port}`;
    const r = await ferry(['capture', '-i', sshd.userKey, '--known-hosts', sshd.knownHosts, '--all-disks', '--inventory-only', '--out-dir', out, '-O', 'qcow2', url]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const m = JSON.parse(await readFile(join(out, 'machine.json'), 'utf8'));
    const os = await import('node:os');
    expect(m.cpus).toBe(os.cpus().length);
    expect(m.memoryBytes).toBe(os.totalmem());
    expect(m.firmware).toBe(existsSync('/sys/firmware/efi') ? 'uefi' : 'bios');
    expect(m.os.id).toBe((await readFile('/etc/os-release', 'utf8')).match(/^ID=(.*)$/m)?.[1].replace(/"/g, ''));
    const macs = new Set<string>();
    for (const n of await readdir('/sys/class/net')) {
      const mac = (await readFile(`/sys/class/net/${n}/address`, 'utf8').catch(() => '')).trim();
      if (n !== 'lo' && mac && mac !== '00:00:00:00:00:00') macs.add(mac);
    }
    expect(new Set(m.nics.map((n: { mac: string }) => n.mac))).toEqual(macs);
    const { stdout } = await run('lsblk', ['-J', '-b', '-d', '-o', 'NAME,SIZE,TYPE,RM,RO']);
    const fixed = (JSON.parse(stdout).blockdevices as Array<{ name: string; size: number; type: string; rm: boolean; ro: boolean }>)
      .filter((d) => d.type === 'disk' && !d.rm && !d.ro && d.size > 0 && !/^(zram|ram)\d/.test(d.name))
      .map((d) => d.name);
    expect(m.disks.map((d: { name: string }) => d.name)).toEqual(fixed);
    for (const d of m.disks) expect(d.image).toEqual({ file: `${d.name}.qcow2`, format: 'qcow2' });
    expect(await readdir(out)).toEqual(['machine.json']);
  });

  it('transfers little more than the used blocks of an ext4 filesystem', async () => {
    requireTool('mkfs.ext4', 'e2fsprogs');
    requireTool('debugfs', 'e2fsprogs');
    const size = 256 * MiB;
    const source = join(work.dir, 'fs.raw');
    // Old garbage everywhere first: free space that must not travel.
    await writeFile(source, randomBytes(size));
    const content = join(work.dir, 'fs-content');
    await run('mkdir', ['-p', content]);
    await writeFile(join(content, 'data.bin'), randomBytes(12 * MiB));
    await writeFile(join(content, 'notes.txt'), 'hello from the source filesystem\n');
    // Inode tables zeroed at mkfs time, as the kernel's lazy init leaves them on a filesystem in use.
    await run('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard,lazy_itable_init=0', '-d', content, source]);
    const dest = join(work.dir, 'fs-out.raw');
    const r = await capture(source, dest, ['--progress=json']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const done = doneLine(r.stdout);
    // 12 MiB of incompressible file data plus metadata (mostly zero); the garbage in free space stays at the source.
    expect(done.bytesOnWire as number).toBeLessThan(16 * MiB);
    expect((done.filesystems as Array<{ type: string }>)[0].type).toBe('ext4');
    await run('e2fsck', ['-fn', dest]);
    const { stdout } = await run('debugfs', ['-R', 'cat /notes.txt', dest]);
    expect(stdout).toBe('hello from the source filesystem\n');
    await run('debugfs', ['-R', `dump /data.bin ${join(work.dir, 'data.back')}`, dest]);
    expect((await readFile(join(work.dir, 'data.back'))).equals(await readFile(join(content, 'data.bin')))).toBe(true);
  });
});
