import { access, constants, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createLogger } from '../log.js';
import { applyChanges } from './apply.js';
import { GuestNotFixableError } from './errors.js';
import { GuestFs } from './guestfs.js';
import { inspectGuest, mountGuest, qemuFormatOf } from './inspect.js';
import { planLinux, verifyLinux } from './linux/fixer.js';
import { findTarget } from './targets/index.js';
import type { Change, InjectionReport, Inspection } from './types.js';
import { driverFolder, driverMediaKind } from './windows/driver-media.js';
import { planWindows, verifyWindows } from './windows/fixer.js';

export type { Change, InjectionReport, Inspection } from './types.js';
export { targetProfiles, findTarget } from './targets/index.js';
export type { TargetName, TargetProfile } from './profile.js';

const log = createLogger('inject');

export interface InspectOptions {
  /** qemu format name; probed by Ferry when omitted. */
  format?: string;
}

/** `ferry inspect`: describes the guest on a disk image without changing it. */
export async function inspectImage(image: string, opts: InspectOptions = {}): Promise<Inspection> {
  const g = await GuestFs.open([{ path: image, format: opts.format ?? (await qemuFormatOf(image)), readonly: true }]);
  try {
    return await inspectGuest(g, image);
  } finally {
    await g.close();
  }
}

export interface InjectOptions {
  /** Target profile name: kvm, hyperv, vmware, xen, aws or azure. */
  target: string;
  /** Windows drivers: a virtio-win folder or ISO (KVM), or a driver folder or ISO (VMware, Xen, AWS). */
  driversPath?: string;
  /** Plan and report only; the image is opened read-only. */
  dryRun?: boolean;
  format?: string;
  /** Where to store the report; default IMAGE.ferry-inject.json beside the image, null for none. */
  reportPath?: string | null;
}

/**
 * Makes the guest on a writable image boot on `target`, in place: one libguestfs session inspects,
 * plans the changes (the same list for --dry-run), applies them and verifies the result. Callers that
 * convert run it on their output, never on the source.
 */
export async function injectDrivers(image: string, opts: InjectOptions): Promise<InjectionReport> {
  const profile = findTarget(opts.target);
  const dryRun = opts.dryRun === true;
  const startedAt = new Date();
  if (!dryRun) await access(image, constants.R_OK | constants.W_OK);
  if (opts.driversPath !== undefined) await driverMediaKind(opts.driversPath);
  const work = await mkdtemp(join(tmpdir(), 'ferry-inject-'));
  const g = await GuestFs.open([{ path: image, format: opts.format ?? (await qemuFormatOf(image)), readonly: dryRun }]);
  let report: InjectionReport;
  try {
    const inspection = await inspectGuest(g, image);
    const os = inspection.os;
    if (!os) throw new GuestNotFixableError('no operating system found on the disk', { file: image });
    if (inspection.blockers.length) throw new GuestNotFixableError(inspection.blockers.join('; '), { file: image });
    let plan: { changes: Change[]; warnings: string[] };
    let verify: () => Promise<InjectionReport['verification']>;
    if (os.type === 'linux') {
      const linuxPlan = await planLinux(g, inspection, profile, work);
      plan = linuxPlan;
      verify = () => verifyLinux(g, linuxPlan, work);
    } else {
      const driversDir = opts.driversPath === undefined ? undefined : await driverFolder(opts.driversPath, work);
      plan = await planWindows(g, inspection, profile, driversDir, work);
      verify = () => verifyWindows(g, plan.changes, work);
    }
    const warnings = [...plan.warnings];
    if (profile.output) {
      const size = Number((await g.run('blockdev-getsize64', ['/dev/sda'])).trim());
      if (size % profile.output.sizeAlignment !== 0) warnings.push(`disk size ${size} is not a multiple of ${profile.output.sizeAlignment}: ${profile.output.note}`);
    }
    let verification: InjectionReport['verification'] = [];
    if (!dryRun) {
      await g.run('umount-all');
      await mountGuest(g, os.mountpoints, 'rw');
      await applyChanges(g, plan.changes, work);
      verification = await verify();
      await g.run('umount-all');
    }
    report = {
      image,
      target: profile.name,
      dryRun,
      os: { type: os.type, product: os.product, architecture: os.architecture },
      changes: plan.changes,
      verification,
      warnings,
      startedAt: startedAt.toISOString(),
      elapsedMs: Date.now() - startedAt.getTime(),
    };
  } finally {
    await g.close();
    await rm(work, { recursive: true, force: true });
  }
  const reportPath = opts.reportPath === undefined ? `${image}.ferry-inject.json` : opts.reportPath;
  if (!dryRun && reportPath) {
    report.reportPath = reportPath;
    await writeFile(reportPath, JSON.stringify(report, null, 2) + '\n');
  }
  log.info({ image, target: profile.name, dryRun, changes: report.changes.length, elapsedMs: report.elapsedMs }, 'injection finished');
  return report;
}

/** One line per change, for terminals and logs. */
export function describeChange(change: Change): string {
  switch (change.kind) {
    case 'file.write':
      return `${change.before === null ? 'create' : 'edit'} ${change.path}: ${change.reason}`;
    case 'file.upload':
      return `copy ${change.source} → ${change.path}: ${change.reason}`;
    case 'file.copy':
      return `copy ${change.source} → ${change.path}: ${change.reason}`;
    case 'file.remove':
      return `remove ${change.path}: ${change.reason}`;
    case 'guest.command':
      return `run in guest: ${change.command}: ${change.reason}`;
    case 'registry.set': {
      const show = (v: typeof change.after | null) => (v === null ? '(none)' : `${v.type} ${JSON.stringify(v.data)}`);
      return `set HKLM\\${change.hive}\\${change.key}\\${change.name || '(Default)'}: ${show(change.before)} → ${show(change.after)}: ${change.reason}`;
    }
  }
}
