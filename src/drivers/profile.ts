/**
 * A target profile says what a guest needs to boot and reach the network on one hypervisor or cloud:
 * the storage and network drivers, the guest agent, the foreign tools to take out. Profiles are data;
 * the fixers read them and never test a target's name.
 */
export type TargetName = 'kvm' | 'hyperv' | 'vmware' | 'xen' | 'aws' | 'azure';

/** Families of hypervisor guest tools a converted guest may carry. */
export type ToolFamily = 'vmware' | 'virtualbox' | 'xen' | 'hyperv' | 'qemu' | 'azure';

export interface LinuxDrivers {
  /** Kernel modules the initramfs needs to find the boot disk (names with "_" or "-", as modinfo). */
  storage: string[];
  /** Kernel modules for the NIC; loaded from the initramfs too, so network root and early net work. */
  network: string[];
  /** The kernel driver of the target's NIC, which systemd's .link files match on to keep its name. */
  nicDriver: string;
}

/** A package the firstboot service installs, by the guest's package format. */
export interface GuestAgent {
  description: string;
  deb?: string;
  rpm?: string;
}

export type WindowsDriverRole = 'storage' | 'network' | 'bus';

export interface WindowsDriver {
  /** Service name (the Services key). */
  service: string;
  /** The driver's .sys file when its name differs from the service's. */
  file?: string;
  role: WindowsDriverRole;
  /** Load order group of the service, e.g. "SCSI miniport" (boot storage), "NDIS" (network). */
  group: string;
  /** Device setup class GUID, for the CriticalDeviceDatabase and the driver database. */
  classGuid: string;
  /** PCI hardware ids as Windows writes them ("PCI\\VEN_1AF4&DEV_1001"). */
  hardwareIds: string[];
  /** Where the files come from: the --drivers folder/ISO, or Windows itself (must be present). */
  source: 'drivers-path' | 'in-box';
}

export interface WindowsProfile {
  drivers: WindowsDriver[];
  /** Windows installer package (file name pattern in --drivers) run at first boot, when present. */
  agentInstaller?: { description: string; pattern: RegExp };
}

export interface TargetProfile {
  name: TargetName;
  description: string;
  linux: LinuxDrivers;
  linuxAgent?: GuestAgent;
  windows: WindowsProfile;
  /** Guest tools of other platforms that must not run on this target (they hang, spam or fight). */
  removeTools: ToolFamily[];
  /** Constraints on the disk file the target accepts, for callers that write the image. */
  output?: { format: string; options: Record<string, string>; sizeAlignment: number; note: string };
}

/** Setup class GUIDs (devguid.h). */
export const SCSI_ADAPTER_CLASS = '{4D36E97B-E325-11CE-BFC1-08002BE10318}';
export const NET_CLASS = '{4D36E972-E325-11CE-BFC1-08002BE10318}';
export const SYSTEM_CLASS = '{4D36E97D-E325-11CE-BFC1-08002BE10318}';
