import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { chmod, mkdir, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { requireTool } from './env.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

/**
 * A real Debian guest disk, built without mounting anything: debootstrap into a folder, an ext4 root
 * written by `mkfs.ext4 -d`, a swap partition, both placed into an sfdisk-partitioned raw image, and
 * GRUB (i386-pc) put into the MBR gap with grub-mkimage + dd.
 *
 * It is built for the hardware of another hypervisor: its initramfs is made with MODULES=list and only
 * ext4 listed, so it lacks virtio, and fstab, GRUB and the resume device use /dev/sda names, the primary
 * NIC is configured as ens33 (a VMware name) and open-vm-tools is installed. A systemd unit prints
 * BOOT_MARKER (with the NIC names) to ttyS0 once the system is up.
 *
 * debootstrap takes minutes, so the image is cached outside the repository, keyed by a hash of this
 * recipe, and built under a lock file so parallel test processes wait for one build.
 */
export const BOOT_MARKER = 'FERRY-GUEST-BOOTED';
/** The name the guest's network configuration uses for its NIC. */
export const GUEST_NIC = 'ens33';

const SUITE = 'bookworm';
const MIRROR = process.env.FERRY_DEBIAN_MIRROR ?? 'http://deb.debian.org/debian';
// grub2-common brings grub-mkconfig, which virt-v2v (the benchmark's peer) requires of a GRUB guest.
const PACKAGES = ['linux-image-amd64', 'systemd-sysv', 'initramfs-tools', 'udev', 'kmod', 'zstd', 'open-vm-tools', 'grub2-common'];
const ROOT_PARTITION_MiB = 1536;
const SWAP_PARTITION_MiB = 64;
const FIRST_SECTOR = 2048;

const GRUB_MODULES = ['biosdisk', 'part_msdos', 'ext2', 'normal', 'linux', 'serial', 'terminal', 'configfile', 'echo', 'test'];

/** Files written into the root folder after debootstrap, relative to it. Part of the cache key. */
function guestFiles(kernelVersion: string): Record<string, string> {
  const cmdline = `root=/dev/sda1 ro console=ttyS0,115200 resume=/dev/sda2 rootdelay=10`;
  return {
    'etc/hostname': 'ferry-guest\n',
    'etc/fstab': '/dev/sda1 / ext4 errors=remount-ro 0 1\n/dev/sda2 none swap sw 0 0\n',
    // Only ext4: the initramfs can mount the root filesystem but has no virtio driver to find its disk.
    'etc/initramfs-tools/initramfs.conf': 'MODULES=list\nBUSYBOX=auto\nCOMPRESS=zstd\n',
    'etc/initramfs-tools/modules': '# modules the initramfs loads, one per line\next4\n',
    'etc/initramfs-tools/conf.d/resume': 'RESUME=/dev/sda2\n',
    'etc/default/grub': `GRUB_DEFAULT=0\nGRUB_TIMEOUT=0\nGRUB_CMDLINE_LINUX="console=ttyS0,115200 resume=/dev/sda2"\nGRUB_DISABLE_LINUX_UUID=true\n`,
    'etc/network/interfaces': `auto lo\niface lo inet loopback\n\nallow-hotplug ${GUEST_NIC}\niface ${GUEST_NIC} inet dhcp\n`,
    'etc/systemd/system/ferry-marker.service': [
      '[Unit]',
      'Description=Print the Ferry boot marker on the serial console',
      '',
      '[Service]',
      'Type=oneshot',
      // NIC renames happen during udev coldplug: wait for it so the marker reports final names.
      'ExecStartPre=/bin/udevadm settle',
      // "$$" is systemd's escape for a literal "$"; the unquoted substitution joins the names with spaces.
      `ExecStart=/bin/sh -c 'echo ${BOOT_MARKER} nics=$$(ls /sys/class/net) > /dev/ttyS0'`,
      '',
      '[Install]',
      'WantedBy=multi-user.target',
      '',
    ].join('\n'),
    'boot/grub/grub.cfg': [
      'serial --unit=0 --speed=115200',
      'terminal_input serial',
      'terminal_output serial',
      'set timeout=0',
      "menuentry 'Debian GNU/Linux' {",
      `  linux /boot/vmlinuz-${kernelVersion} ${cmdline}`,
      `  initrd /boot/initrd.img-${kernelVersion}`,
      '}',
      '',
    ].join('\n'),
  };
}

const RECIPE_VERSION = '3';

function recipeKey(): string {
  const recipe = JSON.stringify({ RECIPE_VERSION, SUITE, PACKAGES, ROOT_PARTITION_MiB, SWAP_PARTITION_MiB, GRUB_MODULES, files: guestFiles('KVER') });
  return createHash('sha256').update(recipe).digest('hex').slice(0, 16);
}

export function cacheDir(): string {
  return process.env.FERRY_TEST_CACHE ?? (process.env.XDG_CACHE_HOME ? join(process.env.XDG_CACHE_HOME, 'ferry-test') : '/var/cache/ferry-test');
}

/** Returns the cached guest image, building it first when the recipe changed or it was never built. */
export async function debianGuestImage(): Promise<string> {
  for (const [tool, pkg] of [
    ['debootstrap', 'debootstrap'],
    ['mkfs.ext4', 'e2fsprogs'],
    ['mkswap', 'util-linux'],
    ['sfdisk', 'fdisk'],
    ['grub-mkimage', 'grub-common'],
  ]) {
    requireTool(tool, pkg);
  }
  try {
    await stat('/usr/lib/grub/i386-pc/boot.img');
  } catch {
    throw new Error('/usr/lib/grub/i386-pc/boot.img is missing: install the Debian package grub-pc-bin (npm run setup does)');
  }
  const dir = cacheDir();
  await mkdir(dir, { recursive: true });
  const image = join(dir, `debian-${SUITE}-${recipeKey()}.raw`);
  if (await exists(image)) return image;
  const release = await acquireLock(join(dir, 'debian-guest.lock'));
  try {
    if (await exists(image)) return image; // built by the process that held the lock
    await buildImage(image);
    return image;
  } finally {
    release();
  }
}

async function buildImage(image: string): Promise<void> {
  const work = `${image}.build`;
  await rm(work, { recursive: true, force: true });
  const rootfs = join(work, 'rootfs');
  await mkdir(rootfs, { recursive: true });
  try {
    await run('debootstrap', ['--variant=minbase', `--include=${PACKAGES.join(',')}`, SUITE, rootfs, MIRROR], {
      maxBuffer: 256 * MiB,
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
    });
    const kernels = (await readdir(join(rootfs, 'lib', 'modules'))).sort();
    if (kernels.length !== 1) throw new Error(`expected one kernel in the guest, found ${kernels.join(', ')}`);
    const kernelVersion = kernels[0]!;
    const builtin = readFileSync(join(rootfs, 'lib', 'modules', kernelVersion, 'modules.builtin'), 'utf8');
    // The fixture is only meaningful when virtio_blk is a module the initramfs can leave out.
    if (/\/virtio_blk\.ko/.test(builtin)) throw new Error(`kernel ${kernelVersion} has virtio_blk built in; the fixture needs it as a module`);

    for (const [rel, content] of Object.entries(guestFiles(kernelVersion))) {
      await mkdir(join(rootfs, rel, '..'), { recursive: true });
      await writeFile(join(rootfs, rel), content);
    }
    await mkdir(join(rootfs, 'etc/systemd/system/multi-user.target.wants'), { recursive: true });
    await run('ln', ['-sf', '/etc/systemd/system/ferry-marker.service', join(rootfs, 'etc/systemd/system/multi-user.target.wants/ferry-marker.service')]);
    await run('cp', ['-a', '/usr/lib/grub/i386-pc', join(rootfs, 'boot/grub/')]);
    // Rebuild the initramfs under the MODULES=list configuration written above.
    await run('chroot', [rootfs, 'update-initramfs', '-u', '-k', kernelVersion], { maxBuffer: 64 * MiB });
    await rm(join(rootfs, 'var/cache/apt/archives'), { recursive: true, force: true });
    await mkdir(join(rootfs, 'var/cache/apt/archives/partial'), { recursive: true });

    const rootImage = join(work, 'root.ext4');
    const swapImage = join(work, 'swap.img');
    await run('truncate', ['-s', `${ROOT_PARTITION_MiB}M`, rootImage]);
    await run('mkfs.ext4', ['-q', '-F', '-L', 'root', '-d', rootfs, rootImage]);
    await run('truncate', ['-s', `${SWAP_PARTITION_MiB}M`, swapImage]);
    await run('mkswap', ['-L', 'swap', swapImage]);

    const disk = join(work, 'disk.raw');
    const totalMiB = FIRST_SECTOR / 2048 + ROOT_PARTITION_MiB + SWAP_PARTITION_MiB;
    await run('truncate', ['-s', `${totalMiB}M`, disk]);
    const rootSectors = (ROOT_PARTITION_MiB * MiB) / 512;
    const swapStart = FIRST_SECTOR + rootSectors;
    await runWithInput('sfdisk', ['-q', disk], `label: dos\nstart=${FIRST_SECTOR}, size=${rootSectors}, type=83, bootable\nstart=${swapStart}, type=82\n`);
    await run('dd', [`if=${rootImage}`, `of=${disk}`, 'bs=1M', `seek=${FIRST_SECTOR / 2048}`, 'conv=notrunc,sparse', 'status=none']);
    await run('dd', [`if=${swapImage}`, `of=${disk}`, 'bs=512', `seek=${swapStart}`, 'conv=notrunc', 'status=none']);

    const coreImage = join(work, 'core.img');
    await run('grub-mkimage', ['-O', 'i386-pc', '-o', coreImage, '-p', '(hd0,msdos1)/boot/grub', ...GRUB_MODULES]);
    const coreSize = (await stat(coreImage)).size;
    if (coreSize > (FIRST_SECTOR - 1) * 512) throw new Error(`core.img (${coreSize} bytes) does not fit the MBR gap`);
    // boot.img's code only (440 bytes): the partition table written by sfdisk stays. Its default
    // kernel sector is 1, where core.img goes; grub-mkimage already put core.img's length in its blocklist.
    await run('dd', ['if=/usr/lib/grub/i386-pc/boot.img', `of=${disk}`, 'bs=440', 'count=1', 'conv=notrunc', 'status=none']);
    await run('dd', [`if=${coreImage}`, `of=${disk}`, 'bs=512', 'seek=1', 'conv=notrunc', 'status=none']);
    await chmod(disk, 0o444);
    await rename(disk, image);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** A writable sparse copy of the cached guest for one test. */
export async function copyGuest(image: string, dir: string, name = 'guest.raw'): Promise<string> {
  const path = join(dir, name);
  await run('cp', ['--sparse=always', '--reflink=auto', image, path]);
  await chmod(path, 0o644);
  return path;
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

/** An exclusive lock file holding the owner's pid; a lock whose owner died is taken over. */
async function acquireLock(path: string): Promise<() => void> {
  for (;;) {
    try {
      const fd = openSync(path, 'wx');
      writeSync(fd, String(process.pid));
      closeSync(fd);
      return () => {
        void rm(path, { force: true });
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const owner = Number(readFileSync(path, 'utf8').trim() || '0');
    if (!owner || !alive(owner)) {
      await rm(path, { force: true });
      continue;
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function runWithInput(command: string, args: string[], input: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = execFile(command, args, (err) => (err ? reject(err) : resolve()));
    child.stdin!.end(input);
  });
}
