import { createHash, randomUUID } from 'node:crypto';
import { normalize } from 'node:path';
import { ConflictError, JobTypeUnavailableError, NotFoundError } from './errors.js';
import { isRunnable, type RunnableJobHandler } from './handler.js';
import { isTerminal, newJobRecord, type JobRecord, type JobSpec } from './model.js';
import { resolveInDataDir } from './paths.js';
import type { JobQueue } from './queue.js';
import { findJobHandler } from './registry.js';
import { logLine, type JobListQuery, type JobPage, type JobStore } from './store.js';

export interface Submission {
  record: JobRecord;
  /** False when an Idempotency-Key named an existing job, which is returned instead. */
  created: boolean;
}

/** What the API does with jobs, independent of HTTP: submit, read, cancel. */
export class JobService {
  constructor(
    readonly store: JobStore,
    private readonly queue: JobQueue,
    private readonly dataDir: string,
  ) {}

  /** Validates the request (schema already checked), then records and queues it. */
  async submit(spec: JobSpec, idempotencyKey?: string): Promise<Submission> {
    const handler = findJobHandler(spec.type);
    if (!handler) throw new NotFoundError(`unknown job type '${spec.type}'`, { field: 'type' });
    if (!isRunnable(handler)) throw new JobTypeUnavailableError(handler.reason, { field: 'type' });
    const claim = idempotencyKey === undefined ? undefined : { key: idempotencyKey, fingerprint: fingerprint(spec) };
    if (claim) {
      const earlier = await this.store.findByIdempotencyKey(claim.key);
      if (earlier) return this.replay(earlier.record, earlier.fingerprint === claim.fingerprint);
    }
    await handler.check(spec, { resolvePath: (path, field) => resolveInDataDir(this.dataDir, path, field) });
    await this.refuseSharedOutputs(handler, spec);
    const outcome = await this.store.create(newJobRecord(randomUUID(), spec), claim);
    if (!outcome.created) return this.replay(outcome.record, outcome.fingerprintMatches);
    await this.store.appendLog(outcome.record.id, logLine(`submitted ${spec.type} job`));
    await this.queue.enqueue(outcome.record);
    return { record: outcome.record, created: true };
  }

  async get(id: string): Promise<JobRecord> {
    const record = await this.store.get(id);
    if (!record) throw new NotFoundError(`no job ${id}`);
    return record;
  }

  list(query: JobListQuery): Promise<JobPage> {
    return this.store.list(query);
  }

  async log(id: string): Promise<string> {
    await this.get(id);
    return this.store.readLog(id);
  }

  /** Marks the job cancelled, then stops its work; a finished job cannot be cancelled. */
  async cancel(id: string): Promise<JobRecord> {
    const record = await this.get(id);
    const cancelled = isTerminal(record.state) ? undefined : await this.store.update(id, { state: 'cancelled', finishedAt: new Date().toISOString() });
    if (!cancelled) throw new ConflictError(`job ${id} is already ${(await this.get(id)).state}`);
    await this.store.appendLog(id, logLine('cancel requested'));
    await this.queue.cancel(id);
    return cancelled;
  }

  private replay(record: JobRecord, sameRequest: boolean): Submission {
    if (!sameRequest) throw new ConflictError('this Idempotency-Key was already used for a different request', { field: 'Idempotency-Key' });
    return { record, created: false };
  }

  /** Two unfinished jobs writing one file would destroy each other's output (and temporary files). */
  private async refuseSharedOutputs(handler: RunnableJobHandler, spec: JobSpec): Promise<void> {
    const outputs = new Set(handler.stages.flatMap((s) => s.outputs(spec)).map((p) => normalize(p)));
    for (const other of await this.store.unfinished()) {
      const otherHandler = findJobHandler(other.type);
      if (!otherHandler || !isRunnable(otherHandler)) continue;
      const clash = otherHandler.stages.flatMap((s) => s.outputs(other.spec)).find((p) => outputs.has(normalize(p)));
      if (clash) throw new ConflictError(`job ${other.id} (${other.state}) is already writing ${clash}`, { field: 'target.path' });
    }
  }
}

/** A digest of the request that does not depend on key order. */
function fingerprint(value: unknown): string {
  const canonical = (v: unknown): unknown =>
    Array.isArray(v) ? v.map(canonical) : v && typeof v === 'object' ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical((v as Record<string, unknown>)[k])])) : v;
  return createHash('sha256').update(JSON.stringify(canonical(value))).digest('hex');
}
