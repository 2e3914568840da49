/**
 * `--engine qemu`: QEMU's own RAM migration (for VMs without a shared memory backend), driven over QMP with
 * Ferry's policy and monitoring. QEMU sends the memory source QEMU → destination QEMU directly and decides
 * the switchover itself against downtime-limit; Ferry sets the rate each round (max-bandwidth, raised above
 * the dirty rate as in its own engine), gives up at the round and 3×RAM caps (migrate_cancel: the source
 * never stopped), forces completion by lifting downtime-limit, turns on QEMU's auto-converge when asked,
 * and resumes the destination (started with -S) only after the source QEMU reported completion.
 * No memory digest is compared in this mode: QEMU's stream is QEMU's.
 */
import { setTimeout as delay } from 'node:timers/promises';
import type { Logger } from 'pino';
import { CancelledError, errorMessage } from '../errors.js';
import { MigrationController, type MigrationUpdate } from './controller.js';
import { HandoverInDoubtError, MigrationError, MigrationNotConvergingError } from './errors.js';
import { MigrationPolicy, type MigrationLimits } from './policy.js';
import { FrameChannel, MessageType } from './protocol.js';
import { queryStatus, setMigrationCapabilities, type QemuMigrationInfo, type QmpClient } from './qmp.js';
import type { MigrationReport, MigrationState, MigrationStats } from './types.js';

/** QEMU's largest downtime-limit (2000 s), used to force completion. */
const FORCE_DOWNTIME_MS = 2_000_000;
/** QEMU's max-bandwidth when Ferry sets no limit: far beyond any link. */
const UNLIMITED_BANDWIDTH = 2 ** 40;
const POLL_MS = 100;

export interface QemuNativeOptions {
  id?: string;
  qmp: QmpClient;
  /** The control connection to `ferry migrate-listen`, after NATIVE_READY. The migration closes it. */
  control: FrameChannel;
  /** Where the destination QEMU listens. */
  host: string;
  port: number;
  limits?: Partial<MigrationLimits>;
  log?: Logger;
}

export class QemuNativeMigration extends MigrationController {
  private readonly policy: MigrationPolicy;
  private state: MigrationState = 'setup';
  private info: QemuMigrationInfo = {};
  private round = 0;
  private startedAt = 0;
  private pendingChange?: MigrationUpdate;
  private forceSent = false;

  constructor(private readonly options: QemuNativeOptions) {
    super(options.id);
    this.policy = new MigrationPolicy(options.limits);
  }

  update(change: MigrationUpdate): void {
    this.policy.update(change);
    this.pendingChange = { ...this.pendingChange, ...change };
  }

  forceComplete(): void {
    this.policy.forceComplete();
  }

  stats(): MigrationStats {
    const ram = this.info.ram;
    const limits = this.policy.current;
    const pageSize = ram?.['page-size'] || 4096;
    return {
      id: this.id,
      engine: 'qemu',
      state: this.state,
      round: this.round,
      ramBytes: ram?.total ?? 0,
      pageSize,
      elapsedMs: this.startedAt ? performance.now() - this.startedAt : 0,
      transferredBytes: ram?.transferred ?? 0,
      remainingBytes: ram?.remaining ?? 0,
      dirtyRate: (ram?.['dirty-pages-rate'] ?? 0) * pageSize,
      bandwidth: ((ram?.mbps ?? 0) * 1e6) / 8,
      rateLimit: this.policy.currentRate,
      expectedDowntimeMs: this.info['expected-downtime'] ?? Infinity,
      throttle: (this.info['cpu-throttle-percentage'] ?? 0) / 100,
      maxDowntimeMs: limits.maxDowntimeMs,
      maxBandwidth: limits.maxBandwidth,
      pages: { sent: 0, zero: 0, delta: 0, compressed: 0, raw: 0 },
    };
  }

  protected async execute(): Promise<MigrationReport> {
    const { qmp, control, log } = this.options;
    this.startedAt = performance.now();
    const limits = this.policy.current;
    let completedAt = 0;
    let commitSent = false;
    const report = (outcome: MigrationReport['outcome'], extra: Partial<MigrationReport>): MigrationReport => ({
      id: this.id,
      engine: 'qemu',
      outcome,
      totalMs: performance.now() - this.startedAt,
      downtimeMs: 0,
      transferredBytes: this.info.ram?.transferred ?? 0,
      ramBytes: this.info.ram?.total ?? 0,
      rounds: this.round,
      memoryVerified: false,
      verification: 'sent-pages',
      forced: this.forceSent,
      pages: this.stats().pages,
      sourceRunning: true,
      ...extra,
    });
    const completion = new Promise<void>((resolve) =>
      qmp.on('event', (e) => {
        if (e.event === 'MIGRATION' && ['completed', 'failed', 'cancelled'].includes(String(e.data?.status))) resolve();
      }),
    );
    try {
      await setMigrationCapabilities(qmp, { events: true, 'auto-converge': limits.autoConverge });
      await this.setParameters({ maxBandwidth: this.policy.currentRate, maxDowntimeMs: limits.maxDowntimeMs });
      await qmp.execute('migrate', { uri: `tcp:${this.options.host}:${this.options.port}` });
      this.state = 'active';
      let lastSync = 0;
      let lastSyncAt = performance.now();
      let lastTransferred = 0;
      for (;;) {
        await Promise.race([delay(POLL_MS), completion]);
        this.info = await qmp.execute<QemuMigrationInfo>('query-migrate');
        const status = this.info.status;
        if (status === 'completed') {
          completedAt = performance.now();
          break;
        }
        if (status === 'failed' || status === 'cancelled') {
          throw new MigrationError(`QEMU migration ${status}${this.info['error-desc'] ? `: ${this.info['error-desc']}` : ''}`);
        }
        if (this.abortRequested) {
          await qmp.execute('migrate_cancel');
          throw new CancelledError('migration aborted');
        }
        if (this.pendingChange) {
          await this.setParameters(this.pendingChange);
          this.pendingChange = undefined;
        }
        if (this.policy.forceRequested && !this.forceSent) {
          this.forceSent = true;
          await this.setParameters({ maxDowntimeMs: FORCE_DOWNTIME_MS });
        }
        const ram = this.info.ram;
        if (!ram || ram['dirty-sync-count'] <= lastSync) continue;
        // A new dirty-bitmap sync is QEMU's round boundary: decide as Ferry's engine does.
        const now = performance.now();
        const pageSize = ram['page-size'] || 4096;
        lastSync = ram['dirty-sync-count'];
        this.round = lastSync;
        const roundSeconds = Math.max(1e-3, (now - lastSyncAt) / 1000);
        const decision = this.policy.decide({
          round: this.round,
          ramBytes: ram.total,
          pageSize,
          dirtyRate: ram['dirty-pages-rate'] * pageSize,
          remainingPages: ram.remaining / pageSize,
          wireBytesPerPage: pageSize + 8,
          roundWireBytes: ram.transferred - lastTransferred,
          roundSeconds,
          busySeconds: roundSeconds,
          rate: this.policy.currentRate,
          totalWireBytes: ram.transferred,
          collectSeconds: 0,
          switchoverOverheadSeconds: 0,
        });
        lastSyncAt = now;
        lastTransferred = ram.transferred;
        this.emit('stats', this.stats());
        log?.info({ round: this.round, decision }, 'QEMU round');
        if (decision.action === 'give-up') {
          await qmp.execute('migrate_cancel');
          throw new MigrationNotConvergingError(decision.reason);
        }
        if (decision.action === 'continue') await this.setParameters({ maxBandwidth: decision.rate });
      }
      this.state = 'switchover';
      // The source QEMU is now stopped ('postmigrate'); the destination runs only on our word.
      await control.send(MessageType.Commit);
      commitSent = true;
      try {
        await control.expect(MessageType.Resumed);
      } catch (err) {
        throw new HandoverInDoubtError(`the destination did not confirm that it resumed (${errorMessage(err)}); the source stays paused`, { cause: err });
      }
      const resumedAt = performance.now();
      this.state = 'completed';
      const done = report('completed', { downtimeMs: (this.info.downtime ?? 0) + (resumedAt - completedAt), sourceRunning: false });
      this.emit('stats', this.stats());
      return done;
    } catch (err) {
      const cancelled = this.abortRequested && !commitSent;
      this.state = cancelled ? 'cancelled' : 'failed';
      if (!control.failed) await control.sendJson(MessageType.Abort, { reason: errorMessage(err) }).catch(() => undefined);
      // QEMU resumes a source it stopped for a failed completion only if it was running before; make sure.
      // Until the commit went out the destination cannot run, so the source may (and must) run again.
      let sourceRunning = false;
      if (!commitSent) {
        const status = await queryStatus(qmp).catch(() => 'unknown');
        sourceRunning = status === 'running' || (await qmp.execute('cont').then(() => true, () => false));
      }
      return report(cancelled ? 'cancelled' : 'failed', { reason: errorMessage(err), sourceRunning });
    } finally {
      control.close();
    }
  }

  private async setParameters(change: MigrationUpdate): Promise<void> {
    const args: Record<string, number> = {};
    if (change.maxBandwidth !== undefined) args['max-bandwidth'] = Math.round(Math.min(change.maxBandwidth, UNLIMITED_BANDWIDTH));
    if (change.maxDowntimeMs !== undefined) args['downtime-limit'] = Math.round(change.maxDowntimeMs);
    if (Object.keys(args).length) await this.options.qmp.execute('migrate-set-parameters', args);
  }
}
