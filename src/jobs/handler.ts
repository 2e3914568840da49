import type { TSchema } from 'typebox';
import type { JobProgress, JobSpec } from './model.js';

/** What a stage gets to do its work. */
export interface StageContext<Spec extends JobSpec> {
  spec: Spec;
  /** The previous stage's result (undefined for the first stage). */
  previous: unknown;
  /** Resolves a job path (relative to the data dir) to an absolute one, refusing escapes, symlinks included. */
  resolvePath(path: string, field: string): Promise<string>;
  /** Aborted on cancellation (DELETE) and on worker shutdown; the stage must stop and remove partial output. */
  signal: AbortSignal;
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
