import { isRunnable, type JobHandler, type RunnableJobHandler } from './handler.js';
import { captureJob } from './types/capture.js';
import { convertJob } from './types/convert.js';

/** Every job type: adding one is a file in types/ and a line here. */
export const jobHandlers: readonly JobHandler[] = [convertJob, captureJob];

export function findJobHandler(type: string): JobHandler | undefined {
  return jobHandlers.find((h) => h.type === type);
}

/** The handler for a type that was accepted at submission; its absence now is a deployment mismatch. */
export function runnableHandler(type: string): RunnableJobHandler {
  const handler = findJobHandler(type);
  if (!handler || !isRunnable(handler)) throw new Error(`this worker cannot run ${type} jobs (it does not have that job type)`);
  return handler;
}

/** The stages some runnable job type has: what a worker of this build can take from the queues. */
export function runnableStageNames(): string[] {
  return [...new Set(jobHandlers.filter(isRunnable).flatMap((h) => h.stages.map((s) => s.name)))];
}
