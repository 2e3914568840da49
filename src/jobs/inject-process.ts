/**
 * One driver injection in a process of its own, started by the inject stage of a P2V job. libguestfs runs
 * minutes of work in its appliance that no signal inside this library can stop; a process group of its own
 * can be killed whole (this process, guestfish, QEMU) when the job is cancelled.
 */
import type { InjectionReport } from '../drivers/types.js';
import { FerryError } from '../errors.js';

export interface InjectionRequest {
  image: string;
  target: string;
  driversPath?: string;
  /** Inspect first and skip the image when it holds no operating system (the data disks of a machine). */
  skipWithoutOs: boolean;
}

export type InjectionReply =
  | { kind: 'injected'; report: InjectionReport; changes: string[] }
  | { kind: 'skipped'; reason: string }
  | { kind: 'error'; error: { code?: string; typed: boolean; message: string } };

async function inject(request: InjectionRequest): Promise<InjectionReply> {
  const { describeChange, injectDrivers, inspectImage } = await import('../drivers/index.js');
  if (request.skipWithoutOs && !(await inspectImage(request.image)).os) return { kind: 'skipped', reason: 'no operating system found on the disk' };
  const report = await injectDrivers(request.image, { target: request.target, driversPath: request.driversPath });
  return { kind: 'injected', report, changes: report.changes.map(describeChange) };
}

let replied = false;
// The worker that started this is gone (killed, crashed): nobody waits for the result, so the group stops.
process.once('disconnect', () => {
  if (!replied) process.kill(-process.pid, 'SIGKILL');
});

// The request comes as an argument: a message sent to an ES module child right after fork() can arrive
// before its listener exists and be lost (nodejs/node#34785). The channel only carries the reply.
void inject(JSON.parse(process.argv[2]!) as InjectionRequest)
  .catch((err: unknown): InjectionReply => {
    const typed = err instanceof FerryError;
    const code = typed ? err.code : (err as NodeJS.ErrnoException)?.code;
    return { kind: 'error', error: { code, typed, message: typed ? err.describe() : err instanceof Error ? err.message : String(err) } };
  })
  .then((reply) => {
    replied = true;
    process.send!(reply, () => process.disconnect());
  });
