import type { GuestFs } from '../guestfs.js';
import { findInitramfs, initramfsDriverModules, modulesRoot, readGuestFile } from '../inspect.js';
import { modulesIn, normaliseModule } from '../initramfs.js';
import type { TargetProfile } from '../profile.js';
import type { Change, Inspection, KernelInfo } from '../types.js';
import { DeviceResolver } from './devices.js';
import { FIRSTBOOT_FILES, firstbootChanges, installPackageScript, type FirstbootTask } from './firstboot.js';
import { strategyFor } from './initramfs-strategy.js';
import { NETWORK_CONFIG_GLOBS, macBindingChanges, nicNameChanges, primaryNicName, type NetworkConfig } from './network.js';

/** What a Linux guest needs, planned: the changes in order, and what the rebuilt initramfs must hold. */
export interface LinuxPlan {
  changes: Change[];
  warnings: string[];
  /** Per kernel: the initramfs path and the modules it must contain after the rebuild. */
  expectedModules: { kernel: string; initramfs: string; modules: string[] }[];
}

/** Files holding kernel command lines whose root= and resume= may name devices. */
const COMMAND_LINE_FILES = ['/etc/default/grub', '/boot/grub/grub.cfg', '/boot/grub2/grub.cfg', '/etc/kernel/cmdline'];
const COMMAND_LINE_GLOBS = ['/boot/loader/entries/*.conf', '/boot/efi/EFI/*/grub.cfg'];
/** LVM's caches of device names and ids: stale ones hide the physical volumes on new hardware. */
const LVM_CACHES = ['/etc/lvm/cache/.cache', '/etc/lvm/devices/system.devices'];

/** Services of tarball-installed tools, disabled now; their own uninstaller runs at first boot. */
const TOOL_FILE_INSTALLS: Record<string, { services: string[]; uninstall: (folder: string) => string }> = {
  virtualbox: { services: ['/etc/systemd/system/*.wants/vboxadd*.service'], uninstall: (folder) => `sh ${folder}/uninstall.sh` },
  vmware: { services: ['/etc/systemd/system/*.wants/vmware-tools*.service', '/etc/rc?.d/S*vmware-tools*'], uninstall: (script) => script },
};

/**
 * LinuxFixer: plans everything a Linux guest needs for the target. Reading only — `applyChanges` does
 * the writing — so a dry run and a real run produce the same list.
 */
export async function planLinux(g: GuestFs, inspection: Inspection, profile: TargetProfile, work: string): Promise<LinuxPlan> {
  const os = inspection.os!;
  const linux = os.linux!;
  const changes: Change[] = [];
  const warnings: string[] = [];
  const read = (path: string) => readIfExists(g, path, work);

  // Device names → UUIDs, first: the initramfs rebuild below picks up the resume setting.
  const resolver = new DeviceResolver(await g.lines('list-devices'), inspection.filesystems);
  const rewrite = async (path: string, transform: (text: string) => string, reason: string) => {
    const before = await read(path);
    if (before === null) return;
    const after = transform(before);
    if (after !== before) changes.push({ kind: 'file.write', path, before, after, reason });
  };
  await rewrite('/etc/fstab', (t) => resolver.rewriteTable(t, 0), 'mount filesystems by UUID: device names change with the disk controller');
  await rewrite('/etc/crypttab', (t) => resolver.rewriteTable(t, 1), 'open encrypted volumes by UUID');
  const commandLineFiles = [...COMMAND_LINE_FILES, ...(await globAll(g, COMMAND_LINE_GLOBS))];
  for (const path of commandLineFiles) await rewrite(path, (t) => resolver.rewriteCommandLines(t), 'root= and resume= by UUID on the kernel command line');
  await rewrite('/etc/initramfs-tools/conf.d/resume', (t) => resolver.rewriteResumeConf(t), 'resume from the swap device by UUID');
  for (const device of resolver.unresolved) warnings.push(`${device} is referenced by the guest but has no filesystem UUID on this disk; left as is`);

  for (const path of LVM_CACHES) {
    const before = await read(path);
    if (before !== null) changes.push({ kind: 'file.remove', path, before, reason: 'stale LVM device cache: LVM rescans the new devices' });
  }

  // The primary NIC keeps its configured name; MAC bindings to the old NIC go.
  const networkConfigs: NetworkConfig[] = [];
  for (const path of await globAll(g, NETWORK_CONFIG_GLOBS)) {
    if (!(await g.isFile(path))) continue;
    networkConfigs.push({ path, text: (await read(path)) ?? '' });
  }
  const nic = primaryNicName(networkConfigs);
  if (nic) changes.push(...nicNameChanges(nic, profile, await read(`/etc/systemd/network/10-ferry-${profile.name}-primary.link`)));
  changes.push(...macBindingChanges(networkConfigs));

  // Foreign guest tools: packages are purged now; tarball installs are disabled now and uninstalled at first boot.
  const firstboot: FirstbootTask[] = [];
  const unwanted = inspection.guestTools.filter((t) => (profile.removeTools as string[]).includes(t.family));
  const packages = unwanted.filter((t) => t.kind === 'package').map((t) => t.name);
  if (packages.length) {
    const command = linux.packageFormat === 'rpm' ? `rpm -e --nodeps ${packages.join(' ')}` : `dpkg --purge ${packages.join(' ')}`;
    changes.push({ kind: 'guest.command', command, reason: `remove guest tools that do not belong on ${profile.name} (${packages.join(', ')})` });
  }
  for (const tool of unwanted.filter((t) => t.kind === 'files')) {
    const install = TOOL_FILE_INSTALLS[tool.family];
    if (!install) continue;
    for (const link of await globAll(g, install.services)) {
      changes.push({ kind: 'file.remove', path: link, before: null, reason: `disable ${tool.family} tools (${tool.name}) until their uninstaller runs` });
    }
    firstboot.push({ name: `10-uninstall-${tool.family}-tools.sh`, script: install.uninstall(tool.name), reason: `uninstall ${tool.family} tools (${tool.name}) at first boot` });
  }

  const agent = profile.linuxAgent;
  if (agent && !inspection.guestTools.some((t) => t.name === agent.deb || t.name === agent.rpm)) {
    const script = installPackageScript(linux.packageFormat, agent.deb, agent.rpm);
    if (script) firstboot.push({ name: `20-install-${profile.name}-agent.sh`, script, reason: `install the ${agent.description} at first boot (needs the network)` });
  }
  if (firstboot.length) {
    if (await g.exists('/bin/systemctl')) {
      changes.push(...firstbootChanges(firstboot, { runner: await read(FIRSTBOOT_FILES.runner), unit: await read(FIRSTBOOT_FILES.unit) }));
    } else {
      warnings.push(`no systemd in the guest: first-boot tasks not queued (${firstboot.map((t) => t.reason).join('; ')})`);
    }
  }

  // The initramfs of every kernel: configure the guest's tool, keep the old image, rebuild.
  const expectedModules: LinuxPlan['expectedModules'] = [];
  if (!linux.initramfsTool) {
    warnings.push('neither initramfs-tools nor dracut is installed: the initramfs cannot be rebuilt');
    return { changes, warnings, expectedModules };
  }
  const strategy = strategyFor(linux.initramfsTool);
  const wanted = [...profile.linux.storage, ...profile.linux.network].map(normaliseModule);
  const toInclude = new Set<string>();
  const perKernel: { kernel: KernelInfo; modules: string[] }[] = [];
  for (const kernel of linux.kernels) {
    const available = await availableModules(g, kernel.version, work);
    const modules = wanted.filter((m) => available.has(m) && !kernel.builtin.includes(m));
    const missing = wanted.filter((m) => !available.has(m) && !kernel.builtin.includes(m));
    if (missing.length) warnings.push(`kernel ${kernel.version} has no ${missing.join(', ')} (neither module nor built in)`);
    if (!profile.linux.storage.map(normaliseModule).some((m) => available.has(m) || kernel.builtin.includes(m))) {
      warnings.push(`kernel ${kernel.version} has no storage driver for ${profile.name}: it will not find its disk there`);
    }
    modules.forEach((m) => toInclude.add(m));
    perKernel.push({ kernel, modules });
  }
  const configPath = strategy.configPath(profile);
  const config = strategy.configure(await read(configPath), [...toInclude], profile);
  if (config) changes.push(config);
  for (const { kernel, modules } of perKernel) {
    const path = kernel.initramfs?.path ?? strategy.defaultInitramfsPath(kernel.version);
    const present = new Set(kernel.initramfs?.modules ?? []);
    // Rebuild only where something is missing: a guest already fixed for this target is left alone.
    if (!config && modules.every((m) => present.has(m))) continue;
    if (kernel.initramfs && !(await g.exists(`${path}.ferry-bak`))) {
      changes.push({ kind: 'file.copy', path: `${path}.ferry-bak`, source: path, reason: 'keep the previous initramfs' });
    }
    changes.push({ kind: 'guest.command', command: strategy.rebuildCommand(kernel, path), reason: `rebuild the initramfs of ${kernel.version} with ${strategy.name}` });
    expectedModules.push({ kernel: kernel.version, initramfs: path, modules });
  }
  return { changes, warnings, expectedModules };
}

/** After the rebuild: lists each new initramfs and checks the target's modules are in it. */
export async function verifyLinux(g: GuestFs, plan: LinuxPlan, work: string): Promise<{ check: string; ok: boolean; detail: string }[]> {
  const results = [];
  for (const expected of plan.expectedModules) {
    const path = (await findInitramfs(g, expected.kernel)) ?? expected.initramfs;
    const present = new Set(await initramfsDriverModules(g, path, work));
    const missing = expected.modules.filter((m) => !present.has(m));
    results.push({
      check: `initramfs ${path} contains ${expected.modules.join(', ')}`,
      ok: missing.length === 0,
      detail: missing.length ? `missing: ${missing.join(', ')}` : `present: ${[...present].join(', ')}`,
    });
  }
  return results;
}

async function availableModules(g: GuestFs, kernel: string, work: string): Promise<Set<string>> {
  const dep = await readIfExists(g, `${await modulesRoot(g)}/${kernel}/modules.dep`, work);
  if (dep === null) return new Set();
  return new Set(modulesIn(dep.split('\n').map((l) => '/' + l.slice(0, l.indexOf(':')))));
}

async function globAll(g: GuestFs, patterns: string[]): Promise<string[]> {
  const out: string[] = [];
  for (const p of patterns) out.push(...(await g.lines('glob-expand', [p])));
  return out;
}

/** A guest text file's content, or null when it does not exist. */
export async function readIfExists(g: GuestFs, path: string, work: string): Promise<string | null> {
  if (!(await g.isFile(path))) return null;
  return readGuestFile(g, path, work);
}
