import { lstat } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import type { Logger } from 'pino';
import { InvalidOptionError } from '../errors.js';
import { NotFoundError } from '../jobs/errors.js';
import type { MigrationController, MigrationReport, MigrationStats } from '../live/index.js';

export interface MigrationRequest {
  engine?: 'ferry' | 'qemu';
  source: { qmpSocket: string; ramPath: string };
  to: { host: string; port: number };
  maxDowntimeMs?: number;
  maxBandwidth?: number;
  autoConverge?: boolean;
}

export interface MigrationView {
  id: string;
  state: 'running' | 'completed' | 'failed' | 'cancelled';
  createdAt: string;
  stats: MigrationStats;
  report?: MigrationReport;
}

interface Entry {
  controller: MigrationController;
  createdAt: string;
  report?: MigrationReport;
}

/**
 * The migrations this service runs. A migration belongs to the host where its source VM runs, so it is
 * not queued to workers elsewhere: `serve` on that host drives it in process. Records live in memory;
 * a restart of `serve` ends its migrations the safe way (the source keeps running).
 */
export class MigrationRegistry {
  private readonly entries = new Map<string, Entry>();

  constructor(private readonly log: Logger) {}

  async start(req: MigrationRequest): Promise<MigrationView> {
    // Host paths, on purpose: QMP sockets and RAM files live outside any data dir. Only sockets and files.
    for (const [field, path, kind] of [
      ['source.qmpSocket', req.source.qmpSocket, 'socket'],
      ['source.ramPath', req.source.ramPath, 'file'],
    ] as const) {
      if (!isAbsolute(path)) throw new InvalidOptionError(`${field} must be an absolute path`, { field });
      const st = await lstat(path).catch(() => undefined);
      if (!st || (kind === 'socket' ? !st.isSocket() : !st.isFile())) throw new InvalidOptionError(`${field} '${path}' is not a ${kind}`, { field });
    }
    const { startMigration } = await import('../live/index.js');
    const controller = await startMigration({
      engine: req.engine,
      source: { kind: 'qemu-shared-file', qmpSocket: req.source.qmpSocket, ramPath: req.source.ramPath },
      to: req.to,
      limits: {
        ...(req.maxDowntimeMs !== undefined && { maxDowntimeMs: req.maxDowntimeMs }),
        ...(req.maxBandwidth !== undefined && { maxBandwidth: req.maxBandwidth }),
        ...(req.autoConverge !== undefined && { autoConverge: req.autoConverge }),
      },
      log: this.log,
    });
    const entry: Entry = { controller, createdAt: new Date().toISOString() };
    this.entries.set(controller.id, entry);
    void controller.start().then((report) => {
      entry.report = report;
      this.log.info({ migration: controller.id, outcome: report.outcome, downtimeMs: report.downtimeMs }, 'migration finished');
    });
    return this.view(controller.id);
  }

  list(): MigrationView[] {
    return [...this.entries.keys()].map((id) => this.view(id));
  }

  view(id: string): MigrationView {
    const entry = this.get(id);
    const outcome = entry.report?.outcome;
    const state = !outcome ? 'running' : outcome === 'completed' ? 'completed' : outcome === 'cancelled' ? 'cancelled' : 'failed';
    return { id, state, createdAt: entry.createdAt, stats: entry.controller.stats(), ...(entry.report && { report: entry.report }) };
  }

  update(id: string, change: { maxDowntimeMs?: number; maxBandwidth?: number }): MigrationView {
    this.get(id).controller.update(change);
    return this.view(id);
  }

  forceComplete(id: string): MigrationView {
    this.get(id).controller.forceComplete();
    return this.view(id);
  }

  abort(id: string): MigrationView {
    this.get(id).controller.abort();
    return this.view(id);
  }

  /** Stops every running migration (service shutdown): each ends with its source running. */
  async close(): Promise<void> {
    const running = [...this.entries.values()].filter((e) => !e.report);
    for (const e of running) e.controller.abort();
    await Promise.all(running.map((e) => e.controller.start()));
  }

  private get(id: string): Entry {
    const entry = this.entries.get(id);
    if (!entry) throw new NotFoundError(`no migration ${id}`);
    return entry;
  }
}
