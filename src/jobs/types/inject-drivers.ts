import { fork, type ChildProcess } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { GuestNotFixableError, InjectionError } from '../../drivers/errors.js';
import type { InjectionReport } from '../../drivers/types.js';
import { CancelledError, FerryError } from '../../errors.js';
import { PACKAGE_ROOT } from '../../paths.js';
import { isPermanent } from '../errors.js';
import { ABORT_SHUTDOWN, type StageContext } from '../handler.js';
import type { InjectionReply, InjectionRequest } from '../inject-process.js';
import type { CaptureJob, CaptureJobResult } from './capture.js';

/** The injection process's entry, as tsc builds it (the bundle has no entry of its own for it). */
const INJECTION_PROCESS = join(PACKAGE_ROOT, 'dist', 'jobs', 'inject-process.js');

/** What one image got: the report of `ferry inject` (paths relative to the data dir), or why it was left alone. */
export type ImageInjection = { path: string; skipped: string } | ({ path: string } & Omit<InjectionReport, 'image'>);

export interface InjectedCaptureResult extends CaptureJobResult {
  injection: { target: string; images: ImageInjection[] };
}

/** A typed error raised in the injection process, with the code it had there (GUEST_NOT_FIXABLE, GUESTFS_FAILED, …). */
class InjectionProcessError extends FerryError {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * The inject stage of a P2V flow: the target's drivers into each converted image, as `ferry inject` does,
 * each in a process of its own that a cancellation kills. With several disks, the ones without an operating
 * system are skipped; none with one fails the job. An image that could not be made bootable is removed, like
 * the output of `ferry convert --inject`: a guest half fixed would be a trap.
 */
export async function injectIntoCaptures(ctx: StageContext<CaptureJob>): Promise<InjectedCaptureResult> {
  const { spec, resolvePath, signal, log, progress } = ctx;
  const converted = ctx.previous as CaptureJobResult;
  const request = spec.injectDrivers!;
  const driversPath = request.drivers === undefined ? undefined : await resolvePath(request.drivers, 'injectDrivers.drivers');
  const total = converted.images.reduce((sum, image) => sum + image.size, 0);
  const injected: ImageInjection[] = [];
  let done = 0;
  progress({ done, total });
  try {
    for (const image of converted.images) {
      log(`injecting ${request.target} drivers into ${image.path}`);
      const reply = await runInjection(
        { image: await resolvePath(image.path, 'target.path'), target: request.target, driversPath, skipWithoutOs: converted.images.length > 1 },
        signal,
      );
      if (reply.kind === 'skipped') {
        log(`${image.path}: ${reply.reason}; left as it is`);
        injected.push({ path: image.path, skipped: reply.reason });
      } else {
        injected.push(relativeReport(image.path, reply.report));
        describeInjection(reply.report, reply.changes, image.path).forEach((line) => log(line));
        const failed = reply.report.verification.filter((v) => !v.ok);
        if (failed.length) throw new InjectionError(`driver injection did not verify: ${failed.map((v) => `${v.check}: ${v.detail}`).join('; ')}`, { file: image.path });
      }
      done += image.size;
      progress({ done, total });
    }
    if (!injected.some((i) => !('skipped' in i))) throw new GuestNotFixableError('no operating system found on any captured disk');
    return { ...converted, injection: { target: request.target, images: injected } };
  } catch (err) {
    // A retry (transient failure) or a restart after a shutdown needs the images; a job that ends here does not.
    if ((signal.aborted && signal.reason !== ABORT_SHUTDOWN) || (!signal.aborted && isPermanent(err))) {
      for (const image of converted.images) {
        const path = await resolvePath(image.path, 'target.path');
        await rm(path, { force: true });
        await rm(`${path}.ferry-inject.json`, { force: true });
      }
      if (converted.machineFile) await rm(await resolvePath(converted.machineFile, 'target.path'), { force: true });
      log(`removed ${converted.images.map((i) => i.path).join(', ')}: not made bootable on ${request.target}`);
    }
    throw err;
  }
}

/** Runs one injection in its own process group and kills the group (guestfish and QEMU with it) on abort. */
function runInjection(request: InjectionRequest, signal: AbortSignal): Promise<Extract<InjectionReply, { kind: 'injected' | 'skipped' }>> {
  signal.throwIfAborted();
  return new Promise((resolve, reject) => {
    const child: ChildProcess = fork(INJECTION_PROCESS, [JSON.stringify(request)], { detached: true, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    let reply: InjectionReply | undefined;
    const kill = () => {
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // The group is gone already.
      }
    };
    signal.addEventListener('abort', kill, { once: true });
    child.once('message', (message: InjectionReply) => (reply = message));
    child.once('error', reject);
    child.once('exit', (code, exitSignal) => {
      signal.removeEventListener('abort', kill);
      if (signal.aborted) return reject(new CancelledError('driver injection stopped'));
      if (!reply) return reject(new Error(`the driver injection process ended without a reply (${exitSignal ?? `status ${code}`})`));
      if (reply.kind !== 'error') return resolve(reply);
      const { code: errorCode, typed, message } = reply.error;
      if (typed) return reject(new InjectionProcessError(errorCode!, message));
      reject(Object.assign(new Error(message), { code: errorCode }));
    });
  });
}

function relativeReport(path: string, report: InjectionReport): ImageInjection {
  const { image: _absolute, reportPath, ...rest } = report;
  return { path, ...rest, ...(reportPath && { reportPath: `${path}.ferry-inject.json` }) };
}

/** The job log's account of an injection: what was found, every change, warnings and what was verified. */
function describeInjection(report: InjectionReport, changes: string[], path: string): string[] {
  const os = report.os ? `${[report.os.type, report.os.product].filter(Boolean).join(' ')} (${report.os.architecture})` : 'no operating system';
  return [
    `${path}: ${os}: ${changes.length} change(s) for ${report.target} in ${(report.elapsedMs / 1000).toFixed(1)} s`,
    ...changes.map((c) => `  ${c}`),
    ...report.warnings.map((w) => `  warning: ${w}`),
    ...report.verification.map((v) => `  ${v.ok ? 'verified' : 'FAILED'}: ${v.check} (${v.detail})`),
  ];
}
