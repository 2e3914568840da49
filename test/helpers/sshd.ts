import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { requireTool, tempDir } from './env.js';

const run = promisify(execFile);

export interface TestSshd {
  port: number;
  dir: string;
  /** The user's private key (authorized for root). */
  userKey: string;
  /** A known_hosts file listing this server's host key for [127.0.0.1]:port. */
  knownHosts: string;
  /** The host key's SHA256 fingerprint, as ssh-keygen -l prints it. */
  fingerprint: string;
  /**
   * TMPDIR of this server's sessions, where Ferry pushes its agent: private to the server, so a test can
   * check that nothing was left behind without seeing other tests' captures under way.
   */
  tmpDir: string;
  stop(): Promise<void>;
}

/** A free loopback port: bound by the kernel, released, then handed to the server that needs it. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

export interface SshdOptions {
  /**
   * Let accounts other than root in too: by the same key (the key file is made readable to them, since
   * sshd reads it as the user) or by password.
   */
  otherUsers?: boolean;
}

/**
 * Starts the system's OpenSSH server on a free loopback port with freshly generated host and user keys,
 * configured only for this test (root login by key, no PAM). Tests run as root, as in CI.
 */
export async function startSshd(options: SshdOptions = {}): Promise<TestSshd> {
  requireTool('/usr/sbin/sshd', 'openssh-server');
  requireTool('ssh-keygen', 'openssh-client');
  const { dir, cleanup } = await tempDir('ferry-sshd-');
  const hostKey = join(dir, 'host_ed25519');
  const userKey = join(dir, 'user_ed25519');
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', hostKey]);
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', userKey]);
  await writeFile(join(dir, 'authorized_keys'), await readFile(`${userKey}.pub`), { mode: options.otherUsers ? 0o644 : 0o600 });
  if (options.otherUsers) await chmod(dir, 0o755);
  // sshd refuses to start without its privilege separation directory.
  await mkdir('/run/sshd', { recursive: true, mode: 0o755 });
  const port = await freePort();
  const tmpDir = join(dir, 'tmp');
  await mkdir(tmpDir, { mode: 0o1777 });
  const config = join(dir, 'sshd_config');
  await writeFile(
    config,
    [
      `ListenAddress 127.0.0.1`,
      `HostKey ${hostKey}`,
      `AuthorizedKeysFile ${join(dir, 'authorized_keys')}`,
      `PidFile ${join(dir, 'sshd.pid')}`,
      'UsePAM no',
      'StrictModes no',
      'PermitRootLogin yes',
      `PasswordAuthentication ${options.otherUsers ? 'yes' : 'no'}`,
      'KbdInteractiveAuthentication no',
      'MaxSessions 20',
      `SetEnv TMPDIR=${tmpDir}`,
      'LogLevel ERROR',
    ].join('\n') + '\n',
  );
  const child: ChildProcess = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', config, '-p', String(port)], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  child.stderr?.on('data', (d) => (log += d));
  await waitForPort(port, child, () => log);
  const hostPub = (await readFile(`${hostKey}.pub`, 'utf8')).trim().split(/\s+/);
  const knownHosts = join(dir, 'known_hosts');
  await writeFile(knownHosts, `[127.0.0.1]:${port} ${hostPub[0]} ${hostPub[1]}\n`);
  const { stdout } = await run('ssh-keygen', ['-l', '-f', `${hostKey}.pub`]);
  const fingerprint = stdout.split(/\s+/)[1];
  return {
    port,
    dir,
    userKey,
    knownHosts,
    fingerprint,
    tmpDir,
    async stop() {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await new Promise((r) => child.once('exit', r));
      }
      await cleanup();
    },
  };
}

async function waitForPort(port: number, child: ChildProcess, log: () => string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) throw new Error(`sshd exited (${child.exitCode}): ${log()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect({ port, host: '127.0.0.1' });
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`sshd did not listen on port ${port}: ${log()}`);
}

export interface CuttingProxy {
  port: number;
  /** Connections cut so far. */
  cuts: number;
  close(): Promise<void>;
}

/**
 * A loopback TCP proxy in front of sshd that destroys each of the first `cutCount` connections once
 * `cutAfterBytes` have flowed from the server: a network failure in the middle of a transfer.
 */
export async function startCuttingProxy(targetPort: number, cutAfterBytes: number, cutCount: number): Promise<CuttingProxy> {
  const sockets = new Set<Socket>();
  const state = { cuts: 0 };
  const server: Server = createServer((client) => {
    const upstream = connect({ port: targetPort, host: '127.0.0.1' });
    sockets.add(client).add(upstream);
    const cut = state.cuts < cutCount;
    let fromServer = 0;
    const destroy = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', destroy);
    upstream.on('error', destroy);
    client.on('close', destroy);
    upstream.on('close', destroy);
    client.on('data', (d) => upstream.write(d));
    upstream.on('data', (d: Buffer) => {
      fromServer += d.length;
      if (cut && fromServer > cutAfterBytes && !client.destroyed) {
        state.cuts++;
        destroy();
        return;
      }
      client.write(d);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as { port: number }).port,
    get cuts() {
      return state.cuts;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

export interface ThrottlingProxy {
  port: number;
  close(): Promise<void>;
}

/** A loopback TCP proxy in front of sshd that lets at most `bytesPerSecond` through from the server: a slow link. */
export async function startThrottlingProxy(targetPort: number, bytesPerSecond: number): Promise<ThrottlingProxy> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    const upstream = connect({ port: targetPort, host: '127.0.0.1' });
    sockets.add(client).add(upstream);
    const started = performance.now();
    let fromServer = 0;
    const destroy = () => {
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) s.on('error', destroy).on('close', destroy);
    client.on('data', (d) => upstream.write(d));
    upstream.on('data', (d: Buffer) => {
      client.write(d);
      fromServer += d.length;
      // Ahead of the allowed rate: stop reading until the rate has caught up.
      const aheadMs = (fromServer / bytesPerSecond) * 1000 - (performance.now() - started);
      if (aheadMs > 0) {
        upstream.pause();
        setTimeout(() => upstream.resume(), aheadMs);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as { port: number }).port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
