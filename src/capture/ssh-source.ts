import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PACKAGE_ROOT } from '../paths.js';
import { MAX_CHUNK, MIN_CHUNK } from '../transfer/protocol.js';
import type { RateLimiter } from '../transfer/rate-limiter.js';
import { AgentChannel } from './agent-channel.js';
import { SourceConnectionError } from './errors.js';
import { describeTarget, shellQuote, type SshConnection } from './ssh-connection.js';
import type { BlockSource, ReceivedRun, SourceCounters } from './source.js';

/** Built by scripts/build-native.sh. */
const AGENT_BINARY = join(PACKAGE_ROOT, 'native', 'build', 'ferry-agent');
/** The agent is built for this machine's architecture; uname -m names it so on the source. */
const AGENT_ARCH: Record<string, string> = { x64: 'x86_64', arm64: 'aarch64' };

/**
 * Copies the agent to a private temporary directory on the source and prints the directory. Tries the usual
 * temporary places in turn, because /tmp is often mounted noexec on hardened servers.
 */
const PUSH_SCRIPT = (arch: string) => `
set -u
arch=$(uname -m)
[ "$arch" = ${shellQuote(arch)} ] || { echo "the source is $arch; this Ferry's agent is built for ${arch}" >&2; exit 3; }
umask 077
dir=""
for base in "\${TMPDIR:-/tmp}" /var/tmp /dev/shm "$HOME"; do
  d=$(mktemp -d "$base/ferry-agent.XXXXXXXX" 2>/dev/null) || continue
  if [ -z "$dir" ]; then cat > "$d/ferry-agent" || { rm -rf "$d"; exit 1; }
  else cp "$dir/ferry-agent" "$d/ferry-agent" && rm -rf "$dir"; fi
  dir=$d
  chmod 700 "$d/ferry-agent"
  if "$d/ferry-agent" --version >/dev/null 2>&1; then echo "$d"; exit 0; fi
done
[ -n "$dir" ] && rm -rf "$dir"
echo "no temporary directory on the source lets programs run (all noexec?)" >&2
exit 1
`;

export interface SshSourceOptions {
  /** Agent processes (SSH exec channels) reading in parallel. */
  channels: number;
  /** zstd level the agent compresses with; 0 sends data plain. */
  level: number;
  limiter?: RateLimiter;
  /** The device the agents read instead of the one the source names: a temporary snapshot of it. */
  readFrom?: string;
}

/**
 * A block device (or file) on a machine reached over SSH. Ferry pushes its agent, starts one agent per
 * channel on the same connection (run as root through sudo when the user is not root), then deletes the
 * binary at once: the running processes keep it, and nothing is left on the source even if Ferry is killed.
 *
 * The first agent serves the plan and the first reads; the others start once it runs and join as they come
 * up. Started side by side, they would all be late: each is a remote login shell reading its rc files. The
 * first agent removes the binary once all run; any agent that exits earlier (a lost connection) removes it.
 */
export class SshBlockSource implements BlockSource {
  private readonly wireBaseline: number;
  /** An agent that failed to start after the first one ran: every later request fails with it. */
  private lateFailure: Error | undefined;

  private constructor(
    private readonly conn: SshConnection,
    readonly device: string,
    /** The agents running so far, the first one first; the rest are appended as they start. */
    private readonly channels: AgentChannel[],
    /** Settles once every agent runs (or one failed) and the pushed binary is gone. */
    private readonly starting: Promise<void>,
    readonly parallelism: number,
    readonly size: number,
    readonly sectorSize: number,
    readonly blockDevice: boolean,
    private readonly level: number,
    /** What the agents read: `device`, or a snapshot of it (whose mounts, none, are what a freeze would see). */
    private readonly readDevice: string,
  ) {
    this.wireBaseline = conn.bytesReceived;
    starting.catch((err: unknown) => (this.lateFailure ??= err instanceof Error ? err : new Error(String(err))));
  }

  static async open(conn: SshConnection, device: string, opts: SshSourceOptions): Promise<SshBlockSource> {
    const where = describeTarget(conn.target, device);
    const readDevice = opts.readFrom ?? device;
    const dir = await pushAgent(conn, where);
    const channels: AgentChannel[] = [];
    const startAgent = async () => {
      const ch = await conn.execChannel(`${shellQuote(`${dir}/ferry-agent`)} ${shellQuote(readDevice)}`, { asRoot: true });
      const agent = await AgentChannel.start({ output: ch, input: ch, errors: ch.stderr, where }, opts.limiter);
      channels.push(agent);
      return agent;
    };
    const first = startAgent();
    const others = first.then(
      () => Array.from({ length: opts.channels - 1 }, startAgent),
      () => [],
    );
    // Once every agent runs, the first one removes the binary, without another remote shell.
    const starting = others.then((rest) => Promise.allSettled([first, ...rest])).then(async (results) => {
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      const unlinked = !failed && (await channels[0].unlinkSelf().then(() => true, () => false));
      if (!unlinked) await removeDirectory(conn, dir);
      if (failed) throw failed.reason;
    });
    // Handled by the source (or below); a failure must never go unobserved meanwhile.
    starting.catch(() => undefined);
    try {
      const info = await (await first).info();
      return new SshBlockSource(conn, device, channels, starting, opts.channels, info.size, info.sectorSize, info.blockDevice, opts.level, readDevice);
    } catch (err) {
      await starting.catch(() => undefined);
      for (const ch of channels) ch.close();
      throw err;
    }
  }

  get description(): string {
    return describeTarget(this.conn.target, this.device);
  }

  get counters(): SourceCounters {
    return {
      bytesRead: this.channels.reduce((n, ch) => n + ch.bytesRead, 0),
      bytesOnWire: this.conn.bytesReceived - this.wireBaseline,
    };
  }

  read(offset: number, length: number, chunkSize: number, onRun: (run: ReceivedRun) => Promise<void>): Promise<void> {
    return this.leastBusy().read(offset, length, chunkSize, this.level, onRun);
  }

  hashes(offset: number, length: number, chunkSize: number, group = 1): Promise<Buffer> {
    return this.leastBusy().hashes(offset, length, chunkSize, group);
  }

  allocated(offset: number, length: number): Promise<Array<[number, number]>> {
    return this.leastBusy().segments(offset, length);
  }

  async readBytes(offset: number, length: number): Promise<Buffer> {
    if (length > MAX_CHUNK) throw new RangeError(`readBytes: ${length} bytes is more than one request`);
    const out = Buffer.alloc(length);
    await this.read(offset, length, Math.max(MIN_CHUNK, length), async (run) => {
      run.data?.copy(out, run.offset - offset);
    });
    return out;
  }

  async mountPoints(): Promise<string[]> {
    if (!this.blockDevice) return [];
    // MOUNTPOINTS (all mounts) needs util-linux 2.37; older lsblk only knows MOUNTPOINT.
    for (const column of ['MOUNTPOINTS', 'MOUNTPOINT']) {
      const r = await this.conn.exec(`lsblk -J -o ${column} ${shellQuote(this.readDevice)}`);
      if (r.code !== 0) continue;
      const found = new Set<string>();
      const walk = (node: Record<string, unknown>) => {
        const value = node[column.toLowerCase()];
        for (const m of Array.isArray(value) ? value : [value]) if (typeof m === 'string' && m.startsWith('/')) found.add(m);
        for (const child of (node.children as Array<Record<string, unknown>> | undefined) ?? []) walk(child);
      };
      for (const dev of (JSON.parse(r.stdout.toString('utf8')) as { blockdevices?: Array<Record<string, unknown>> }).blockdevices ?? []) walk(dev);
      // Deepest first, so a filesystem mounted inside another is frozen before its parent.
      return [...found].sort((a, b) => b.length - a.length);
    }
    return [];
  }

  freeze(mountPoints: string[], timeoutMs: number): Promise<void> {
    return this.channels[0].freeze(mountPoints, timeoutMs);
  }

  thaw(): Promise<{ heldUntilThaw: boolean }> {
    return this.channels[0].thaw();
  }

  async close(): Promise<void> {
    await this.starting.catch(() => undefined);
    for (const ch of this.channels) ch.close();
  }

  private leastBusy(): AgentChannel {
    if (this.lateFailure) throw this.lateFailure;
    let best = this.channels[0];
    for (const ch of this.channels) if (ch.pending < best.pending) best = ch;
    return best;
  }
}

function removeDirectory(conn: SshConnection, dir: string): Promise<unknown> {
  return conn.exec(`rm -rf ${shellQuote(dir)}`).catch(() => undefined);
}

async function pushAgent(conn: SshConnection, where: string): Promise<string> {
  if (!existsSync(AGENT_BINARY)) throw new SourceConnectionError(`the capture agent is not built (${AGENT_BINARY}): run npm run build`);
  const arch = AGENT_ARCH[process.arch];
  if (!arch) throw new SourceConnectionError(`no capture agent for this machine's architecture (${process.arch})`);
  const r = await conn.exec(PUSH_SCRIPT(arch), { input: await readFile(AGENT_BINARY) });
  const dir = r.stdout.toString('utf8').trim();
  if (r.code !== 0 || !dir.startsWith('/')) {
    throw new SourceConnectionError(`${where}: cannot install the agent: ${r.stderr.trim() || `exit status ${r.code}`}`);
  }
  return dir;
}
