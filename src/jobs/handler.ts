import type { TSchema } from 'typebox';
import type { CredentialVault } from './credentials.js';
import type { JobProgress, JobSpec } from './model.js';

/** Abort reasons a queue gives a running stage's signal: a cancelled job is over, a shut-down one runs again. */
export const ABORT_CANCEL = 'ferry:cancel';
export const ABORT_SHUTDOWN = 'ferry:shutdown';

/** The one thing a stage may do with stored credentials: read a secret to log in with. */
export type CredentialReader = Pick<CredentialVault, 'reveal'>;

/** What a stage gets to do its work. */
export interface StageContext<Spec extends JobSpec> {
  spec: Spec;
  /** The previous stage's result (undefined for the first stage). */
  previous: unknown;
  /** Resolves a job path (relative to the data dir) to an absolute one, refusing escapes, symlinks included. */
  resolvePath(path: string, field: string): Promise<string>;
  /**
   * Aborted on cancellation (DELETE, reason ABORT_CANCEL) and on worker shutdown (ABORT_SHUTDOWN); the stage
   * must stop and remove partial output. On shutdown it may keep what lets the next attempt resume.
   */
  signal: AbortSignal;
  /**
   * The secrets of stored credentials (capture logs in with them), from the worker's own vault: the data
   * dir's key or FERRY_SECRET_KEY. A secret goes to the connection only, never to a log, a record or a result.
   */
  credentials: CredentialReader;
  progress(p: JobProgress): void;
  log(message: string): void;
}

/** One step of a job; a job of several stages runs them in order, each on whichever worker is free. */
export interface JobStage<Spec extends JobSpec> {
  name: string;
  /**
   * Files the stage writes, relative to the data dir. Before each attempt their temporary siblings are
   * removed (a worker killed mid-write leaves one), and no two unfinished jobs may share an output.
   */
  outputs(spec: Spec): string[];
  /** Whether a request needs this stage (default: every request); a stage it does not need is never queued. */
  appliesTo?(spec: Spec): boolean;
  run(ctx: StageContext<Spec>): Promise<unknown>;
}

/** A job type that runs here: its request schema, its checks and its stages. */
export interface RunnableJobHandler<Spec extends JobSpec = JobSpec> {
  type: string;
  summary: string;
  /** The request body for this type, `type` included; `additionalProperties: false` throughout. */
  schema: TSchema;
  /** Checks a request can run before it is queued (formats, options, sources): throws a typed error. */
  check(spec: Spec, ctx: { resolvePath(path: string, field: string): Promise<string> }): Promise<void>;
  stages: Array<JobStage<Spec>>;
}

/**
 * A job type whose request is defined (so clients and the OpenAPI document can rely on it) but whose
 * runner is not part of this build: submitting one is refused with 501 and `reason`.
 */
export interface UnavailableJobHandler {
  type: string;
  summary: string;
  schema: TSchema;
  stageNames: string[];
  reason: string;
}

export type JobHandler = RunnableJobHandler | UnavailableJobHandler;

export function isRunnable(handler: JobHandler): handler is RunnableJobHandler {
  return 'stages' in handler;
}

/** The indexes in `handler.stages` of the stages this request runs, in order. */
export function plannedStages(handler: RunnableJobHandler, spec: JobSpec): number[] {
  return handler.stages.flatMap((stage, index) => (stage.appliesTo?.(spec) ?? true ? [index] : []));
}
