import { EventEmitter } from 'node:events';
import { appendFile, mkdir, readFile, readdir, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { writeFileAtomic } from './atomic-file.js';
import { isTerminal, type JobPatch, type JobRecord } from './model.js';
import type { CreateOutcome, IdempotencyClaim, JobListQuery, JobPage, JobStore } from './store.js';

/** What one job file holds: the record and the idempotency claim that created it, if any. */
interface JobFile {
  record: JobRecord;
  claim?: IdempotencyClaim;
}

interface Entry extends JobFile {
  /** The file is behind the record in memory. */
  dirty: boolean;
  durable: boolean;
  writing?: Promise<void>;
}

/**
 * Job records for the embedded mode: one JSON file per job in `dir`, replaced atomically on every change,
 * and kept in memory for reads. A restart reloads them all, so no record is lost when `serve` stops.
 */
export class FileJobStore implements JobStore {
  private readonly entries = new Map<string, Entry>();
  private readonly byKey = new Map<string, string>();
  private readonly events = new EventEmitter();
  /** Per job, the last append: appends wait for it, so lines land in the order they were written. */
  private readonly logTails = new Map<string, Promise<void>>();

  private constructor(
    private readonly dir: string,
    private readonly logger: Logger,
  ) {
    this.events.setMaxListeners(0);
  }

  static async open(dir: string, logger: Logger): Promise<FileJobStore> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const store = new FileJobStore(dir, logger);
    for (const name of await readdir(dir)) {
      // Leftovers of a write interrupted by a crash; the previous version is intact under the real name.
      if (name.endsWith('.tmp')) await unlink(join(dir, name)).catch(() => undefined);
      if (!name.endsWith('.json')) continue;
      const file = JSON.parse(await readFile(join(dir, name), 'utf8')) as JobFile;
      store.entries.set(file.record.id, { ...file, dirty: false, durable: false });
      if (file.claim) store.byKey.set(file.claim.key, file.record.id);
    }
    return store;
  }

  async create(record: JobRecord, claim?: IdempotencyClaim): Promise<CreateOutcome> {
    // Check and insert with no await in between: two concurrent retries cannot both create a job.
    const existingId = claim && this.byKey.get(claim.key);
    if (existingId) {
      const existing = this.entries.get(existingId)!;
      return { created: false, record: existing.record, fingerprintMatches: existing.claim?.fingerprint === claim.fingerprint };
    }
    this.entries.set(record.id, { record, claim, dirty: false, durable: false });
    if (claim) this.byKey.set(claim.key, record.id);
    await this.persist(record.id, true);
    this.events.emit('change', record);
    return { created: true, record };
  }

  async findByIdempotencyKey(key: string): Promise<{ record: JobRecord; fingerprint: string } | undefined> {
    const entry = this.entries.get(this.byKey.get(key) ?? '');
    return entry?.claim && { record: entry.record, fingerprint: entry.claim.fingerprint };
  }

  async get(id: string): Promise<JobRecord | undefined> {
    return this.entries.get(id)?.record;
  }

  async list(query: JobListQuery): Promise<JobPage> {
    const all = [...this.entries.values()]
      .map((e) => e.record)
      .filter((r) => !query.state || r.state === query.state)
      .sort(newestFirst);
    return { jobs: all.slice(query.offset, query.offset + query.limit), total: all.length };
  }

  async unfinished(): Promise<JobRecord[]> {
    return [...this.entries.values()]
      .map((e) => e.record)
      .filter((r) => !isTerminal(r.state))
      .sort((a, b) => -newestFirst(a, b));
  }

  async update(id: string, patch: JobPatch): Promise<JobRecord | undefined> {
    const entry = this.entries.get(id);
    if (!entry || isTerminal(entry.record.state)) return undefined;
    entry.record = { ...entry.record, ...patch };
    const record = entry.record;
    this.events.emit('change', record);
    // Progress alone is not written: after a restart an unfinished job starts over from zero anyway. It
    // goes to the file with the next change of state.
    if (Object.keys(patch).every((field) => field === 'progress')) {
      entry.dirty = true;
      return record;
    }
    // Neither fsynced nor waited for: readers get the record from memory, and a change lost to a crash
    // (process or power) reads back as an earlier, unfinished state, which the next start re-runs from
    // scratch (outputs are fsynced before their rename). Only the creation, which the client was told about
    // with a 202, must be on disk before the call returns. Changes made while a write runs are coalesced
    // into the next one; close() waits for them all.
    this.persist(id, false).catch((err: unknown) => this.logger.error({ err, jobId: id }, 'job record write failed; the file is behind until the next change'));
    return record;
  }

  appendLog(id: string, line: string): Promise<void> {
    const append = (this.logTails.get(id) ?? Promise.resolve()).catch(() => undefined).then(() => appendFile(join(this.dir, `${id}.log`), line, { mode: 0o600 }));
    this.logTails.set(id, append);
    void append.finally(() => this.logTails.get(id) === append && this.logTails.delete(id)).catch(() => undefined);
    return append;
  }

  async readLog(id: string): Promise<string> {
    return readFile(join(this.dir, `${id}.log`), 'utf8').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return '';
      throw err;
    });
  }

  subscribe(listener: (record: JobRecord) => void): () => void {
    this.events.on('change', listener);
    return () => this.events.off('change', listener);
  }

  async close(): Promise<void> {
    await Promise.all([...this.entries.values()].map((e) => e.writing));
  }

  /** Writes the entry's latest state; changes made while a write is running are written right after it. */
  private persist(id: string, durable: boolean): Promise<void> {
    const entry = this.entries.get(id)!;
    entry.dirty = true;
    entry.durable ||= durable;
    entry.writing ??= (async () => {
      try {
        while (entry.dirty) {
          const snapshot: JobFile = { record: entry.record, claim: entry.claim };
          const fsync = entry.durable;
          entry.dirty = false;
          entry.durable = false;
          await writeFileAtomic(join(this.dir, `${id}.json`), JSON.stringify(snapshot), { durable: fsync, mode: 0o600 });
        }
      } finally {
        entry.writing = undefined;
      }
    })();
    return entry.writing;
  }
}

function newestFirst(a: JobRecord, b: JobRecord): number {
  return a.createdAt === b.createdAt ? (a.id < b.id ? 1 : -1) : a.createdAt < b.createdAt ? 1 : -1;
}
