import type { JobPatch, JobRecord, JobState } from './model.js';

export interface JobListQuery {
  state?: JobState;
  /** Newest first. */
  offset: number;
  limit: number;
}

export interface JobPage {
  jobs: JobRecord[];
  total: number;
}

/** Ties a retried POST to the job it created: same key and same request → same job. */
export interface IdempotencyClaim {
  key: string;
  /** Digest of the request body, so a key reused for a different request is detected. */
  fingerprint: string;
}

export type CreateOutcome =
  | { created: true; record: JobRecord }
  | { created: false; record: JobRecord; fingerprintMatches: boolean };

/**
 * Where job records and job logs live: the API reads them, workers write them. Every change is
 * published to subscribers, in this process and (for shared stores) in every other process.
 */
export interface JobStore {
  /** Creates the record, unless the idempotency key already names a job: then returns that one. */
  create(record: JobRecord, claim?: IdempotencyClaim): Promise<CreateOutcome>;
  /** The job an idempotency key created, with the fingerprint of the request that created it. */
  findByIdempotencyKey(key: string): Promise<{ record: JobRecord; fingerprint: string } | undefined>;
  get(id: string): Promise<JobRecord | undefined>;
  list(query: JobListQuery): Promise<JobPage>;
  /** Jobs not yet finished, oldest first. */
  unfinished(): Promise<JobRecord[]>;
  /**
   * Applies the patch and returns the new record. A finished record (completed, failed, cancelled) is
   * final: the patch is refused and `undefined` returned, so a late worker cannot resurrect a cancelled job.
   */
  update(id: string, patch: JobPatch): Promise<JobRecord | undefined>;
  appendLog(id: string, line: string): Promise<void>;
  readLog(id: string): Promise<string>;
  /** Calls `listener` with every record after it changes; returns the unsubscribe function. */
  subscribe(listener: (record: JobRecord) => void): () => void;
  close(): Promise<void>;
}

/** One log line: ISO time, then the message. */
export function logLine(message: string, now = new Date()): string {
  return `${now.toISOString()} ${message}\n`;
}
