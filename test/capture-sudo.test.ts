// Capture through an unprivileged login: Ferry runs its block server under sudo. The accounts are throwaway
// ones this test creates and deletes (tests run as root, as in CI), reachable only through the test's own
// sshd, and the source file is readable by root alone.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ferry, imagesIdentical, requireTool, tempDir } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';
import { startSshd, type TestSshd } from './helpers/sshd.js';

const run = promisify(execFile);
const suffix = randomBytes(3).toString('hex');
/** sudo without a password; sudo with the login password; no sudo at all. */
const users = { nopasswd: `ferrysn${suffix}`, passwd: `ferrysp${suffix}`, none: `ferrysx${suffix}` };
const password = randomBytes(12).toString('base64url');
const sudoers = `/etc/sudoers.d/ferry-test-${suffix}`;

let sshd: TestSshd;
let work: { dir: string; cleanup: () => Promise<void> };
let source: string;

beforeAll(async () => {
  requireTool('sudo', 'sudo');
  requireTool('useradd', 'passwd');
  if (process.getuid?.() !== 0) throw new Error('the sudo capture tests create throwaway accounts and must run as root (as CI does)');
  sshd = await startSshd({ otherUsers: true });
  work = await tempDir('ferry-capture-sudo-');
  for (const user of Object.values(users)) {
    await run('useradd', ['--no-create-home', '--home-dir', '/', '--shell', '/bin/sh', user]);
    // A set password: sshd without PAM refuses even key logins to a locked account.
    await new Promise<void>((resolve, reject) => {
      const child = execFile('chpasswd', (err) => (err ? reject(err) : resolve()));
      child.stdin?.end(`${user}:${password}\n`);
    });
  }
  await writeFile(sudoers, `${users.nopasswd} ALL=(root) NOPASSWD: ALL\n${users.passwd} ALL=(root) ALL\n`, { mode: 0o440 });
  await run('visudo', ['-c', '-q', '-f', sudoers]);
  source = await makePatternedRaw(work.dir, 'disk.raw', '64M');
  await run('chmod', ['600', source]); // root only: the login user cannot read it without sudo
});

afterAll(async () => {
  await rm(sudoers, { force: true });
  for (const user of Object.values(users)) await run('userdel', [user]).catch(() => undefined);
  await sshd?.stop();
  await work?.cleanup();
});

function capture(user: string, dest: string, extra: string[] = []) {
  return ferry(['capture', '--known-hosts', sshd.knownHosts, `ssh://${user}@127.0.0.1:${sshd.port}${source}`, dest, ...extra], { timeoutMs: 90_000 });
}

describe('ferry capture as an unprivileged user', () => {
  it('reads the source through sudo without a password, and leaves nothing behind', async () => {
    const dest = join(work.dir, 'nopasswd.qcow2');
    const r = await capture(users.nopasswd, dest, ['-i', sshd.userKey, '-O', 'qcow2']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(await imagesIdentical(source, dest)).toBe(true);
    const { stdout } = await run('find', [sshd.tmpDir, '-mindepth', '1']);
    expect(stdout).toBe('');
  });

  it('answers sudo with the login password from --password-env, and never prints it', async () => {
    const dest = join(work.dir, 'passwd.raw');
    process.env.FERRY_TEST_SUDO_PASSWORD = password;
    try {
      const r = await capture(users.passwd, dest, ['--password-env', 'FERRY_TEST_SUDO_PASSWORD']);
      expect(r.code).toBe(0);
      expect(r.stdout + r.stderr).not.toContain(password);
      expect(await imagesIdentical(source, dest)).toBe(true);
    } finally {
      delete process.env.FERRY_TEST_SUDO_PASSWORD;
    }
  });

  it('given a wrong password for sudo, stops with one clear line instead of waiting', async () => {
    const dest = join(work.dir, 'wrong.raw');
    process.env.FERRY_TEST_SUDO_PASSWORD = `${password}x`;
    try {
      // Logged in by key; only sudo sees the password.
      const r = await capture(users.passwd, dest, ['-i', sshd.userKey, '--password-env', 'FERRY_TEST_SUDO_PASSWORD']);
      expect(r.code).not.toBe(0);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/sudo would not run Ferry's agent as root \(sudo: .*incorrect password/);
      expect(r.stderr).not.toContain(password);
    } finally {
      delete process.env.FERRY_TEST_SUDO_PASSWORD;
    }
  });

  it('without sudo rights, stops with one clear line and no output', async () => {
    const dest = join(work.dir, 'none.raw');
    const r = await capture(users.none, dest, ['-i', sshd.userKey]);
    expect(r.code).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/sudo would not run Ferry's agent as root \(sudo: a password is required\): the login user needs sudo rights/);
    const { stdout } = await run('find', [work.dir, '-name', 'none.raw*']);
    expect(stdout).toBe('');
  });
});
