import type { FilesystemInfo } from '../types.js';

/**
 * Device names that depend on the disk controller (/dev/sda on SCSI/SATA, /dev/vda on virtio-blk,
 * /dev/xvda on Xen, /dev/nvme0n1 on NVMe, /dev/hda on old IDE) change when a guest moves. References
 * to them in fstab, the kernel command line and the resume configuration become UUID= references.
 */
const UNSTABLE_DEVICE = /^\/dev\/(?:(?:sd|hd|vd|xvd)([a-z]+)(\d*)|nvme(\d+)n\d+(?:p(\d+))?)$/;

/** Maps a guest's device name to the appliance's device for the same disk and partition. */
export function applianceDevice(guestDevice: string, applianceDisks: string[]): string | undefined {
  const m = UNSTABLE_DEVICE.exec(guestDevice);
  if (!m) return undefined;
  const index = m[1] !== undefined ? lettersToIndex(m[1]) : Number(m[3]);
  const partition = m[1] !== undefined ? m[2] : m[4];
  const disk = applianceDisks[index];
  return disk && `${disk}${partition ?? ''}`;
}

export function isUnstableDevice(name: string): boolean {
  return UNSTABLE_DEVICE.test(name);
}

function lettersToIndex(letters: string): number {
  let n = 0;
  for (const c of letters) n = n * 26 + (c.charCodeAt(0) - 96);
  return n - 1;
}

/** Resolves unstable guest device names to `UUID=…`, or reports why it cannot. */
export class DeviceResolver {
  readonly unresolved = new Set<string>();

  constructor(
    private readonly applianceDisks: string[],
    private readonly filesystems: FilesystemInfo[],
  ) {}

  /** `UUID=<uuid>` for an unstable device name; undefined for stable names or unknown devices. */
  uuidRef(guestDevice: string): string | undefined {
    if (!isUnstableDevice(guestDevice)) return undefined;
    const device = applianceDevice(guestDevice, this.applianceDisks);
    const uuid = this.filesystems.find((f) => f.device === device)?.uuid;
    if (!uuid) {
      this.unresolved.add(guestDevice);
      return undefined;
    }
    return `UUID=${uuid}`;
  }

  /** fstab and crypttab: the device field (first for fstab, second for crypttab). */
  rewriteTable(text: string, field: 0 | 1): string {
    return text
      .split('\n')
      .map((line) => {
        if (/^\s*(#|$)/.test(line)) return line;
        const parts = line.split(/(\s+)/); // keeps the original spacing between fields
        const index = field * 2 + (parts[0] === '' ? 2 : 0);
        const ref = parts[index] !== undefined ? this.uuidRef(parts[index]!) : undefined;
        if (!ref) return line;
        parts[index] = ref;
        return parts.join('');
      })
      .join('\n');
  }

  /** root= and resume= on kernel command lines (grub.cfg, /etc/default/grub, BLS entries, …). */
  rewriteCommandLines(text: string): string {
    return text.replace(/\b(root|resume)=(\/dev\/[A-Za-z0-9]+)/g, (whole, key: string, dev: string) => {
      const ref = this.uuidRef(dev);
      return ref ? `${key}=${ref}` : whole;
    });
  }

  /** initramfs-tools' RESUME=… setting. */
  rewriteResumeConf(text: string): string {
    return text.replace(/^(\s*RESUME=)(\S+)/m, (whole, prefix: string, dev: string) => {
      const ref = this.uuidRef(dev.replace(/^"|"$/g, ''));
      return ref ? `${prefix}${ref}` : whole;
    });
  }
}
