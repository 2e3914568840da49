import type { GuestFs } from '../guestfs.js';
import type { TargetProfile } from '../profile.js';
import type { Change, KernelInfo } from '../types.js';
import { rebuildInitramfsToolsOnHost, type HostRebuildInput } from './initramfs-tools-host.js';

/**
 * How a distribution builds its initramfs. Both strategies make the guest's own tool include the
 * target's modules (a configuration file), so every later rebuild by the guest keeps them. The image
 * itself is extended on the host where the strategy can do that faithfully (initramfs-tools); else
 * the guest's tool rebuilds it inside the appliance, which under TCG costs a minute or more.
 */
export interface InitramfsStrategy {
  readonly name: 'initramfs-tools' | 'dracut';
  /** The configuration change that makes the tool include `modules`; null when already there. */
  configure(current: string | null, modules: string[], profile: TargetProfile): Change | null;
  /** The file `configure` reads and writes. */
  configPath(profile: TargetProfile): string;
  /** The command (run in the guest) that rebuilds the initramfs of one kernel. */
  rebuildCommand(kernel: KernelInfo, initramfsPath: string): string;
  /** Where a kernel's initramfs goes when it has none yet. */
  defaultInitramfsPath(kernel: string): string;
  /**
   * Builds the new image of one kernel on the host and returns its local path; throws
   * InjectionError when it cannot, and the caller falls back to `rebuildCommand`.
   */
  rebuildOnHost?(g: GuestFs, input: HostRebuildInput): Promise<string>;
}

export const initramfsTools: InitramfsStrategy = {
  name: 'initramfs-tools',
  configPath: () => '/etc/initramfs-tools/modules',
  configure(current, modules, profile) {
    // Listed modules are always included and loaded early, whatever MODULES= says (most, dep or list).
    const listed = new Set((current ?? '').split('\n').map((l) => l.trim().split(/\s+/)[0]!.replace(/-/g, '_')).filter((l) => l && !l.startsWith('#')));
    const missing = modules.filter((m) => !listed.has(m));
    if (!missing.length) return null;
    const base = current ?? '';
    const after = `${base}${base && !base.endsWith('\n') ? '\n' : ''}# Added by Ferry: drivers for ${profile.name}\n${missing.join('\n')}\n`;
    return { kind: 'file.write', path: this.configPath(profile), before: current, after, reason: `include the ${profile.name} storage and network drivers in every initramfs` };
  },
  // -u refreshes an existing image, -c creates one for a kernel that has none.
  rebuildCommand: (kernel) => `update-initramfs -${kernel.initramfs ? 'u' : 'c'} -k ${kernel.version}`,
  defaultInitramfsPath: (kernel) => `/boot/initrd.img-${kernel}`,
  rebuildOnHost: rebuildInitramfsToolsOnHost,
};

export const dracut: InitramfsStrategy = {
  name: 'dracut',
  configPath: (profile) => `/etc/dracut.conf.d/90-ferry-${profile.name}.conf`,
  configure(current, modules, profile) {
    const after = `# Added by Ferry: drivers for ${profile.name}, included whatever hostonly finds in the build environment\nadd_drivers+=" ${modules.join(' ')} "\n`;
    if (current === after) return null;
    return { kind: 'file.write', path: this.configPath(profile), before: current, after, reason: `include the ${profile.name} storage and network drivers in every initramfs` };
  },
  rebuildCommand: (kernel, path) => `dracut -f ${path} ${kernel.version}`,
  defaultInitramfsPath: (kernel) => `/boot/initramfs-${kernel}.img`,
};

export function strategyFor(tool: 'initramfs-tools' | 'dracut'): InitramfsStrategy {
  return tool === 'dracut' ? dracut : initramfsTools;
}
