import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { probeFormat } from '../convert/open.js';
import type { GuestFs } from './guestfs.js';
import { listInitramfs, modulesIn, normaliseModule } from './initramfs.js';
import { detectDebianFamily } from './linux/detect.js';
import { targetProfiles } from './targets/index.js';
import type { FilesystemInfo, GuestTool, Inspection, KernelInfo, LinuxDetails, OperatingSystem, PartitionInfo } from './types.js';
import { inspectWindows } from './windows/inspect.js';

/** Every storage and network module some target needs: what inspection reports per initramfs. */
const DRIVER_MODULES = new Set(targetProfiles.flatMap((p) => [...p.linux.storage, ...p.linux.network].map(normaliseModule)));

const ESP_GUID = 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B';

/** Ferry's format names → the names qemu (and so libguestfs) uses. */
const QEMU_FORMAT: Record<string, string> = { raw: 'raw', qcow2: 'qcow2', vhd: 'vpc', vhdx: 'vhdx', vmdk: 'vmdk', vdi: 'vdi' };

/** The qemu format name of an image, probed by Ferry's own drivers (libguestfs must not guess raw). */
export async function qemuFormatOf(image: string): Promise<string> {
  const driver = await probeFormat(image);
  return QEMU_FORMAT[driver.name] ?? driver.name;
}

/**
 * GuestInspector: reads everything the fixers decide on from a guest's disk, through an open session.
 * It leaves the guest's filesystems mounted read-only at their guest mountpoints.
 */
export async function inspectGuest(g: GuestFs, image: string): Promise<Inspection> {
  const devices = await g.lines('list-devices');
  const disk = devices[0]!;
  const partitionTable = (await g.tryRun('part-get-parttype', [disk]))?.trim() ?? 'none';
  const partitions = partitionTable === 'none' ? [] : await listPartitions(g, disk, partitionTable);
  const lvm = {
    physicalVolumes: await g.lines('pvs'),
    volumeGroups: await g.lines('vgs'),
    logicalVolumes: await g.lines('lvs'),
  };
  let os: OperatingSystem | null = null;
  const blockers: string[] = [];
  let guestTools: GuestTool[] = [];
  let filesystems: FilesystemInfo[];
  const detected = await detectDebianFamily(g, devices, lvm.logicalVolumes);
  if (detected) {
    filesystems = detected.filesystems;
    os = detected.os;
    await mountGuest(g, os.mountpoints);
    os.linux = await linuxDetails(g, detected.distribution, 'deb');
    guestTools = await guestToolsOf(g, detected.packages.map((name) => ({ name, displayName: '' })), 'linux');
  } else {
    filesystems = await listFilesystems(g);
    const roots = await g.lines('inspect-os');
    if (roots.length) {
      os = await describeOs(g, roots[0]!);
      await mountGuest(g, os.mountpoints);
      if (os.type === 'linux') os.linux = await inspectLinux(g, roots[0]!);
      guestTools = await listGuestTools(g, roots[0]!, os.type);
    } else {
      os = (await findWindowsRoot(g, filesystems)) ?? null;
    }
  }
  if (os?.type === 'windows') {
    const windows = await inspectWindows(g);
    os.windows = windows.details;
    os.architecture = windows.architecture;
    os.product ??= windows.details.productName;
    [os.majorVersion, os.minorVersion] = windows.details.ntVersion.split('.').map(Number) as [number, number];
    blockers.push(...windows.blockers);
    if (!guestTools.length) guestTools = windows.tools;
  }
  const firmware = partitions.some((p) => p.type?.toUpperCase() === ESP_GUID) || os?.mountpoints['/boot/efi'] ? 'uefi' : 'bios';
  return {
    image,
    partitionTable: partitionTable === 'msdos' ? 'mbr' : partitionTable,
    partitions,
    filesystems,
    lvm,
    firmware,
    bootloader: os ? await detectBootloader(g, os, firmware) : null,
    os,
    guestTools,
    blockers,
  };
}

async function listPartitions(g: GuestFs, disk: string, table: string): Promise<PartitionInfo[]> {
  const records = parseStructs(await g.run('part-list', [disk]));
  const out: PartitionInfo[] = [];
  for (const r of records) {
    const number = Number(r.part_num);
    const n = String(number);
    let type: string | null = null;
    if (table === 'gpt') type = (await g.tryRun('part-get-gpt-type', [disk, n]))?.trim() ?? null;
    else if (table === 'msdos') {
      const id = await g.tryRun('part-get-mbr-id', [disk, n]);
      type = id === undefined ? null : Number(id.trim()).toString(16);
    }
    out.push({ device: `${disk}${number}`, number, start: Number(r.part_start), size: Number(r.part_size), type });
  }
  return out;
}

async function listFilesystems(g: GuestFs): Promise<FilesystemInfo[]> {
  const out: FilesystemInfo[] = [];
  for (const line of await g.lines('list-filesystems')) {
    const [device, type] = line.split(': ') as [string, string];
    if (type === 'unknown') continue;
    const uuid = (await g.tryRun('vfs-uuid', [device]))?.trim() || null;
    const label = (await g.tryRun('vfs-label', [device]))?.trim() || null;
    out.push({ device, type, uuid, label });
  }
  return out;
}

async function describeOs(g: GuestFs, root: string): Promise<OperatingSystem> {
  const get = async (what: string) => (await g.run(`inspect-get-${what}`, [root])).trim();
  const mountpoints: Record<string, string> = {};
  for (const line of await g.lines('inspect-get-mountpoints', [root])) {
    const at = line.indexOf(': ');
    mountpoints[line.slice(0, at)] = line.slice(at + 2);
  }
  const type = await get('type');
  const hostname = await get('hostname');
  return {
    type: type === 'windows' ? 'windows' : 'linux',
    root,
    product: (await get('product-name')) || null,
    majorVersion: Number(await get('major-version')),
    minorVersion: Number(await get('minor-version')),
    architecture: await get('arch'),
    hostname: hostname && hostname !== 'unknown' ? hostname : null,
    mountpoints,
  };
}

/**
 * libguestfs recognises Windows by files a bare or damaged system may lack; a filesystem holding
 * Windows\System32\config\SYSTEM is a Windows root for Ferry's purposes (it only edits hives and files).
 */
async function findWindowsRoot(g: GuestFs, filesystems: FilesystemInfo[]): Promise<OperatingSystem | undefined> {
  for (const fs of filesystems.filter((f) => f.type === 'ntfs')) {
    await g.run('mount-ro', [fs.device, '/']);
    if (await g.tryRun('case-sensitive-path', ['/windows/system32/config/system'])) {
      return { type: 'windows', root: fs.device, product: null, majorVersion: 0, minorVersion: 0, architecture: 'unknown', hostname: null, mountpoints: { '/': fs.device } };
    }
    await g.run('umount-all');
  }
  return undefined;
}

/** Mounts the guest's filesystems read-only, parents before children. */
export async function mountGuest(g: GuestFs, mountpoints: Record<string, string>, mode: 'ro' | 'rw' = 'ro'): Promise<void> {
  for (const mp of Object.keys(mountpoints).sort((a, b) => a.length - b.length)) {
    await g.run(mode === 'ro' ? 'mount-ro' : 'mount', [mountpoints[mp]!, mp]);
  }
}

async function inspectLinux(g: GuestFs, root: string): Promise<LinuxDetails> {
  const distribution = (await g.run('inspect-get-distro', [root])).trim();
  const packageFormat = (await g.run('inspect-get-package-format', [root])).trim();
  return linuxDetails(g, distribution, packageFormat);
}

async function linuxDetails(g: GuestFs, distribution: string, packageFormat: string): Promise<LinuxDetails> {
  const initramfsTool = (await g.exists('/usr/sbin/update-initramfs'))
    ? 'initramfs-tools'
    : (await g.exists('/usr/bin/dracut')) || (await g.exists('/usr/sbin/dracut'))
      ? 'dracut'
      : null;
  return { distribution, packageFormat, initramfsTool, kernels: await listKernels(g) };
}

/** The kernel module folder: /lib/modules, or /usr/lib/modules on merged-/usr systems without the link. */
export async function modulesRoot(g: GuestFs): Promise<string> {
  return (await g.isDir('/lib/modules')) ? '/lib/modules' : '/usr/lib/modules';
}

export async function listKernels(g: GuestFs): Promise<KernelInfo[]> {
  const modulesDir = await modulesRoot(g);
  const versions = (await g.lines('ls', [modulesDir])).filter((v) => !v.startsWith('.'));
  const work = await mkdtemp(join(tmpdir(), 'ferry-inspect-'));
  try {
    const kernels: KernelInfo[] = [];
    for (const version of versions.sort()) {
      const vmlinuz = (await g.isFile(`/boot/vmlinuz-${version}`)) ? `/boot/vmlinuz-${version}` : null;
      if (!vmlinuz) continue; // a leftover modules folder of a removed kernel
      const initramfsPath = await findInitramfs(g, version);
      const builtin = (await g.isFile(`${modulesDir}/${version}/modules.builtin`))
        ? modulesIn((await g.run('cat', [`${modulesDir}/${version}/modules.builtin`])).split('\n').map((l) => '/' + l)).filter((m) => DRIVER_MODULES.has(m))
        : [];
      kernels.push({
        version,
        vmlinuz,
        initramfs: initramfsPath ? { path: initramfsPath, kernel: version, modules: await initramfsDriverModules(g, initramfsPath, work) } : null,
        builtin,
      });
    }
    return kernels;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** The initramfs of a kernel under the names Debian, RHEL/Fedora and SUSE use. */
export async function findInitramfs(g: GuestFs, version: string): Promise<string | null> {
  for (const p of [`/boot/initrd.img-${version}`, `/boot/initramfs-${version}.img`, `/boot/initrd-${version}`]) {
    if (await g.isFile(p)) return p;
  }
  return null;
}

/** Downloads an initramfs and lists the storage and network modules in it. */
export async function initramfsDriverModules(g: GuestFs, path: string, work: string): Promise<string[]> {
  const local = join(work, path.replace(/\//g, '_'));
  await g.run('download', [path, local]);
  try {
    return modulesIn(await listInitramfs(local)).filter((m) => DRIVER_MODULES.has(m));
  } finally {
    await rm(local, { force: true });
  }
}

/** Guest tools by package name or install folder, for each hypervisor family. */
const TOOL_PACKAGES: { family: string; pattern: RegExp }[] = [
  { family: 'vmware', pattern: /^(open-vm-tools(-desktop)?|vmware-tools.*|VMware Tools)$/i },
  { family: 'virtualbox', pattern: /^(virtualbox-guest-.*|Oracle VM VirtualBox Guest Additions.*)$/i },
  { family: 'xen', pattern: /^(xe-guest-utilities|xen-tools|Citrix (XenServer|Hypervisor) .*(Tools|Agent).*|XenServer VM Tools.*)$/i },
  { family: 'hyperv', pattern: /^(hyperv-daemons(-.*)?|hyperv-tools|hypervkvpd|hypervvssd|Hyper-V Integration Services.*)$/i },
  { family: 'qemu', pattern: /^(qemu-guest-agent|spice-vdagent|QEMU guest agent|Virtio-win-guest-tools)$/i },
  { family: 'azure', pattern: /^(walinuxagent|WALinuxAgent|Windows Azure VM Agent.*)$/i },
];

/** Tarball installs that no package database knows about, by the file or folder they leave. */
const TOOL_FOLDERS: { family: string; glob: string }[] = [
  { family: 'vmware', glob: '/usr/bin/vmware-uninstall-tools.pl' },
  { family: 'virtualbox', glob: '/opt/VBoxGuestAdditions-*' },
];

export function toolFamilyOf(packageName: string): string | undefined {
  return TOOL_PACKAGES.find((t) => t.pattern.test(packageName))?.family;
}

async function listGuestTools(g: GuestFs, root: string, type: 'linux' | 'windows'): Promise<GuestTool[]> {
  const apps = parseStructs(await g.run('inspect-list-applications2', [root])).map((a) => ({ name: a.app2_name ?? '', displayName: a.app2_display_name ?? '' }));
  return guestToolsOf(g, apps, type);
}

async function guestToolsOf(g: GuestFs, apps: { name: string; displayName: string }[], type: 'linux' | 'windows'): Promise<GuestTool[]> {
  const tools: GuestTool[] = [];
  for (const app of apps) {
    const family = toolFamilyOf(app.name) ?? toolFamilyOf(app.displayName);
    if (family) tools.push({ family, name: app.name, kind: 'package' });
  }
  if (type === 'linux') {
    for (const folder of TOOL_FOLDERS) {
      for (const path of await g.lines('glob-expand', [folder.glob])) tools.push({ family: folder.family, name: path.replace(/\/$/, ''), kind: 'files' });
    }
  }
  return tools;
}

async function detectBootloader(g: GuestFs, os: OperatingSystem, firmware: 'bios' | 'uefi'): Promise<string | null> {
  if (os.type === 'windows') return firmware === 'uefi' ? 'windows-boot-manager (uefi)' : 'windows-boot-manager';
  if ((await g.isFile('/boot/grub2/grub.cfg')) || (await g.isFile('/boot/grub/grub.cfg'))) return 'grub2';
  if (await g.isDir('/boot/loader/entries')) return 'systemd-boot';
  if (await g.isFile('/boot/grub/menu.lst')) return 'grub-legacy';
  if ((await g.isFile('/boot/extlinux/extlinux.conf')) || (await g.isFile('/boot/syslinux/syslinux.cfg'))) return 'syslinux';
  return null;
}

/** Parses guestfish's printing of a struct list ("[0] = {", "  key: value", "}") into records. */
export function parseStructs(text: string): Record<string, string>[] {
  const records: Record<string, string>[] = [];
  let current: Record<string, string> | undefined;
  for (const line of text.split('\n')) {
    if (/^\[\d+\] = \{$/.test(line)) current = {};
    else if (line === '}' && current) {
      records.push(current);
      current = undefined;
    } else if (current) {
      const m = /^\s*([a-z0-9_]+): ?(.*)$/.exec(line);
      if (m) current[m[1]!] = m[2]!;
    }
  }
  return records;
}

/** Reads a guest text file through a host temporary file (binary-safe, no quoting of contents). */
export async function readGuestFile(g: GuestFs, path: string, work: string): Promise<string> {
  const local = join(work, `read-${path.replace(/\//g, '_')}`);
  await g.run('download', [path, local]);
  try {
    return await readFile(local, 'utf8');
  } finally {
    await rm(local, { force: true });
  }
}

/** A guest text file's content, or null when it does not exist. */
export async function readIfExists(g: GuestFs, path: string, work: string): Promise<string | null> {
  if (!(await g.isFile(path))) return null;
  return readGuestFile(g, path, work);
}
