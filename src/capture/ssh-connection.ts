import { readFile } from 'node:fs/promises';
import { connect as connectTcp, type Socket } from 'node:net';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { Client, type ClientChannel, type ConnectConfig } from 'ssh2';
import { InvalidOptionError } from '../errors.js';
import { HostKeyError, SourceConnectionError } from './errors.js';
import { fingerprint, keyType, type HostKeyPolicy } from './known-hosts.js';

/** Where a capture reads from: ssh://USER@HOST[:PORT][/DEVICE]. */
export interface SshTarget {
  user: string;
  host: string;
  port: number;
  /** The device (or file) path on the source; empty for a whole-machine capture. */
  device: string;
}

export function parseSshUrl(text: string): SshTarget {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new InvalidOptionError(`'${text}' is not a source URL: expected ssh://USER@HOST[:PORT]/DEVICE`, { field: 'source' });
  }
  if (url.protocol !== 'ssh:') throw new InvalidOptionError(`source must be an ssh:// URL, not '${url.protocol}'`, { field: 'source' });
  // Never accept a secret on the command line, where ps and shell history see it.
  if (url.password) throw new InvalidOptionError('do not put a password in the URL: use --password-env VAR', { field: 'source' });
  if (!url.username) throw new InvalidOptionError('the source URL needs a user: ssh://USER@HOST/DEVICE', { field: 'source' });
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  return {
    user: decodeURIComponent(url.username),
    host,
    port: url.port ? Number(url.port) : 22,
    device: url.pathname === '/' ? '' : decodeURIComponent(url.pathname),
  };
}

export function describeTarget(t: SshTarget, device = t.device): string {
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  return `ssh://${t.user}@${host}${t.port === 22 ? '' : `:${t.port}`}${device}`;
}

/** How to log in. Secrets are read here and held only in memory, never logged. */
export interface SshAuth {
  /** Private key file (`--identity`); when no method is given, ~/.ssh/id_ed25519, id_ecdsa and id_rsa are tried. */
  identityFile?: string;
  /** Environment variable holding the key's passphrase. */
  passphraseEnv?: string;
  /** Use the ssh-agent at SSH_AUTH_SOCK. */
  useAgent?: boolean;
  /** Environment variable holding the login password (also given to sudo when it asks). */
  passwordEnv?: string;
  /**
   * Secrets already in memory (a job's stored credential), used instead of identityFile, passphraseEnv and
   * passwordEnv: nothing is read from files or the environment, and the default keys are not tried.
   */
  secrets?: LoginSecrets;
}

export interface LoginSecrets {
  privateKey?: string;
  passphrase?: string;
  /** The login password, also given to sudo when it asks. */
  password?: string;
}

export interface ExecResult {
  code: number;
  stdout: Buffer;
  stderr: string;
}

const CONNECT_TIMEOUT_MS = 20_000;
const SUDO_PROMPT = '[ferry-sudo-password]';

/** One authenticated SSH connection to a capture source, with exec helpers. */
export class SshConnection {
  private constructor(
    readonly target: SshTarget,
    private readonly client: Client,
    private readonly socket: Socket,
    private readonly password: string | undefined,
  ) {}

  static async open(target: SshTarget, auth: SshAuth, hostKeys: HostKeyPolicy): Promise<SshConnection> {
    const where = describeTarget(target, '');
    const config: ConnectConfig = { username: target.user, readyTimeout: CONNECT_TIMEOUT_MS, keepaliveInterval: 10_000, keepaliveCountMax: 3 };
    const { password, privateKey, passphrase } = await loginSecrets(auth);
    if (password !== undefined) config.password = password;
    if (privateKey) {
      config.privateKey = privateKey;
      if (passphrase !== undefined) config.passphrase = passphrase;
    }
    if (auth.useAgent) {
      if (!process.env.SSH_AUTH_SOCK) throw new InvalidOptionError('--agent needs SSH_AUTH_SOCK (a running ssh-agent)', { field: 'agent' });
      config.agent = process.env.SSH_AUTH_SOCK;
    }
    if (!config.password && !config.privateKey && !config.agent) {
      throw new InvalidOptionError('no way to log in: give --identity FILE, --agent or --password-env VAR', { field: 'identity' });
    }
    if (hostKeys.algorithms) config.algorithms = { serverHostKey: hostKeys.algorithms };
    let rejection: HostKeyError | undefined;
    config.hostVerifier = (blob: Buffer) => {
      const verdict = hostKeys.check(blob);
      if (verdict === 'trusted') return true;
      rejection = hostKeyError(verdict, where, blob, hostKeys.origin);
      return false;
    };

    // Our own socket, so the bytes that really crossed the network can be counted.
    const socket = await openSocket(target.host, target.port, where);
    config.sock = socket;
    const client = new Client();
    try {
      await new Promise<void>((resolve, reject) => {
        client.once('ready', resolve);
        client.once('error', (err) => reject(rejection ?? new SourceConnectionError(`${where}: ${err.message}`, { cause: err })));
        client.connect(config);
      });
    } catch (err) {
      client.end();
      socket.destroy();
      throw err;
    }
    // Late errors (a dropped connection) surface through the channels; keep them from crashing the process.
    client.on('error', () => undefined);
    return new SshConnection(target, client, socket, password);
  }

  get isRoot(): boolean {
    return this.target.user === 'root';
  }

  /** Bytes received from the network on this connection so far. */
  get bytesReceived(): number {
    return this.socket.bytesRead;
  }

  /**
   * Runs a command and returns its output. `input` is written to its stdin. With `asRoot` and a non-root
   * user, the command runs under sudo (the password from --password-env answers its prompt).
   */
  async exec(command: string, opts: { input?: Buffer; asRoot?: boolean } = {}): Promise<ExecResult> {
    // sudo -S would read the input as its password: the two cannot share stdin.
    if (opts.input && opts.asRoot && !this.isRoot) throw new RangeError('exec: input cannot go to a command run under sudo');
    const channel = await this.execChannel(command, opts);
    const stdout: Buffer[] = [];
    let stderr = '';
    channel.on('data', (d: Buffer) => stdout.push(d));
    channel.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString('utf8')).slice(-8192)));
    if (opts.input) channel.end(opts.input);
    else channel.end();
    const code = await new Promise<number>((resolve) => {
      let status = -1;
      channel.on('exit', (c: number | null) => (status = c ?? -1));
      channel.on('close', () => resolve(status));
    });
    return { code, stdout: Buffer.concat(stdout), stderr };
  }

  /** Starts a command and returns its channel (stdout/stdin) for a streaming protocol. */
  async execChannel(command: string, opts: { asRoot?: boolean } = {}): Promise<ClientChannel> {
    const sudo = opts.asRoot && !this.isRoot;
    const line = sudo ? (this.password !== undefined ? `sudo -S -p ${shellQuote(SUDO_PROMPT)} ` : 'sudo -n ') + command : command;
    const channel = await new Promise<ClientChannel>((resolve, reject) => {
      this.client.exec(line, (err, ch) => (err ? reject(new SourceConnectionError(`${describeTarget(this.target, '')}: cannot run a command: ${err.message}`, { cause: err })) : resolve(ch)));
    });
    if (sudo && this.password !== undefined) {
      // sudo reads the password a byte at a time, so nothing after the newline reaches the command. It is
      // given once: asked again, it was wrong, and sudo gets end of input rather than a wait forever.
      const password = this.password;
      let seen = '';
      let answered = false;
      const onPrompt = (d: Buffer) => {
        seen = (seen + d.toString('utf8')).slice(-SUDO_PROMPT.length * 2);
        if (!seen.includes(SUDO_PROMPT)) return;
        seen = '';
        if (answered) {
          channel.stderr.off('data', onPrompt);
          channel.end();
          return;
        }
        answered = true;
        channel.write(password + '\n');
      };
      channel.stderr.on('data', onPrompt);
    }
    return channel;
  }

  close(): void {
    this.client.end();
    this.socket.destroy();
  }
}

export function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function readSecret(envName: string | undefined, flag: string): string | undefined {
  if (envName === undefined) return undefined;
  const value = process.env[envName];
  if (value === undefined) throw new InvalidOptionError(`${flag} ${envName}: that environment variable is not set`, { field: flag.slice(2) });
  return value;
}

/** The password and key to log in with: given in memory, or read from the files and variables named. */
async function loginSecrets(auth: SshAuth): Promise<{ password?: string; privateKey?: string | Buffer; passphrase?: string }> {
  if (auth.secrets) return auth.secrets;
  const password = readSecret(auth.passwordEnv, '--password-env');
  const privateKey = await readPrivateKey(auth);
  return { password, privateKey, passphrase: privateKey ? readSecret(auth.passphraseEnv, '--passphrase-env') : undefined };
}

async function readPrivateKey(auth: SshAuth): Promise<Buffer | undefined> {
  if (auth.identityFile) return readFile(auth.identityFile);
  if (auth.useAgent || auth.passwordEnv) return undefined;
  for (const name of ['id_ed25519', 'id_ecdsa', 'id_rsa']) {
    const key = await readFile(join(homedir(), '.ssh', name)).catch(() => undefined);
    if (key) return key;
  }
  return undefined;
}

function openSocket(host: string, port: number, where: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connectTcp({ host, port });
    const timer = setTimeout(() => socket.destroy(new Error('connection timed out')), CONNECT_TIMEOUT_MS);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(new SourceConnectionError(`${where}: ${err.message}`, { cause: err }));
    });
  });
}

function hostKeyError(verdict: Exclude<ReturnType<HostKeyPolicy['check']>, 'trusted'>, where: string, blob: Buffer, origin: string): HostKeyError {
  const fp = `${keyType(blob)} ${fingerprint(blob)}`;
  switch (verdict) {
    case 'unknown':
      return new HostKeyError(
        `${where}: host key ${fp} is unknown (not in ${origin}); check it out of band, then add it to known_hosts or pass --host-key ${fingerprint(blob)}`,
        { field: 'host-key' },
      );
    case 'revoked':
      return new HostKeyError(`${where}: host key ${fp} is marked @revoked in ${origin}; refusing to connect`, { field: 'host-key' });
    case 'changed':
      return new HostKeyError(
        `${where}: HOST KEY MISMATCH: the server presented ${fp}, which ${origin} does not list for it. Someone may be intercepting the connection, or the host was reinstalled; refusing to connect`,
        { field: 'host-key' },
      );
  }
}
