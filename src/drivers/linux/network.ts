import type { TargetProfile } from '../profile.js';
import type { Change } from '../types.js';

/** A network configuration file of the guest and its text. */
export interface NetworkConfig {
  path: string;
  text: string;
}

/**
 * The name the guest's configuration gives its first NIC: ifupdown, netplan, systemd-networkd,
 * NetworkManager keyfiles or RHEL ifcfg files, whichever the guest has. Null when none names one
 * (DHCP on whatever appears, or no network configured).
 */
export function primaryNicName(configs: NetworkConfig[]): string | null {
  for (const { path, text } of configs) {
    let m: RegExpExecArray | null = null;
    if (path.startsWith('/etc/network/interfaces')) m = /^\s*iface\s+((?!lo\b)\S+)\s+inet6?\s/m.exec(text);
    else if (path.startsWith('/etc/netplan/')) m = /^\s*ethernets:\s*\n\s+([A-Za-z0-9_.-]+):/m.exec(text);
    else if (path.startsWith('/etc/systemd/network/') && path.endsWith('.network')) m = /^\s*Name=([A-Za-z0-9_.-]+)\s*$/m.exec(text);
    else if (path.startsWith('/etc/NetworkManager/')) m = /^\s*interface-name=(\S+)/m.exec(text);
    else if (path.includes('/ifcfg-')) m = /^\s*DEVICE="?([^"\s]+)"?/m.exec(text);
    if (m && m[1] !== 'lo') return m[1]!;
  }
  return null;
}

/**
 * Keeps the primary NIC's name on the new hardware: a systemd .link file gives the target's NIC (matched
 * by its kernel driver) the name the configuration uses, so ifupdown, netplan, NetworkManager and ifcfg
 * files all keep working unchanged. With several NICs of that driver only the first takes the name.
 */
export function nicNameChanges(name: string, profile: TargetProfile, existingLink: string | null): Change[] {
  const path = `/etc/systemd/network/10-ferry-${profile.name}-primary.link`;
  const after = [
    `# Written by Ferry: the ${profile.name} NIC (driver ${profile.linux.nicDriver}) keeps the name the network configuration uses.`,
    '[Match]',
    `Driver=${profile.linux.nicDriver}`,
    '',
    '[Link]',
    `Name=${name}`,
    '',
  ].join('\n');
  if (existingLink === after) return [];
  return [{ kind: 'file.write', path, before: existingLink, after, reason: `the primary NIC comes up as ${name} on ${profile.name}` }];
}

/** Drops MAC-address bindings that tie a configuration or a name to the old NIC. */
export function macBindingChanges(configs: NetworkConfig[]): Change[] {
  const changes: Change[] = [];
  for (const { path, text } of configs) {
    if (path.endsWith('70-persistent-net.rules')) {
      changes.push({ kind: 'file.remove', path, before: text, reason: 'udev rules pinning NIC names to the old MAC addresses' });
      continue;
    }
    const pattern = path.includes('/ifcfg-') ? /^\s*HWADDR=.*\n?/gm : path.startsWith('/etc/NetworkManager/') ? /^\s*mac-address=.*\n?/gm : null;
    if (pattern && pattern.test(text)) {
      changes.push({ kind: 'file.write', path, before: text, after: text.replace(pattern, ''), reason: 'the configuration is bound to the old NIC\'s MAC address' });
    }
  }
  return changes;
}

/** Guest globs read for network configuration. */
export const NETWORK_CONFIG_GLOBS = [
  '/etc/network/interfaces',
  '/etc/network/interfaces.d/*',
  '/etc/netplan/*.yaml',
  '/etc/systemd/network/*.network',
  '/etc/NetworkManager/system-connections/*',
  '/etc/sysconfig/network-scripts/ifcfg-*',
  '/etc/sysconfig/network/ifcfg-*',
  '/etc/udev/rules.d/70-persistent-net.rules',
];
