/**
 * A small QMP client (QEMU Machine Protocol: JSON lines over a unix socket): commands matched to their
 * answers by id, events delivered to listeners.
 */
import { EventEmitter } from 'node:events';
import { connect, type Socket } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { MigrationError } from './errors.js';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [] }> {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closed?: Error;

  private constructor(
    private readonly socket: Socket,
    readonly path: string,
  ) {
    super();
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => this.onData(text));
    socket.on('error', (err) => this.shutdown(new MigrationError(`QMP ${path}: ${err.message}`, { cause: err })));
    socket.on('close', () => this.shutdown(new MigrationError(`QMP ${path}: connection closed`)));
  }

  /** Connects (retrying while the socket does not exist yet, up to timeoutMs) and negotiates capabilities. */
  static async connect(path: string, timeoutMs = 10_000): Promise<QmpClient> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once('connect', () => {
            s.off('error', reject);
            resolve(s);
          });
          s.once('error', reject);
        });
        const client = new QmpClient(socket, path);
        await client.greeting();
        await client.execute('qmp_capabilities');
        return client;
      } catch (err) {
        if (performance.now() > deadline) throw new MigrationError(`cannot connect to QMP at ${path}: ${(err as Error).message}`, { cause: err });
        await delay(50);
      }
    }
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closed) return Promise.reject(this.closed);
    const id = String(this.nextId++);
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  /** Resolves with the next event called `name` whose data satisfies `match`. */
  waitEvent(name: string, match: (data: Record<string, unknown>) => boolean = () => true): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (e: QmpEvent) => {
        if (e.event === name && match(e.data ?? {})) {
          this.off('event', onEvent);
          this.off('close', onClose);
          resolve(e);
        }
      };
      const onClose = () => {
        this.off('event', onEvent);
        reject(this.closed);
      };
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  close(): void {
    this.socket.destroy();
  }

  private greetingWaiter?: (err?: Error) => void;

  private greeting(): Promise<void> {
    return new Promise((resolve, reject) => (this.greetingWaiter = (err) => (err ? reject(err) : resolve())));
  }

  private onData(text: string): void {
    this.buffer += text;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line);
      } catch {
        this.shutdown(new MigrationError(`QMP ${this.path}: malformed message`));
        return;
      }
      if ('QMP' in msg) {
        this.greetingWaiter?.();
        this.greetingWaiter = undefined;
      } else if ('event' in msg) {
        this.emit('event', msg as unknown as QmpEvent);
      } else if (typeof msg.id === 'string' && this.pending.has(msg.id)) {
        const p = this.pending.get(msg.id)!;
        this.pending.delete(msg.id);
        if ('error' in msg) {
          const e = msg.error as { class: string; desc: string };
          p.reject(new MigrationError(`QMP ${p.command}: ${e.desc} (${e.class})`));
        } else {
          p.resolve(msg.return);
        }
      }
    }
  }

  private shutdown(err: Error): void {
    if (this.closed) return;
    this.closed = err;
    this.greetingWaiter?.(err);
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.emit('close');
  }
}

/** QEMU's run state ("running", "paused", "inmigrate", "postmigrate", …). */
export async function queryStatus(qmp: QmpClient): Promise<string> {
  return (await qmp.execute<{ status: string }>('query-status')).status;
}

export async function setMigrationCapabilities(qmp: QmpClient, capabilities: Record<string, boolean>): Promise<void> {
  await qmp.execute('migrate-set-capabilities', { capabilities: Object.entries(capabilities).map(([capability, state]) => ({ capability, state })) });
}

/** query-migrate's answer, the fields Ferry reads. */
export interface QemuMigrationInfo {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'expected-downtime'?: number;
  'error-desc'?: string;
  ram?: {
    transferred: number;
    remaining: number;
    total: number;
    'dirty-pages-rate': number;
    'dirty-sync-count': number;
    mbps: number;
    'page-size': number;
  };
  'cpu-throttle-percentage'?: number;
}

/** Polls query-migrate until the status is one of `statuses`. */
export async function waitMigrationStatus(qmp: QmpClient, statuses: string[], timeoutMs: number, pollMs = 20): Promise<QemuMigrationInfo> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute<QemuMigrationInfo>('query-migrate');
    if (info.status && statuses.includes(info.status)) return info;
    if (performance.now() > deadline) throw new MigrationError(`QEMU migration still '${info.status ?? 'none'}' after ${timeoutMs} ms`);
    await delay(pollMs);
  }
}

/**
 * Starts watching for the end of a migration (a MIGRATION event with status completed, failed or cancelled,
 * which QEMU sends with the `events` capability). Call it before the migration starts, so the event cannot
 * be missed; the returned function waits for it, at most timeoutMs from its call, and gives query-migrate's
 * answer for a failure (its error-desc).
 */
export function watchMigrationEnd(qmp: QmpClient): (timeoutMs: number) => Promise<QemuMigrationInfo> {
  const ended = qmp.waitEvent('MIGRATION', (d) => ['completed', 'failed', 'cancelled'].includes(String(d.status)));
  ended.catch(() => undefined); // awaited by the caller, or never if the migration is given up first
  return async (timeoutMs) => {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new MigrationError(`QEMU migration did not end within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      const event = await Promise.race([ended, timeout]);
      const status = String(event.data?.status);
      return status === 'completed' ? { status } : await qmp.execute<QemuMigrationInfo>('query-migrate');
    } finally {
      clearTimeout(timer);
    }
  };
}
