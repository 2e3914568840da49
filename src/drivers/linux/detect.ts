import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { GuestFs } from '../guestfs.js';
import { readGuestFile } from '../inspect.js';
import type { FilesystemInfo, OperatingSystem } from '../types.js';
import { applianceDevice } from './devices.js';

/** What the light detection found: the same facts libguestfs inspection gives Ferry for such a guest. */
export interface DetectedLinux {
  filesystems: FilesystemInfo[];
  os: OperatingSystem;
  distribution: string;
  /** Installed package names, from dpkg's status file. */
  packages: string[];
}

/** Filesystem types this detection understands; any other signature leaves the guest to libguestfs. */
const SIMPLE_TYPES = new Set(['ext2', 'ext3', 'ext4', 'xfs', 'swap', 'vfat']);
const ROOT_TYPES = new Set(['ext2', 'ext3', 'ext4', 'xfs']);
/** fstab entries that name no block device of the guest's disks. */
const VIRTUAL_FS = new Set(['swap', 'proc', 'sysfs', 'tmpfs', 'devpts', 'devtmpfs', 'nfs', 'nfs4', 'cifs', 'smb3', 'none', 'auto', 'fuse', 'overlay', 'efivarfs', 'securityfs', 'cgroup', 'cgroup2', 'debugfs', 'hugetlbfs', 'mqueue', 'binfmt_misc']);

/**
 * A light detection of Debian-family guests on plain partitions, in a few round trips: one blkid
 * per partition instead of libguestfs's `list-filesystems` and `inspect-os`, which probe every device
 * several times and cost about ten seconds in a TCG appliance. It answers only when the layout is
 * one it fully understands — no LVM, md RAID, btrfs, LUKS or NTFS, one root with /etc/os-release
 * and dpkg's status file, every fstab device resolvable — and returns undefined otherwise, so the
 * caller uses libguestfs inspection. Nothing is left mounted.
 */
export async function detectDebianFamily(g: GuestFs, devices: string[], logicalVolumes: string[]): Promise<DetectedLinux | undefined> {
  if (logicalVolumes.length || (await g.lines('list-md-devices')).length) return undefined;
  const partitions = await g.lines('list-partitions');
  const candidates = [...partitions, ...devices.filter((d) => !partitions.some((p) => new RegExp(`^${d}\\d+$`).test(p)))];
  const filesystems: FilesystemInfo[] = [];
  for (const device of candidates) {
    const tags = parseTags((await g.tryRun('blkid', [device])) ?? '');
    if (!tags.TYPE) continue;
    if (!SIMPLE_TYPES.has(tags.TYPE)) return undefined;
    filesystems.push({ device, type: tags.TYPE, uuid: tags.UUID ?? null, label: tags.LABEL ?? null });
  }
  for (const fs of filesystems.filter((f) => ROOT_TYPES.has(f.type))) {
    await g.run('mount-ro', [fs.device, '/']);
    const osRelease = (await g.isFile('/etc/os-release')) ? '/etc/os-release' : (await g.isFile('/usr/lib/os-release')) ? '/usr/lib/os-release' : null;
    const detected = osRelease && (await g.isFile('/etc/fstab')) ? await describe(g, fs, filesystems, devices, osRelease) : undefined;
    await g.run('umount-all');
    if (osRelease) return detected;
  }
  return undefined;
}

async function describe(g: GuestFs, root: FilesystemInfo, filesystems: FilesystemInfo[], devices: string[], osRelease: string): Promise<DetectedLinux | undefined> {
  if (!(await g.isFile('/var/lib/dpkg/status'))) return undefined;
  const release = parseOsRelease(await g.run('read-file', [osRelease]));
  const mountpoints = fstabMountpoints(await g.run('read-file', ['/etc/fstab']), filesystems, devices);
  if (!mountpoints || (mountpoints['/'] ?? root.device) !== root.device) return undefined;
  mountpoints['/'] = root.device;
  let version = (release.VERSION_ID ?? '').split('.').map(Number);
  // Debian's point release is in debian_version (12.5), not in os-release (12).
  if (release.ID === 'debian' && (await g.isFile('/etc/debian_version'))) {
    const m = /^(\d+)\.(\d+)/.exec(await g.run('read-file', ['/etc/debian_version']));
    if (m) version = [Number(m[1]), Number(m[2])];
  }
  const hostname = (await g.isFile('/etc/hostname')) ? (await g.run('read-file', ['/etc/hostname'])).split('\n')[0]!.trim() : '';
  const os: OperatingSystem = {
    type: 'linux',
    root: root.device,
    product: release.PRETTY_NAME ?? release.NAME ?? null,
    majorVersion: Number.isFinite(version[0]) ? version[0]! : 0,
    minorVersion: Number.isFinite(version[1]) ? version[1]! : 0,
    architecture: await architecture(g),
    hostname: hostname || null,
    mountpoints,
  };
  return { filesystems, os, distribution: release.ID ?? 'unknown', packages: await installedPackages(g) };
}

/** `KEY: value` lines as guestfish prints a hash (blkid). */
function parseTags(text: string): Record<string, string> {
  const tags: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const at = line.indexOf(': ');
    if (at > 0) tags[line.slice(0, at)] = line.slice(at + 2);
  }
  return tags;
}

export function parseOsRelease(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!.replace(/^(["'])(.*)\1$/, '$2');
  }
  return out;
}

/**
 * Guest mountpoint → appliance device from fstab; null when an entry for a block device cannot be
 * resolved (PARTUUID, a device on no attached disk, …), which only libguestfs inspection can judge.
 */
export function fstabMountpoints(text: string, filesystems: FilesystemInfo[], devices: string[]): Record<string, string> | null {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const fields = line.trim().split(/\s+/);
    if (!fields[0] || fields[0].startsWith('#') || fields.length < 3) continue;
    const [spec, mountpoint, type, options = ''] = fields as [string, string, string, string?];
    if (!mountpoint.startsWith('/') || VIRTUAL_FS.has(type) || options.split(',').includes('bind')) continue;
    const device = resolveSpec(spec, filesystems, devices);
    if (!device) return null;
    out[mountpoint] = device;
  }
  return out;
}

function resolveSpec(spec: string, filesystems: FilesystemInfo[], devices: string[]): string | undefined {
  const by = (key: 'uuid' | 'label', value: string) => filesystems.find((f) => f[key] === value)?.device;
  let m: RegExpExecArray | null;
  if ((m = /^UUID=(.+)$/.exec(spec)) || (m = /^\/dev\/disk\/by-uuid\/(.+)$/.exec(spec))) return by('uuid', m[1]!.replace(/^"|"$/g, ''));
  if ((m = /^LABEL=(.+)$/.exec(spec)) || (m = /^\/dev\/disk\/by-label\/(.+)$/.exec(spec))) return by('label', m[1]!.replace(/^"|"$/g, ''));
  const device = applianceDevice(spec, devices);
  return device && filesystems.some((f) => f.device === device) ? device : undefined;
}

/** The architecture of the guest's own binaries, as libguestfs inspection reports it. */
async function architecture(g: GuestFs): Promise<string> {
  for (const path of ['/bin/ls', '/usr/bin/ls', '/bin/sh']) {
    if (await g.isFile(path)) {
      const arch = await g.tryRun('file-architecture', [path]);
      if (arch?.trim()) return arch.trim();
    }
  }
  return 'unknown';
}

/** Packages dpkg reports as installed. */
async function installedPackages(g: GuestFs): Promise<string[]> {
  const work = await mkdtemp(join(tmpdir(), 'ferry-detect-'));
  try {
    const status = await readGuestFile(g, '/var/lib/dpkg/status', work);
    const packages: string[] = [];
    for (const stanza of status.split(/\n\s*\n/)) {
      const name = /^Package:\s*(\S+)/m.exec(stanza)?.[1];
      if (name && /^Status:.*\sinstalled\s*$/m.test(stanza)) packages.push(name);
    }
    return packages;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
