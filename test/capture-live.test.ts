/**
 * Capturing a live filesystem: a loop device with a mounted ext4 that a writer keeps changing while Ferry
 * captures it, and the freeze watchdog that must thaw whatever happens to Ferry or the agent.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentChannel } from '../src/capture/agent-channel.js';
import { doneLine, ferry, requireTool, ROOT, tempDir } from './helpers/env.js';
import { startSshd, type TestSshd } from './helpers/sshd.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const AGENT = join(ROOT, 'native', 'build', 'ferry-agent');

let sshd: TestSshd;
let work: { dir: string; cleanup: () => Promise<void> };
let loop = '';
let mountPoint = '';

/** A 256 MiB ext4 on a loop device, mounted: needs root and loop devices (as in CI). */
async function mountLoopFilesystem(): Promise<void> {
  requireTool('losetup', 'util-linux');
  requireTool('mkfs.ext4', 'e2fsprogs');
  const image = join(work.dir, 'disk.img');
  await run('truncate', ['-s', '256M', image]);
  await run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0', image]);
  try {
    loop = (await run('losetup', ['-f', '--show', image])).stdout.trim();
  } catch (err) {
    throw new Error(`cannot create a loop device (these tests need root and /dev/loop-control): ${(err as Error).message}`);
  }
  mountPoint = join(work.dir, 'mnt');
  await mkdir(mountPoint);
  await run('mount', [loop, mountPoint]);
}

/** True when the filesystem accepts a write within a few seconds (a frozen one blocks every writer). */
async function writable(path: string): Promise<boolean> {
  try {
    await run('timeout', ['5', 'sh', '-c', `echo probe > '${path}/probe' && sync '${path}/probe'`]);
    return true;
  } catch {
    return false;
  }
}

beforeAll(async () => {
  sshd = await startSshd();
  work = await tempDir('ferry-live-');
  await mountLoopFilesystem();
});

afterAll(async () => {
  // Thaw first in case a failed test left it frozen, so umount cannot hang.
  if (mountPoint) await run('fsfreeze', ['-u', mountPoint]).catch(() => undefined);
  if (mountPoint) await run('umount', [mountPoint]).catch(() => undefined);
  if (loop) await run('losetup', ['-d', loop]).catch(() => undefined);
  await sshd?.stop();
  await work?.cleanup();
});

describe('live capture with freeze', () => {
  it('captures a mounted filesystem while it is written, consistent at the freeze', async () => {
    requireTool('e2fsck', 'e2fsprogs');
    requireTool('debugfs', 'e2fsprogs');
    await writeFile(join(mountPoint, 'static.bin'), Buffer.alloc(4 * MiB, 0x5a));
    // The writer appends numbered lines, and rewrites a 1 MiB file, for as long as the test lets it.
    const writer: ChildProcess = spawn('sh', [
      '-c',
      `i=0; while :; do echo "record $i" >> '${mountPoint}/log.txt'; i=$((i+1)); ` +
        `[ $((i % 50)) -eq 0 ] && head -c 1048576 /dev/urandom > '${mountPoint}/churn.bin'; done`,
    ]);
    try {
      const dest = join(work.dir, 'live.qcow2');
      const r = await ferry(
        ['capture', '-i', sshd.userKey, '--known-hosts', sshd.knownHosts, '-O', 'qcow2', '--progress=json', '--freeze-timeout', '30', `ssh://root@127.0.0.1:${sshd.port}${loop}`, dest],
        { timeoutMs: 120_000 },
      );
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      const done = doneLine(r.stdout);
      expect(done.frozen).toEqual([mountPoint]);
      expect((done.filesystems as Array<{ type: string }>)[0].type).toBe('ext4');

      // The image is the filesystem at one instant: clean without journal replay, the log a gapless prefix.
      const raw = join(work.dir, 'live.raw');
      await run('qemu-img', ['convert', '-O', 'raw', dest, raw]);
      await run('e2fsck', ['-fn', raw]);
      const { stdout } = await run('debugfs', ['-R', 'cat /log.txt', raw], { maxBuffer: 256 * MiB });
      const lines = stdout.split('\n').filter((l) => l !== '');
      expect(lines.length).toBeGreaterThan(0);
      lines.forEach((l, i) => expect(l).toBe(`record ${i}`));
      const { stdout: staticDump } = await run('debugfs', ['-R', 'stat /static.bin', raw]);
      expect(staticDump).toMatch(/Size: 4194304/);
    } finally {
      writer.kill('SIGKILL');
    }
    expect(await writable(mountPoint)).toBe(true);
  });

  it('the agent\'s watchdog thaws after its timeout, and reports it', async () => {
    const channel = await startLocalAgent(join(work.dir, 'disk.img'));
    try {
      await channel.freeze([mountPoint], 300);
      expect(await writable(mountPoint)).toBe(true);
      const { heldUntilThaw } = await channel.thaw();
      expect(heldUntilThaw).toBe(false);

      await channel.freeze([mountPoint], 60_000);
      expect((await channel.thaw()).heldUntilThaw).toBe(true);
      expect(await writable(mountPoint)).toBe(true);
    } finally {
      channel.close();
    }
  });

  it('a killed agent leaves nothing frozen', async () => {
    const { child, channel } = await startLocalAgentProcess(join(work.dir, 'disk.img'));
    await channel.freeze([mountPoint], 60_000);
    child.kill('SIGKILL');
    expect(await writable(mountPoint)).toBe(true);
  });

  it('a failed freeze is reported and freezes nothing', async () => {
    const channel = await startLocalAgent(join(work.dir, 'disk.img'));
    try {
      await expect(channel.freeze([mountPoint, join(work.dir, 'no-such-dir')], 60_000)).rejects.toThrow(/freeze .*no-such-dir/);
      expect(await writable(mountPoint)).toBe(true);
    } finally {
      channel.close();
    }
  });
});

async function startLocalAgentProcess(device: string): Promise<{ child: ChildProcess; channel: AgentChannel }> {
  const child = spawn(AGENT, [device]);
  const channel = await AgentChannel.start({ output: child.stdout!, input: child.stdin!, errors: child.stderr!, where: 'local agent' });
  return { child, channel };
}

async function startLocalAgent(device: string): Promise<AgentChannel> {
  return (await startLocalAgentProcess(device)).channel;
}
