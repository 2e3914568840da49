import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, copyFile, mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { promisify } from 'node:util';
import { requireTool } from './env.js';
import { findKernel, packInitramfs } from './qemu-guest.js';
import { freePort } from './sshd.js';

const run = promisify(execFile);

export const LVM_GUEST_VOLUME = '/dev/vg0/data';
/** Size of the logical volume, MiB; the volume group (a 256 MiB disk) keeps the rest free for snapshots. */
export const LVM_GUEST_VOLUME_MiB = 48;
const READY = 'FERRY-LVM-GUEST-READY';

export interface LvmGuest {
  /** Loopback port forwarded to the guest's sshd. */
  port: number;
  /** The guest's host key fingerprint (SHA256:…), to pin. */
  fingerprint: string;
  /** Private key authorized for root in the guest. */
  userKey: string;
  /** Runs a shell command in the guest as root; resolves to its stdout. */
  ssh(command: string): Promise<string>;
  stop(): Promise<void>;
}

/**
 * A small Linux guest with LVM, under TCG: the host's Debian kernel with the device-mapper, virtio and
 * network modules it needs, busybox, and the host's own lvm and sshd binaries with their libraries, in an
 * initramfs. A 256 MiB virtio disk becomes volume group vg0 with one 48 MiB volume of random data; sshd is
 * reachable on a loopback port (QEMU user networking). For capture tests on a host whose kernel has no
 * device-mapper.
 */
export async function startLvmGuest(dir: string): Promise<LvmGuest> {
  requireTool('qemu-system-x86_64', 'qemu-system-x86');
  requireTool('cpio', 'cpio');
  requireTool('ssh', 'openssh-client');
  requireTool('ssh-keygen', 'openssh-client');
  requireTool('/usr/sbin/sshd', 'openssh-server');
  requireTool('/usr/sbin/lvm', 'lvm2');
  if (!existsSync('/bin/busybox')) throw new Error('/bin/busybox is missing: install the Debian package busybox-static');
  const kernel = await findKernel();
  const version = basename(kernel).replace(/^vmlinuz-/, '');
  const root = join(dir, 'lvm-initramfs');
  for (const d of ['bin', 'usr/sbin', 'etc/ssh', 'etc/lvm', 'root', 'modules']) await mkdir(join(root, d), { recursive: true });
  await copyFile('/bin/busybox', join(root, 'bin', 'busybox'));
  for (const binary of ['/usr/sbin/sshd', '/usr/sbin/lvm']) await copyWithLibraries(binary, root);
  for (const tool of ['lvs', 'lvcreate', 'lvremove', 'pvcreate', 'vgcreate']) await symlink('lvm', join(root, 'usr/sbin', tool));

  // Kernel modules, in the order modprobe would load them (one module per call: more names are parameters).
  const order: string[] = [];
  for (const module of ['dm-snapshot', 'virtio_pci', 'virtio_blk', 'virtio_net']) {
    const { stdout: deps } = await run('modprobe', ['-S', version, '--show-depends', module]).catch(() => {
      throw new Error(`cannot resolve the guest kernel's module ${module} (${version}): install the Debian packages kmod and linux-image-amd64`);
    });
    for (const line of deps.split('\n')) {
      const m = /^insmod (\S+)/.exec(line);
      if (!m || order.includes(basename(m[1]))) continue;
      await copyFile(m[1], join(root, 'modules', basename(m[1])));
      order.push(basename(m[1]));
    }
  }

  const hostKey = join(dir, 'guest_host_ed25519');
  const userKey = join(dir, 'guest_user_ed25519');
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', hostKey]);
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', userKey]);
  await copyFile(hostKey, join(root, 'etc/ssh/host_key'));
  await chmod(join(root, 'etc/ssh/host_key'), 0o600);
  await copyFile(`${userKey}.pub`, join(root, 'etc/ssh/authorized_keys'));
  const files: Record<string, string> = {
    // A set password field ('*'): sshd without PAM refuses even key logins to a locked ('!') account.
    'etc/passwd': 'root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/bin/false\n',
    'etc/shadow': 'root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n',
    'etc/group': 'root:x:0:\nnogroup:x:65534:\n',
    'etc/ssh/sshd_config': [
      'HostKey /etc/ssh/host_key',
      'AuthorizedKeysFile /etc/ssh/authorized_keys',
      'PermitRootLogin yes',
      'UsePAM no',
      'StrictModes no',
      'PasswordAuthentication no',
      'MaxSessions 20',
      'LogLevel ERROR',
    ].join('\n') + '\n',
    // No udev in this guest: LVM makes its device nodes itself.
    'etc/lvm/lvm.conf': 'activation {\n udev_sync = 0\n udev_rules = 0\n monitoring = 0\n}\ndevices {\n obtain_device_list_from_udev = 0\n}\nbackup {\n backup = 0\n archive = 0\n}\n',
    init: [
      '#!/bin/busybox sh',
      '/bin/busybox --install -s /bin',
      'export PATH=/bin:/usr/sbin',
      'mount -t proc proc /proc 2>/dev/null || { mkdir -p /proc; mount -t proc proc /proc; }',
      'mkdir -p /sys /dev /run /tmp && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev && mount -t tmpfs run /run',
      'mkdir -p /dev/pts /run/sshd /run/lock/lvm /var/empty && mount -t devpts devpts /dev/pts',
      'exec >/dev/ttyS0 2>&1',
      ...order.map((m) => `insmod /modules/${m}`),
      // Devices appear as the drivers probe them, after insmod returns.
      'for i in $(seq 100); do [ -b /dev/vda ] && [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done',
      'echo modules loaded at $(cut -d" " -f1 /proc/uptime)',
      'ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2',
      'lvm pvcreate -q /dev/vda && lvm vgcreate -q vg0 /dev/vda && lvm lvcreate -q --yes -L ' + `${LVM_GUEST_VOLUME_MiB}M -n data vg0`,
      `dd if=/dev/urandom of=${LVM_GUEST_VOLUME} bs=1M count=${LVM_GUEST_VOLUME_MiB} 2>/dev/null && sync`,
      'echo volume filled at $(cut -d" " -f1 /proc/uptime)',
      '/usr/sbin/sshd -e -f /etc/ssh/sshd_config',
      `echo ${READY}`,
      'while true; do sleep 3600; done',
    ].join('\n') + '\n',
  };
  for (const [path, text] of Object.entries(files)) await writeFile(join(root, path), text);
  await chmod(join(root, 'init'), 0o755);
  const initrd = await packInitramfs(root, join(dir, 'lvm-initrd.cpio'));

  const disk = join(dir, 'lvm-disk.raw');
  await writeFile(disk, '');
  await run('truncate', ['-s', '256M', disk]);
  const port = await freePort();
  const serial = join(dir, 'lvm-guest.serial');
  const child: ChildProcess = spawn(
    'qemu-system-x86_64',
    [
      '-accel', 'tcg', '-m', '512M', '-smp', '1', '-display', 'none', '-vga', 'none', '-nodefaults', '-no-user-config', '-no-reboot',
      '-kernel', kernel, '-initrd', initrd, '-append', 'console=ttyS0 quiet panic=-1',
      '-serial', `file:${serial}`,
      '-drive', `file=${disk},format=raw,if=virtio`,
      '-netdev', `user,id=net0,hostfwd=tcp:127.0.0.1:${port}-:22`, '-device', 'virtio-net-pci,netdev=net0',
    ],
    { stdio: 'ignore' },
  );
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
    }
  };
  const deadline = Date.now() + 180_000;
  for (;;) {
    const text = existsSync(serial) ? await readFile(serial, 'utf8') : '';
    if (text.includes(READY)) break;
    if (child.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new Error(`the LVM guest did not come up; its console:\n${text.slice(-3000)}`);
    }
    await delay(250);
  }
  const { stdout } = await run('ssh-keygen', ['-l', '-f', `${hostKey}.pub`]);
  const sshArgs = ['-i', userKey, '-p', String(port), '-o', 'StrictHostKeyChecking=no', '-o', `UserKnownHostsFile=/dev/null`, '-o', 'LogLevel=ERROR', '-o', 'BatchMode=yes', 'root@127.0.0.1'];
  return {
    port,
    fingerprint: stdout.split(/\s+/)[1],
    userKey,
    async ssh(command) {
      return (await run('ssh', [...sshArgs, command], { maxBuffer: 16 * 1024 * 1024 })).stdout;
    },
    stop,
  };
}

/** Copies an executable and the shared libraries ldd lists for it (with the loader) to the same paths under root. */
async function copyWithLibraries(binary: string, root: string): Promise<void> {
  const { stdout } = await run('ldd', [binary]);
  const paths = [binary, ...[...stdout.matchAll(/(\/[^\s)]+)/g)].map((m) => m[1])];
  for (const path of new Set(paths)) {
    const to = join(root, path);
    if (existsSync(to)) continue;
    await mkdir(dirname(to), { recursive: true });
    await copyFile(path, to);
    await chmod(to, 0o755);
  }
}
