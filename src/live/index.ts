/**
 * Live migration, the programmatic interface (the CLI and the job API use this, nothing deeper):
 *
 *   const migration = await startMigration({ engine: 'ferry', source: { kind: 'qemu-shared-file', qmpSocket, ramPath },
 *                                           to: { host, port }, limits: { maxDowntimeMs: 300 } });
 *   migration.on('stats', (s) => …);                  // MigrationStats
 *   migration.update({ maxDowntimeMs, maxBandwidth }); // PATCH
 *   migration.forceComplete();                         // POST …:force-complete
 *   migration.abort();                                 // DELETE
 *   const report = await migration.start();            // MigrationReport; never rejects once started
 *
 *   const listener = await listenForMigration({ host, port, destination: { kind: 'qemu-shared-file', qmpSocket, ramPath } });
 *   const incoming = await listener.result;            // resumed or discarded
 */
import { randomUUID } from 'node:crypto';
import { connect } from 'node:net';
import type { Logger } from 'pino';
import { openDestination, openSource, type DestinationSpec, type SourceSpec } from './backends/registry.js';
import { QemuSharedFileDestination } from './backends/qemu-shared-file.js';
import type { MigrationController } from './controller.js';
import { FerryMigration } from './engine.js';
import { MigrationError } from './errors.js';
import { MigrationListener } from './listener.js';
import type { MigrationLimits } from './policy.js';
import { FrameChannel, MessageType, PROTOCOL_VERSION, parseJson, type HelloMessage } from './protocol.js';
import { QemuNativeMigration } from './qemu-native.js';
import { QmpClient } from './qmp.js';
import { NetworkSender, withTimeout } from './sender.js';

export type { MigrationController, MigrationUpdate } from './controller.js';
export type { MigrationStats, MigrationReport, MigrationState } from './types.js';
export type { MigrationLimits } from './policy.js';
export type { IncomingReport } from './listener.js';
export { MigrationListener } from './listener.js';
export { DEFAULT_LIMITS } from './policy.js';

export interface StartMigrationOptions {
  id?: string;
  /** "ferry": Ferry's pre-copy engine (shared RAM file); "qemu": QEMU's own migration under Ferry's policy. */
  engine?: 'ferry' | 'qemu';
  source: SourceSpec;
  to: { host: string; port: number };
  limits?: Partial<MigrationLimits>;
  /** Parallel page streams (Ferry engine). */
  streams?: number;
  log?: Logger;
}

/**
 * Connects to the destination's listener and prepares a migration; call start() on the result to run it.
 * Setup failures (no listener, wrong memory size, QEMU not configured for it) reject here, before anything
 * has touched the source.
 */
export async function startMigration(options: StartMigrationOptions): Promise<MigrationController> {
  if ((options.engine ?? 'ferry') === 'qemu') {
    if (options.source.kind !== 'qemu-shared-file') throw new MigrationError('the qemu engine migrates QEMU VMs only');
    return startQemuNative(options, options.source.qmpSocket);
  }
  const backend = await openSource(options.source);
  try {
    const transport = await NetworkSender.connect({ host: options.to.host, port: options.to.port, backend, streams: options.streams });
    const migration = new FerryMigration({ id: options.id, backend, transport, limits: options.limits, log: options.log });
    migration.once('done', () => void backend.close());
    return migration;
  } catch (err) {
    await backend.close();
    throw err;
  }
}

async function startQemuNative(options: StartMigrationOptions, qmpSocket: string): Promise<MigrationController> {
  const qmp = await QmpClient.connect(qmpSocket);
  const { host, port } = options.to;
  try {
    const socket = connect({ host, port });
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', (e) => reject(new MigrationError(`cannot connect to ${host}:${port}: ${e.message}`))));
    const control = new FrameChannel(socket, `destination ${host}:${port}`);
    const hello: HelloMessage = { protocol: PROTOCOL_VERSION, session: randomUUID(), mode: 'qemu', pageSize: 4096, pageCount: 0, streams: 0 };
    await control.sendJson(MessageType.Hello, hello);
    await withTimeout(control.expect(MessageType.Welcome), 30_000, 'the destination did not answer');
    await control.send(MessageType.NativeIncoming);
    const ready = parseJson<{ port: number }>((await withTimeout(control.expect(MessageType.NativeReady), 30_000, 'the destination QEMU did not open')).payload);
    const migration = new QemuNativeMigration({ id: options.id, qmp, control, host, port: ready.port, limits: options.limits, log: options.log });
    migration.once('done', () => qmp.close());
    return migration;
  } catch (err) {
    qmp.close();
    throw err;
  }
}

export interface ListenOptions {
  host: string;
  port: number;
  destination: DestinationSpec;
  log?: Logger;
}

/** Listens for one incoming migration into the destination VM (either engine). */
export async function listenForMigration(options: ListenOptions): Promise<MigrationListener> {
  const destination = await openDestination(options.destination);
  const nativeIncoming = destination instanceof QemuSharedFileDestination ? destination : undefined;
  return MigrationListener.listen({ host: options.host, port: options.port, destination, nativeIncoming, log: options.log });
}
