import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { createLogger } from '../log.js';
import { GuestFsError } from './errors.js';
import { libguestfsEnvironment } from './kvm-probe.js';

const log = createLogger('guestfs');

export interface GuestFsDisk {
  path: string;
  format?: string;
  readonly?: boolean;
}

/**
 * One libguestfs appliance for a whole inspection or injection, driven through a single `guestfish`
 * child over stdin. Starting the appliance costs seconds (more under TCG), so everything a run needs —
 * inspection, file edits, the guest's own initramfs tools — goes through this one session.
 *
 * The protocol: every command is sent prefixed with "-" (guestfish then reports an error and carries on
 * instead of exiting), followed by two sync commands: `echo TOKEN` ends the command's stdout, and a
 * local `lcd` into a path that does not exist ends its stderr (guestfish prints that path in its error).
 * Waiting for both makes the result and the error of each command unambiguous whatever order the two
 * pipes are delivered in.
 */
export class GuestFs {
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly token = `FERRY-SYNC-${randomBytes(6).toString('hex')}`;
  private stdout = '';
  private stderr = '';
  private queue: Promise<unknown> = Promise.resolve();
  private sequence = 0;
  private exited: Error | undefined;
  private wake: (() => void) | undefined;

  private constructor(child: ChildProcessWithoutNullStreams) {
    this.child = child;
    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stdout.on('data', (d: string) => {
      this.stdout += d;
      this.wake?.();
    });
    child.stderr.on('data', (d: string) => {
      this.stderr += d;
      this.wake?.();
    });
    child.on('error', (err) => {
      this.exited = err;
      this.wake?.();
    });
    child.on('close', (code) => {
      this.exited ??= new GuestFsError(`guestfish exited (status ${code}): ${this.stderr.trim().split('\n').pop() ?? ''}`);
      this.wake?.();
    });
  }

  /** Starts the appliance with the given disks attached (in order: /dev/sda, /dev/sdb, …). */
  static async open(disks: GuestFsDisk[]): Promise<GuestFs> {
    const env = { ...process.env, ...(await libguestfsEnvironment()) };
    const child = spawn('guestfish', [], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    const session = new GuestFs(child);
    try {
      for (const d of disks) {
        const opts = [d.format ? `format:${d.format}` : undefined, d.readonly ? 'readonly:true' : undefined].filter((o): o is string => !!o);
        await session.run('add', [d.path, ...opts]);
      }
      // The guest's own initramfs tools run in the appliance: give it the host's cores (TCG runs one thread per vCPU).
      await session.run('set-smp', [String(Math.min(4, Math.max(1, availableParallelism())))]);
      const started = Date.now();
      await session.run('run');
      log.info({ disks: disks.map((d) => d.path), ms: Date.now() - started, backend: env.LIBGUESTFS_BACKEND_SETTINGS ?? 'default' }, 'appliance started');
    } catch (err) {
      await session.close();
      throw err;
    }
    return session;
  }

  /** Runs one guestfish command; resolves with its stdout, rejects with GuestFsError on failure. */
  run(command: string, args: string[] = []): Promise<string> {
    const result = this.queue.then(() => this.exchange(command, args));
    this.queue = result.catch(() => undefined);
    return result;
  }

  /** Runs one command and splits its output into lines (list-returning guestfish calls). */
  async lines(command: string, args: string[] = []): Promise<string[]> {
    const out = await this.run(command, args);
    return out.split('\n').filter((l) => l !== '');
  }

  /** Like run, but a failure yields undefined (for probes such as `is-file` on optional paths). */
  async tryRun(command: string, args: string[] = []): Promise<string | undefined> {
    try {
      return await this.run(command, args);
    } catch (err) {
      if (err instanceof GuestFsError && !this.exited) return undefined;
      throw err;
    }
  }

  async isFile(path: string): Promise<boolean> {
    return (await this.run('is-file', [path, 'followsymlinks:true'])).trim() === 'true';
  }

  async isDir(path: string): Promise<boolean> {
    return (await this.run('is-dir', [path, 'followsymlinks:true'])).trim() === 'true';
  }

  async exists(path: string): Promise<boolean> {
    return (await this.run('exists', [path])).trim() === 'true';
  }

  /** Shuts the appliance down (syncing the disks) and waits for guestfish to exit. */
  async close(): Promise<void> {
    if (this.exited) return;
    await this.queue;
    const closed = new Promise<void>((resolve) => this.child.once('close', () => resolve()));
    this.child.stdin.end('-shutdown\nexit\n');
    await closed;
  }

  private async exchange(command: string, args: string[]): Promise<string> {
    if (this.exited) throw this.exited;
    const n = ++this.sequence;
    const sent = Date.now();
    const outMark = `${this.token}-${n}`;
    const errMark = `/${this.token}-${n}`;
    this.child.stdin.write(`-${command} ${args.map(quote).join(' ')}\necho ${outMark}\n-lcd ${errMark}\n`);
    for (;;) {
      const outAt = this.stdout.indexOf(outMark + '\n');
      const errAt = this.stderr.indexOf(errMark);
      if (outAt >= 0 && errAt >= 0) {
        const output = this.stdout.slice(0, outAt);
        const errors = this.stderr.slice(0, errAt);
        this.stdout = this.stdout.slice(outAt + outMark.length + 1);
        const lineEnd = this.stderr.indexOf('\n', errAt);
        this.stderr = lineEnd >= 0 ? this.stderr.slice(lineEnd + 1) : '';
        const message = errors
          .split('\n')
          .filter((l) => l.trim() !== '')
          .map((l) => l.replace(/^\*stdin\*:\d+: /, '').replace(/^libguestfs: error: /, ''))
          .join('; ');
        log.debug({ command, ms: Date.now() - sent, failed: message !== '' }, 'guestfish command');
        if (message) throw new GuestFsError(`${command}: ${message}`, { field: command });
        return output;
      }
      if (this.exited) throw this.exited;
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
  }
}

/** guestfish argument quoting: double quotes with C escapes, so any byte string survives one line. */
function quote(arg: string): string {
  return '"' + arg.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n').replace(/\t/g, '\\t').replace(/\r/g, '\\r') + '"';
}
