import type { TargetProfile } from '../profile.js';
import type { Change, KernelInfo } from '../types.js';

/**
 * How a distribution builds its initramfs. Both strategies make the guest's own tool include the
 * target's modules (a configuration file), then rebuild every kernel's image with that tool, run
 * inside the guest, so the result is exactly what the guest would build itself.
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
