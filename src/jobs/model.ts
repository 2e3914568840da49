/** The job record: what the API returns and what every store persists. */

export const JOB_STATES = ['queued', 'running', 'completed', 'failed', 'cancelled'] as const;
export type JobState = (typeof JOB_STATES)[number];

/** A finished job never changes again; stores refuse updates to it. */
export function isTerminal(state: JobState): boolean {
  return state === 'completed' || state === 'failed' || state === 'cancelled';
}

export interface JobProgress {
  done: number;
  total: number;
}

export interface JobFailure {
  /** The error's code, e.g. CORRUPT_IMAGE, or the Node error code for system errors. */
  type: string;
  message: string;
}

export interface JobRecord {
  id: string;
  type: string;
  state: JobState;
  /** The stage running or last run: convert; P2V: capture, or capture → convert → inject with driver injection. */
  stage: string | null;
  progress: JobProgress;
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
  error: JobFailure | null;
  result: unknown;
  /** Attempts started, stalls and service restarts included. */
  attempts: number;
  /** host:pid of the process running (or that last ran) the job. */
  worker: string | null;
  /** The request as submitted (validated; credentials are references, never secrets). */
  spec: JobSpec;
}

/** A job request: its type selects the handler, the rest is that handler's schema. */
export interface JobSpec {
  type: string;
  [field: string]: unknown;
}

/** Fields a running job may change. */
export type JobPatch = Partial<Pick<JobRecord, 'state' | 'stage' | 'progress' | 'startedAt' | 'finishedAt' | 'error' | 'result' | 'attempts' | 'worker'>>;

export function newJobRecord(id: string, spec: JobSpec, now = new Date()): JobRecord {
  return {
    id,
    type: spec.type,
    state: 'queued',
    stage: null,
    progress: { done: 0, total: 0 },
    createdAt: now.toISOString(),
    startedAt: null,
    finishedAt: null,
    error: null,
    result: null,
    attempts: 0,
    worker: null,
    spec,
  };
}
