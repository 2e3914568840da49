import { EventEmitter } from 'node:events';
import { randomUUID } from 'node:crypto';
import type { MigrationReport, MigrationStats } from './types.js';

/** Limits that may change while a migration runs (the job API's PATCH). */
export interface MigrationUpdate {
  maxDowntimeMs?: number;
  maxBandwidth?: number;
}

export interface MigrationEvents {
  /** Live figures, after every round and every statsIntervalMs while sending. */
  stats: [MigrationStats];
  /** The final report, once, whatever the outcome. */
  done: [MigrationReport];
}

/**
 * One migration, as the CLI and the job API drive it: start it, read stats, change limits, force the
 * switchover, abort. Both engines (Ferry's pre-copy, QEMU's native migration) implement it.
 *
 * start() resolves with the report and never rejects: a failure is a report with outcome "failed".
 */
export abstract class MigrationController extends EventEmitter<MigrationEvents> {
  readonly id: string;
  private run?: Promise<MigrationReport>;
  protected abortRequested = false;

  constructor(id?: string) {
    super();
    this.id = id ?? randomUUID();
  }

  start(): Promise<MigrationReport> {
    this.run ??= this.execute().then((report) => {
      this.emit('done', report);
      return report;
    });
    return this.run;
  }

  /** Asks the migration to stop; before the switchover commits, the source keeps (or resumes) running. */
  abort(): void {
    this.abortRequested = true;
  }

  abstract stats(): MigrationStats;
  abstract update(change: MigrationUpdate): void;
  abstract forceComplete(): void;
  protected abstract execute(): Promise<MigrationReport>;
}
