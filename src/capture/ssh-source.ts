import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PACKAGE_ROOT } from '../paths.js';
import { MAX_CHUNK, MIN_CHUNK } from '../transfer/protocol.js';
import type { RateLimiter } from '../transfer/rate-limiter.js';
import { AgentChannel } from './agent-channel.js';
import { SourceConnectionError } from './errors.js';
import { describeTarget, shellQuote, type SshConnection } from './ssh-connection.js';
import type { BlockSource, ReceivedChunk, SourceCounters } from './source.js';

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
}

/**
 * A block device (or file) on a machine reached over SSH. Ferry pushes its agent, starts one agent per
 * channel on the same connection (run as root through sudo when the user is not root), then deletes the
 * binary at once: the running processes keep it, and nothing is left on the source even if Ferry is killed.
 */
export class SshBlockSource implements BlockSource {
  private readonly wireBaseline: number;

  private constructor(
    private readonly conn: SshConnection,
    readonly device: string,
    private readonly channels: AgentChannel[],
    readonly size: number,
    readonly sectorSize: number,
    readonly blockDevice: boolean,
    private readonly level: number,
  ) {
    this.wireBaseline = conn.bytesReceived;
  }

  static async open(conn: SshConnection, device: string, opts: SshSourceOptions): Promise<SshBlockSource> {
    const where = describeTarget(conn.target, device);
    const dir = await pushAgent(conn, where);
    const channels: AgentChannel[] = [];
    let removed: Promise<unknown> | undefined;
    try {
      const started = await Promise.allSettled(
        Array.from({ length: opts.channels }, async () => {
          const ch = await conn.execChannel(`${shellQuote(`${dir}/ferry-agent`)} ${shellQuote(device)}`, { asRoot: true });
          return AgentChannel.start({ output: ch, input: ch, errors: ch.stderr, where }, opts.limiter);
        }),
      );
      // Every agent runs now: the binary can go, while the first request is under way.
      removed = removeDirectory(conn, dir);
      for (const s of started) if (s.status === 'fulfilled') channels.push(s.value);
      const failed = started.find((s): s is PromiseRejectedResult => s.status === 'rejected');
      if (failed) throw failed.reason;
      const info = await channels[0].info();
      return new SshBlockSource(conn, device, channels, info.size, info.sectorSize, info.blockDevice, opts.level);
    } catch (err) {
      for (const ch of channels) ch.close();
      throw err;
    } finally {
      await (removed ?? removeDirectory(conn, dir));
    }
  }

  get description(): string {
    return describeTarget(this.conn.target, this.device);
  }

  get parallelism(): number {
    return this.channels.length;
  }

  get counters(): SourceCounters {
    return {
      bytesRead: this.channels.reduce((n, ch) => n + ch.bytesRead, 0),
      bytesOnWire: this.conn.bytesReceived - this.wireBaseline,
    };
  }

  read(offset: number, length: number, chunkSize: number, onChunk: (chunk: ReceivedChunk) => Promise<void>): Promise<void> {
    return this.leastBusy().read(offset, length, chunkSize, this.level, onChunk);
  }

  hashes(offset: number, length: number, chunkSize: number): Promise<Buffer> {
    return this.leastBusy().hashes(offset, length, chunkSize);
  }

  allocated(offset: number, length: number): Promise<Array<[number, number]>> {
    return this.leastBusy().segments(offset, length);
  }

  async readBytes(offset: number, length: number): Promise<Buffer> {
    if (length > MAX_CHUNK) throw new RangeError(`readBytes: ${length} bytes is more than one request`);
    const out = Buffer.alloc(length);
    await this.read(offset, length, Math.max(MIN_CHUNK, length), async (c) => {
      c.data?.copy(out, c.offset - offset);
    });
    return out;
  }

  async mountPoints(): Promise<string[]> {
    if (!this.blockDevice) return [];
    // MOUNTPOINTS (all mounts) needs util-linux 2.37; older lsblk only knows MOUNTPOINT.
    for (const column of ['MOUNTPOINTS', 'MOUNTPOINT']) {
      const r = await this.conn.exec(`lsblk -J -o ${column} ${shellQuote(this.device)}`);
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
    for (const ch of this.channels) ch.close();
  }

  private leastBusy(): AgentChannel {
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
