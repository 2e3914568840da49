import { spawn } from 'node:child_process';
import { access, readFile, readdir, writeFile, constants } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createLogger } from '../log.js';

const log = createLogger('kvm-probe');

/** A kernel that boots far enough to panic proves the accelerator runs a real guest. */
const PROBE_TIMEOUT_MS = 10_000;
const PROBE_SUCCESS = /Kernel panic|VFS: Unable to mount root/;

export type Accelerator = 'kvm' | 'tcg';

let probed: Promise<Accelerator> | undefined;

/**
 * Decides whether KVM can run guests on this host. `/dev/kvm` existing is not proof — on some hosts
 * (nested virtualisation without the needed CPU features) it opens but a guest never gets past its
 * first instructions — so this boots the host's own kernel without a root filesystem under
 * `-accel kvm` and waits for it to panic. The answer is cached per process and, keyed by the host's
 * boot id, in a file, since it cannot change before a reboot.
 */
export function probeAccelerator(): Promise<Accelerator> {
  probed ??= decide();
  return probed;
}

/** The environment libguestfs needs for the probed accelerator (a caller's own settings win). */
export async function libguestfsEnvironment(): Promise<Record<string, string>> {
  const env: Record<string, string> = { LIBGUESTFS_BACKEND: process.env.LIBGUESTFS_BACKEND ?? 'direct' };
  if (process.env.LIBGUESTFS_BACKEND_SETTINGS !== undefined) return env;
  if ((await probeAccelerator()) === 'tcg') env.LIBGUESTFS_BACKEND_SETTINGS = 'force_tcg';
  return env;
}

async function decide(): Promise<Accelerator> {
  const forced = process.env.FERRY_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') return forced;
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return 'tcg';
  }
  const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8').catch(() => '')).trim();
  const cacheFile = join(tmpdir(), `ferry-kvm-probe-${process.getuid?.() ?? 0}.json`);
  if (bootId) {
    const cached = await readFile(cacheFile, 'utf8').then(
      (t) => JSON.parse(t) as { bootId: string; accelerator: Accelerator },
      () => undefined,
    );
    if (cached?.bootId === bootId) return cached.accelerator;
  }
  const kernel = await hostKernel();
  const accelerator: Accelerator = kernel && (await bootsUnderKvm(kernel)) ? 'kvm' : 'tcg';
  log.info({ kernel, accelerator }, 'KVM probe finished');
  if (bootId) await writeFile(cacheFile, JSON.stringify({ bootId, accelerator })).catch(() => undefined);
  return accelerator;
}

async function hostKernel(): Promise<string | undefined> {
  const names = (await readdir('/boot').catch(() => [] as string[])).filter((n) => n.startsWith('vmlinuz-')).sort();
  for (const name of names.reverse()) {
    const path = join('/boot', name);
    if (await access(path, constants.R_OK).then(() => true, () => false)) return path;
  }
  return undefined;
}

function bootsUnderKvm(kernel: string): Promise<boolean> {
  return new Promise((resolve) => {
    const qemu = spawn(
      'qemu-system-x86_64',
      ['-accel', 'kvm', '-nodefaults', '-display', 'none', '-m', '256', '-no-reboot', '-serial', 'stdio', '-kernel', kernel, '-append', 'console=ttyS0 panic=-1'],
      { stdio: ['ignore', 'pipe', 'ignore'] },
    );
    let console = '';
    let settled = false;
    const finish = (ok: boolean) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      qemu.kill('SIGKILL');
      resolve(ok);
    };
    const timer = setTimeout(() => finish(false), PROBE_TIMEOUT_MS);
    qemu.stdout.on('data', (d: Buffer) => {
      console += d.toString('latin1');
      if (PROBE_SUCCESS.test(console)) finish(true);
    });
    qemu.on('error', () => finish(false));
    qemu.on('close', () => finish(PROBE_SUCCESS.test(console)));
  });
}
