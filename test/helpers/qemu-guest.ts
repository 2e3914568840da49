/**
 * Small QEMU guests for the live migration tests and benchmark: the host's Debian kernel plus an initramfs
 * built here (busybox-static and the workload in test/fixtures/guest/workload.c, compiled statically), run
 * under TCG (this machine's /dev/kvm cannot run guests) with guest RAM on a shared file in /dev/shm.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chmod, copyFile, mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { setTimeout as delay } from 'node:timers/promises';
import { ROOT, requireTool } from './env.js';

const run = promisify(execFile);

export interface GuestImage {
  kernel: string;
  initrd: string;
}

export interface WorkloadShape {
  /** MiB the workload allocates and keeps verified. */
  totalMiB: number;
  /** MiB of it rewritten continually. */
  hotMiB: number;
  /** MiB/s of rewriting (0: as fast as the vCPU goes). */
  rateMiBs: number;
}

export async function findKernel(): Promise<string> {
  const kernels = existsSync('/boot') ? (await readdir('/boot')).filter((f) => f.startsWith('vmlinuz-')).sort() : [];
  if (!kernels.length) throw new Error('no guest kernel in /boot/vmlinuz-*: install the Debian package linux-image-amd64');
  return join('/boot', kernels[kernels.length - 1]);
}

/** Builds the initramfs in `dir`: /init starts the workload with `shape` and prints GUEST-BOOTED first. */
export async function buildGuest(dir: string, shape: WorkloadShape): Promise<GuestImage> {
  requireTool('qemu-system-x86_64', 'qemu-system-x86');
  requireTool('cpio', 'cpio');
  requireTool('gcc', 'gcc');
  if (!existsSync('/bin/busybox')) throw new Error('/bin/busybox is missing: install the Debian package busybox-static');
  const { stdout } = await run('sh', ['-c', 'file -L /bin/busybox 2>/dev/null || ldd /bin/busybox 2>&1 || true']);
  if (/dynamically linked/.test(stdout) && !/not a dynamic executable/.test(stdout)) throw new Error('/bin/busybox is dynamically linked: install the Debian package busybox-static');
  const kernel = await findKernel();
  const root = join(dir, 'initramfs');
  await rm(root, { recursive: true, force: true });
  await mkdir(join(root, 'bin'), { recursive: true });
  await copyFile('/bin/busybox', join(root, 'bin', 'busybox'));
  await run('gcc', ['-static', '-O2', '-o', join(root, 'workload'), join(ROOT, 'test', 'fixtures', 'guest', 'workload.c')]);
  await writeFile(
    join(root, 'init'),
    `#!/bin/busybox sh\n/bin/busybox --install -s /bin\necho GUEST-BOOTED\nexec /workload ${shape.totalMiB} ${shape.hotMiB} ${shape.rateMiBs}\n`,
  );
  await chmod(join(root, 'init'), 0o755);
  const initrd = await packInitramfs(root, join(dir, 'initrd.cpio'));
  return { kernel, initrd };
}

/** Packs the folder `root` into a newc cpio archive at `initrd` (an initramfs the kernel unpacks). */
export async function packInitramfs(root: string, initrd: string): Promise<string> {
  await run('sh', ['-c', `cd "${root}" && find . | cpio -o -H newc > "${initrd}" 2>/dev/null`]);
  return initrd;
}

export interface VmOptions {
  dir: string;
  name: string;
  guest: GuestImage;
  memMiB: number;
  /** Start as a migration destination: -incoming defer -S. */
  incoming?: boolean;
}

export interface TestVm {
  name: string;
  qmpPath: string;
  serialPath: string;
  ramPath: string;
  process: ChildProcess;
  /** Kills QEMU (if alive) and removes its RAM file. */
  stop(): Promise<void>;
  serial(): Promise<string>;
  exited: boolean;
}

export function qemuArgs(o: VmOptions, paths: { qmpPath: string; serialPath: string; ramPath: string }): string[] {
  return [
    '-accel', 'tcg',
    '-m', `${o.memMiB}M`,
    '-display', 'none',
    '-vga', 'none',
    '-nodefaults',
    '-no-user-config',
    '-no-reboot',
    '-serial', `file:${paths.serialPath}`,
    '-qmp', `unix:${paths.qmpPath},server=on,wait=off`,
    '-object', `memory-backend-file,id=mem,size=${o.memMiB}M,mem-path=${paths.ramPath},share=on`,
    '-machine', 'pc,memory-backend=mem',
    '-kernel', o.guest.kernel,
    '-initrd', o.guest.initrd,
    '-append', 'console=ttyS0 quiet panic=-1',
    ...(o.incoming ? ['-incoming', 'defer', '-S'] : []),
  ];
}

export async function startVm(o: VmOptions): Promise<TestVm> {
  const paths = {
    qmpPath: join(o.dir, `${o.name}.qmp`),
    serialPath: join(o.dir, `${o.name}.serial`),
    ramPath: `/dev/shm/ferry-test-${process.pid}-${o.name}.ram`,
  };
  await rm(paths.ramPath, { force: true });
  await writeFile(paths.serialPath, '');
  const child = spawn('qemu-system-x86_64', qemuArgs(o, paths), { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d) => (stderr += d));
  const vm: TestVm = {
    name: o.name,
    ...paths,
    process: child,
    exited: false,
    serial: () => readFile(paths.serialPath, 'utf8'),
    async stop() {
      if (!vm.exited) {
        child.kill('SIGKILL');
        await new Promise((resolve) => (vm.exited ? resolve(undefined) : child.once('exit', resolve)));
      }
      await rm(paths.ramPath, { force: true });
    },
  };
  child.once('exit', () => (vm.exited = true));
  // QEMU creates the QMP socket once it is up; fail early with its stderr if it dies instead.
  for (let i = 0; i < 200 && !existsSync(paths.qmpPath); i++) {
    if (vm.exited) throw new Error(`qemu-system-x86_64 (${o.name}) exited: ${stderr}`);
    await delay(50);
  }
  return vm;
}

/** Waits until the serial console matches `pattern`; returns the match. */
export async function waitSerial(vm: TestVm, pattern: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const m = (await vm.serial()).match(pattern);
    if (m) return m;
    if (performance.now() > deadline) throw new Error(`${vm.name}: serial console did not show ${pattern} within ${timeoutMs} ms:\n${(await vm.serial()).slice(-2000)}`);
    await delay(200);
  }
}

/** The highest "WORKLOAD OK seq=N" on the console, 0 when none. */
export function lastSeq(serial: string): number {
  let seq = 0;
  for (const m of serial.matchAll(/WORKLOAD OK seq=(\d+)/g)) seq = Math.max(seq, Number(m[1]));
  return seq;
}
