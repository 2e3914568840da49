import { spawn } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
import { requireTool } from './env.js';

export interface BootResult {
  /** The serial console text up to the point the boot was judged. */
  console: string;
  outcome: 'marker' | 'failure' | 'timeout';
}

/**
 * Boots a disk under qemu-system-x86_64 (TCG: KVM cannot be trusted on every test host) with a virtio
 * disk and a virtio NIC, watching the serial console until `marker` or one of `failures` appears or the
 * time runs out; the VM is killed in every case. `snapshot` keeps the disk unchanged.
 */
export async function bootUntil(
  disk: string,
  opts: { marker: string; failures: RegExp; timeoutMs: number; snapshot?: boolean; log: string },
): Promise<BootResult> {
  requireTool('qemu-system-x86_64', 'qemu-system-x86');
  await rm(opts.log, { force: true });
  const qemu = spawn(
    'qemu-system-x86_64',
    [
      '-accel', 'tcg', '-m', '1024', '-nodefaults', '-display', 'none', '-no-reboot',
      '-drive', `file=${disk},if=virtio,format=raw${opts.snapshot ? ',snapshot=on' : ''}`,
      '-nic', 'user,model=virtio-net-pci',
      '-serial', `file:${opts.log}`,
    ],
    { stdio: 'ignore' },
  );
  const exited = new Promise<void>((resolve) => qemu.once('exit', () => resolve()));
  const deadline = Date.now() + opts.timeoutMs;
  let console = '';
  let outcome: BootResult['outcome'] = 'timeout';
  try {
    while (Date.now() < deadline) {
      console = await readFile(opts.log, 'latin1').catch(() => '');
      if (console.includes(opts.marker)) {
        outcome = 'marker';
        break;
      }
      if (opts.failures.test(console)) {
        outcome = 'failure';
        break;
      }
      if (qemu.exitCode !== null) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
  } finally {
    qemu.kill('SIGKILL');
    await exited;
  }
  return { console, outcome };
}
