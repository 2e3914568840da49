import { createLogger } from '../../log.js';
import { InjectionError } from '../errors.js';
import type { GuestFs } from '../guestfs.js';
import { findInitramfs, initramfsDriverModules, modulesRoot, readIfExists } from '../inspect.js';
import { modulesIn, normaliseModule } from '../initramfs.js';
import type { TargetProfile } from '../profile.js';
import type { Change, Inspection, KernelInfo } from '../types.js';
import { DeviceResolver } from './devices.js';
import { FIRSTBOOT_FILES, firstbootChanges, installPackageScript, type FirstbootTask } from './firstboot.js';
import { strategyFor, type InitramfsStrategy } from './initramfs-strategy.js';
import { NETWORK_CONFIG_GLOBS, macBindingChanges, nicNameChanges, primaryNicName, type NetworkConfig } from './network.js';

/** What a Linux guest needs, planned: the changes in order, and what the rebuilt initramfs must hold. */
export interface LinuxPlan {
  changes: Change[];
  warnings: string[];
  /** Per kernel: the initramfs path and the modules it must contain after the rebuild. */
  expectedModules: { kernel: string; initramfs: string; modules: string[] }[];
}

const log = createLogger('inject');

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
  const root = await modulesRoot(g);
  const perKernel: { kernel: KernelInfo; modules: string[]; modulesDep: string }[] = [];
  for (const kernel of linux.kernels) {
    const modulesDep = (await read(`${root}/${kernel.version}/modules.dep`)) ?? '';
    const available = new Set(modulesIn(modulesDep.split('\n').map((l) => '/' + l.slice(0, l.indexOf(':')))));
    const modules = wanted.filter((m) => available.has(m) && !kernel.builtin.includes(m));
    const missing = wanted.filter((m) => !available.has(m) && !kernel.builtin.includes(m));
    if (missing.length) warnings.push(`kernel ${kernel.version} has no ${missing.join(', ')} (neither module nor built in)`);
    if (!profile.linux.storage.map(normaliseModule).some((m) => available.has(m) || kernel.builtin.includes(m))) {
      warnings.push(`kernel ${kernel.version} has no storage driver for ${profile.name}: it will not find its disk there`);
    }
    modules.forEach((m) => toInclude.add(m));
    perKernel.push({ kernel, modules, modulesDep });
  }
  const configPath = strategy.configPath(profile);
  const config = strategy.configure(await read(configPath), [...toInclude], profile);
  if (config) changes.push(config);
  // Packages purged above that ship initramfs hooks change what the guest's tool would build.
  const hookOwners = strategy.rebuildOnHost ? await packagesWithInitramfsHooks(g, linux.packageFormat, packages, work) : [];
  for (const { kernel, modules, modulesDep } of perKernel) {
    const path = kernel.initramfs?.path ?? strategy.defaultInitramfsPath(kernel.version);
    const present = new Set(kernel.initramfs?.modules ?? []);
    // Rebuild only where something is missing: a guest already fixed for this target is left alone.
    if (!config && modules.every((m) => present.has(m))) continue;
    if (kernel.initramfs && !(await g.exists(`${path}.ferry-bak`))) {
      changes.push({ kind: 'file.copy', path: `${path}.ferry-bak`, source: path, reason: 'keep the previous initramfs' });
    }
    const hostBlocker = !kernel.initramfs ? 'no image to extend' : hookOwners.length ? `purging ${hookOwners.join(', ')} changes the initramfs hooks` : undefined;
    changes.push(await rebuildChange(g, strategy, { kernel, path, modules, modulesDep, root, planned: [...changes], work, hostBlocker }));
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

/**
 * The change that gives one kernel's initramfs the modules: an image built on the host when the
 * strategy can, else the guest's own tool run in the appliance (the reason says why).
 */
async function rebuildChange(
  g: GuestFs,
  strategy: InitramfsStrategy,
  o: { kernel: KernelInfo; path: string; modules: string[]; modulesDep: string; root: string; planned: Change[]; work: string; hostBlocker: string | undefined },
): Promise<Change> {
  let fallback = o.hostBlocker;
  if (strategy.rebuildOnHost && !fallback) {
    const started = Date.now();
    try {
      const source = await strategy.rebuildOnHost(g, {
        version: o.kernel.version,
        initramfs: o.path,
        modules: o.modules,
        modulesRoot: o.root,
        modulesDep: o.modulesDep,
        planned: o.planned,
        work: o.work,
      });
      log.info({ kernel: o.kernel.version, ms: Date.now() - started }, 'initramfs rebuilt on the host');
      return {
        kind: 'file.upload',
        path: o.path,
        source,
        reason: `the initramfs of ${o.kernel.version} extended on the host as ${strategy.name} would: ${o.modules.join(', ')} with their dependencies, loaded at boot`,
      };
    } catch (err) {
      if (!(err instanceof InjectionError)) throw err;
      fallback = err.message;
    }
  }
  if (fallback) log.info({ kernel: o.kernel.version, reason: fallback }, 'initramfs rebuilt in the guest');
  return {
    kind: 'guest.command',
    command: strategy.rebuildCommand(o.kernel, o.path),
    reason: `rebuild the initramfs of ${o.kernel.version} with ${strategy.name}${fallback ? ` in the guest (not on the host: ${fallback})` : ''}`,
  };
}

/** Packages among `packages` that install initramfs-tools hooks or configuration (dpkg's file lists). */
async function packagesWithInitramfsHooks(g: GuestFs, packageFormat: string, packages: string[], work: string): Promise<string[]> {
  if (packageFormat !== 'deb') return [];
  const owners = new Set<string>();
  for (const pkg of packages) {
    for (const list of await globAll(g, [`/var/lib/dpkg/info/${pkg}.list`, `/var/lib/dpkg/info/${pkg}:*.list`])) {
      if (/^\/(usr\/share|etc)\/initramfs-tools\//m.test((await readIfExists(g, list, work)) ?? '')) owners.add(pkg);
    }
  }
  return [...owners];
}

async function globAll(g: GuestFs, patterns: string[]): Promise<string[]> {
  const out: string[] = [];
  for (const p of patterns) out.push(...(await g.lines('glob-expand', [p])));
  return out;
}

