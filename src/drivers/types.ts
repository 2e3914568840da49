import type { TargetName } from './profile.js';

/** A registry value as Windows stores it. Binary data is hex, so reports stay JSON. */
export type RegistryValue =
  | { type: 'REG_SZ'; data: string }
  | { type: 'REG_EXPAND_SZ'; data: string }
  | { type: 'REG_MULTI_SZ'; data: string[] }
  | { type: 'REG_DWORD'; data: number }
  | { type: 'REG_BINARY'; data: string };

export type Hive = 'SYSTEM' | 'SOFTWARE';

/**
 * One change to a guest, as data. Injection first plans a list of these, then applies them in order;
 * `--dry-run` prints the same list, and the stored report is the list with what verification found.
 */
export type Change =
  /** A text file written whole; `mode` for new files that must be executable. */
  | { kind: 'file.write'; path: string; before: string | null; after: string; mode?: number; reason: string }
  /** A file copied into the guest from the host (drivers). */
  | { kind: 'file.upload'; path: string; source: string; reason: string }
  /** A file copied inside the guest (backups such as initrd.img-X.ferry-bak). */
  | { kind: 'file.copy'; path: string; source: string; reason: string }
  | { kind: 'file.remove'; path: string; before: string | null; reason: string }
  /** A command run inside the guest with its own tools (update-initramfs, dracut, dpkg). */
  | { kind: 'guest.command'; command: string; reason: string }
  | { kind: 'registry.set'; hive: Hive; key: string; name: string; before: RegistryValue | null; after: RegistryValue; reason: string };


/** What one initramfs holds of the drivers Ferry cares about. */
export interface InitramfsInfo {
  path: string;
  kernel: string;
  /** Storage and network modules found in the image (names normalised to "_"). */
  modules: string[];
}

export interface KernelInfo {
  version: string;
  vmlinuz: string | null;
  initramfs: InitramfsInfo | null;
  /** Modules compiled into the kernel (modules.builtin) among the ones Ferry cares about. */
  builtin: string[];
}

export interface PartitionInfo {
  device: string;
  number: number;
  start: number;
  size: number;
  /** MBR type byte as hex ("83") or GPT type GUID. */
  type: string | null;
}

export interface FilesystemInfo {
  device: string;
  type: string;
  uuid: string | null;
  label: string | null;
}

export interface LvmInfo {
  physicalVolumes: string[];
  volumeGroups: string[];
  logicalVolumes: string[];
}

export interface GuestTool {
  family: string;
  /** The package (or install folder) that provides it. */
  name: string;
  kind: 'package' | 'files';
}

export interface LinuxDetails {
  distribution: string;
  /** deb or rpm: which package tools the fixers use. */
  packageFormat: string;
  initramfsTool: 'initramfs-tools' | 'dracut' | null;
  kernels: KernelInfo[];
}

export interface WindowsDetails {
  systemRoot: string;
  productName: string | null;
  editionId: string | null;
  installationType: string | null;
  currentBuild: string | null;
  /** NT version: 6.1 is 7/2008 R2, 6.2 is 8/2012, 6.3 is 8.1/2012 R2, 10.0 is 10/11/2016+. */
  ntVersion: string;
  controlSet: string;
  fastStartup: boolean;
}

export interface OperatingSystem {
  type: 'linux' | 'windows';
  root: string;
  product: string | null;
  majorVersion: number;
  minorVersion: number;
  architecture: string;
  hostname: string | null;
  /** Guest mountpoint → device, from the guest's own configuration. */
  mountpoints: Record<string, string>;
  linux?: LinuxDetails;
  windows?: WindowsDetails;
}

export interface Inspection {
  image: string;
  partitionTable: 'mbr' | 'gpt' | 'none' | string;
  partitions: PartitionInfo[];
  filesystems: FilesystemInfo[];
  lvm: LvmInfo;
  firmware: 'bios' | 'uefi';
  bootloader: string | null;
  os: OperatingSystem | null;
  guestTools: GuestTool[];
  /** Reasons the guest must not be modified now (a hibernated Windows). Empty when fixable. */
  blockers: string[];
}

export interface InjectionReport {
  image: string;
  target: TargetName;
  dryRun: boolean;
  os: { type: string; product: string | null; architecture: string } | null;
  changes: Change[];
  /** Checks made after applying (initramfs contents); empty for a dry run. */
  verification: { check: string; ok: boolean; detail: string }[];
  warnings: string[];
  startedAt: string;
  elapsedMs: number;
  /** Where the report was stored (the image's folder), when it was. */
  reportPath?: string;
}
