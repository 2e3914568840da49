import { createHash } from 'node:crypto';
import { readFile, readdir } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { InvalidOptionError } from '../../errors.js';
import type { GuestFs } from '../guestfs.js';
import type { TargetProfile, WindowsDriver } from '../profile.js';
import type { Change, Hive, Inspection, RegistryValue } from '../types.js';
import { findDriverPackage, infInstallSection, versionFolders } from './driver-source.js';
import { windowsPaths } from './inspect.js';
import { readKey, readTree, sameValue, subkeys } from './registry.js';

/** Where Ferry stages driver packages in the guest; listed in DevicePath so PnP finds the INFs. */
const STAGING = 'Drivers\\Ferry';

/** Services of foreign guest tools, disabled (Start=4) so they do not start on the new platform. */
const TOOL_SERVICES: Record<string, string[]> = {
  vmware: ['VMTools', 'vmvss', 'VGAuthService', 'vm3dservice', 'VMwareCAFManagementAgentHost', 'VMwareCAFCommAmqpListener'],
  virtualbox: ['VBoxService'],
  xen: ['xenagent', 'XenSvc', 'xensvc', 'XenPVInstall'],
  qemu: ['QEMU-GA', 'QEMU Guest Agent VSS Provider'],
  azure: ['WindowsAzureGuestAgent', 'RdAgent'],
  hyperv: [],
};

const FIRSTBOOT_SERVICE = 'FerryFirstboot';

export interface WindowsPlan {
  changes: Change[];
  warnings: string[];
}

/**
 * WindowsFixer: plans the files and registry values a Windows guest needs for the target. Hives are
 * read from local copies (downloaded once); every registry change carries its value before and after.
 */
export async function planWindows(g: GuestFs, inspection: Inspection, profile: TargetProfile, driversPath: string | undefined, work: string): Promise<WindowsPlan> {
  const os = inspection.os!;
  const win = os.windows!;
  const paths = await windowsPaths(g);
  const system = join(work, 'SYSTEM');
  const software = join(work, 'SOFTWARE');
  await g.run('download', [paths.system, system]);
  await g.run('download', [paths.software, software]);
  const hiveFile: Record<Hive, string> = { SYSTEM: system, SOFTWARE: software };
  const changes: Change[] = [];
  const warnings: string[] = [];
  const cs = win.controlSet;
  const root = paths.systemRoot; // guest path of C:\Windows, e.g. /Windows
  const ntAtLeast = (major: number, minor: number) => os.majorVersion > major || (os.majorVersion === major && os.minorVersion >= minor);
  const usesDriverDatabase = ntAtLeast(6, 2);

  const cache = new Map<string, Map<string, RegistryValue> | null>();
  const set = async (hive: Hive, key: string, name: string, after: RegistryValue, reason: string) => {
    const cacheKey = `${hive}\\${key}`.toLowerCase();
    if (!cache.has(cacheKey)) cache.set(cacheKey, await readKey(hiveFile[hive], key));
    const before = cache.get(cacheKey)?.get(name) ?? null;
    if (!sameValue(before, after)) changes.push({ kind: 'registry.set', hive, key, name, before, after, reason });
  };
  const dword = (data: number): RegistryValue => ({ type: 'REG_DWORD', data });
  const sz = (data: string): RegistryValue => ({ type: 'REG_SZ', data });

  const needsFolder = profile.windows.drivers.some((d) => d.source === 'drivers-path');
  if (needsFolder && !driversPath) {
    throw new InvalidOptionError(`--drivers is required for Windows on ${profile.name}: a folder with the ${profile.windows.drivers.filter((d) => d.source === 'drivers-path').map((d) => d.service).join(', ')} drivers`, { field: 'drivers' });
  }
  const server = (win.installationType ?? '').toLowerCase().includes('server');
  const versions = versionFolders(`${os.majorVersion}.${os.minorVersion}`, server, Number(win.currentBuild ?? 0));
  let nextOem = usesDriverDatabase ? await nextOemNumber(system) : 0;

  for (const driver of profile.windows.drivers) {
    const file = driver.file ?? `${driver.service}.sys`;
    const reason = `${driver.service} (${driver.role}) for ${profile.name}`;
    if (driver.source === 'in-box') {
      const present = await g.tryRun('case-sensitive-path', [`${root}/system32/drivers/${file}`]);
      if (!present || !(await g.isFile(present.trim()))) {
        warnings.push(`${file} is not in this Windows (${os.product ?? win.ntVersion}); it cannot boot on ${profile.name} without it`);
        continue;
      }
    } else {
      const pkg = await findDriverPackage(driversPath!, file, os.architecture, versions);
      if (!pkg) {
        const message = `no ${file} for Windows ${win.ntVersion} ${os.architecture} (folders tried: ${versions.join(', ') || 'none'}) in ${driversPath}`;
        if (driver.role === 'network') {
          warnings.push(message);
          continue;
        }
        throw new InvalidOptionError(message, { field: 'drivers' });
      }
      changes.push({ kind: 'file.upload', path: `${root}/System32/drivers/${file.toLowerCase()}`, source: pkg.sys, reason: `${reason}: the driver binary` });
      for (const f of pkg.files) {
        changes.push({ kind: 'file.upload', path: `${root}/${STAGING.replace(/\\/g, '/')}/${driver.service}/${basename(f)}`, source: f, reason: `${reason}: the package, for Plug and Play` });
      }
      if (usesDriverDatabase && driver.role !== 'network' && pkg.inf) {
        const registered = await driverDatabaseChanges(driver, pkg.inf, pkg.files, `oem${nextOem}.inf`, os.architecture, root, set, changes, reason);
        if (registered) nextOem++;
        else warnings.push(`${basename(pkg.inf)} lists none of ${driver.hardwareIds.join(', ')}: not added to the driver database`);
      }
    }
    if (driver.role === 'network') continue;
    // A boot-start service: loaded by the boot loader with the kernel, before any disk is needed.
    const service = `${cs}\\Services\\${driver.service}`;
    await set('SYSTEM', service, 'Type', dword(1), `${reason}: a kernel driver`);
    await set('SYSTEM', service, 'Start', dword(0), `${reason}: load at boot`);
    await set('SYSTEM', service, 'ErrorControl', dword(1), reason);
    await set('SYSTEM', service, 'Group', sz(driver.group), `${reason}: its load-order group`);
    await set('SYSTEM', service, 'ImagePath', { type: 'REG_EXPAND_SZ', data: `system32\\drivers\\${file.toLowerCase()}` }, reason);
    if (driver.role === 'storage' && driver.hardwareIds.some((h) => h.startsWith('PCI\\'))) {
      await set('SYSTEM', `${service}\\Parameters\\PnpInterface`, '5', dword(1), `${reason}: a PCI storport miniport`);
    }
    if (!usesDriverDatabase) {
      // Before Windows 8 the boot loader matches boot devices to services through this database.
      for (const id of driver.hardwareIds) {
        const key = `${cs}\\Control\\CriticalDeviceDatabase\\${id.toLowerCase().replace(/\\/g, '#')}`;
        await set('SYSTEM', key, 'Service', sz(driver.service), `${reason}: bind the device at boot`);
        await set('SYSTEM', key, 'ClassGUID', sz(driver.classGuid), reason);
      }
    }
  }

  if (needsFolder && driversPath) {
    const current = (await readKey(software, 'Microsoft\\Windows\\CurrentVersion'))?.get('DevicePath');
    const text = current && typeof current.data === 'string' ? current.data : '%SystemRoot%\\inf';
    const entry = `%SystemRoot%\\${STAGING}`;
    if (!text.toLowerCase().split(';').includes(entry.toLowerCase())) {
      await set('SOFTWARE', 'Microsoft\\Windows\\CurrentVersion', 'DevicePath', { type: 'REG_EXPAND_SZ', data: `${text};${entry}` }, 'Plug and Play searches the staged driver packages');
    }
  }

  // Foreign tools: their services are disabled now; their uninstallers run at first boot.
  const uninstall: string[] = [];
  for (const family of profile.removeTools) {
    for (const name of TOOL_SERVICES[family] ?? []) {
      const key = `${cs}\\Services\\${name}`;
      const values = await readKey(system, key);
      if (values) await set('SYSTEM', key, 'Start', dword(4), `disable ${family} tools (${name}) on ${profile.name}`);
    }
  }
  const unwanted = new Set(inspection.guestTools.filter((t) => (profile.removeTools as string[]).includes(t.family)).map((t) => t.name));
  for (const base of ['Microsoft\\Windows\\CurrentVersion\\Uninstall', 'WOW6432Node\\Microsoft\\Windows\\CurrentVersion\\Uninstall']) {
    for (const [, values] of await readTree(software, base)) {
      const name = values.get('DisplayName');
      if (!name || typeof name.data !== 'string' || !unwanted.has(name.data)) continue;
      const command = uninstallCommand(values);
      if (command) uninstall.push(command);
    }
  }
  const installer = profile.windows.agentInstaller;
  let agentInstall: { local: string; file: string } | undefined;
  if (installer && driversPath) {
    const found = await findFile(driversPath, installer.pattern);
    if (found) agentInstall = { local: found, file: basename(found) };
    else warnings.push(`no ${installer.description} installer in ${driversPath}: install it after the first boot`);
  }
  if (uninstall.length || agentInstall) {
    const lines = ['@echo off', 'rem Written by Ferry: first-boot tasks after a move to new hardware.', ...uninstall];
    if (agentInstall) {
      changes.push({ kind: 'file.upload', path: `${root}/Ferry/${agentInstall.file}`, source: agentInstall.local, reason: `the ${installer!.description} installer` });
      lines.push(`msiexec /i "%SystemRoot%\\Ferry\\${agentInstall.file}" /qn /norestart`);
    }
    // The service removes itself: the script runs once.
    lines.push(`sc delete ${FIRSTBOOT_SERVICE}`);
    const script = `${root}/Ferry/firstboot.cmd`;
    changes.push({ kind: 'file.write', path: script, before: null, after: lines.join('\r\n') + '\r\n', reason: 'first-boot tasks: uninstall foreign tools, install the agent' });
    const key = `${cs}\\Services\\${FIRSTBOOT_SERVICE}`;
    await set('SYSTEM', key, 'Type', dword(0x10), 'first-boot task runner (runs once as LocalSystem)');
    await set('SYSTEM', key, 'Start', dword(2), 'first-boot task runner: start automatically');
    await set('SYSTEM', key, 'ErrorControl', dword(0), 'first-boot task runner');
    await set('SYSTEM', key, 'ObjectName', sz('LocalSystem'), 'first-boot task runner');
    await set('SYSTEM', key, 'ImagePath', { type: 'REG_EXPAND_SZ', data: '%SystemRoot%\\System32\\cmd.exe /c "%SystemRoot%\\Ferry\\firstboot.cmd"' }, 'first-boot task runner');
  }
  return { changes, warnings };
}

/**
 * Windows 8 and later match boot devices through SYSTEM\DriverDatabase: the device id points at an
 * oemN.inf, which names a driver package and its configuration (install section) and service. The
 * package also goes to the DriverStore and the INF to Windows\INF under its oem name.
 */
async function driverDatabaseChanges(
  driver: WindowsDriver,
  inf: string,
  files: string[],
  oemInf: string,
  arch: string,
  root: string,
  set: (hive: Hive, key: string, name: string, after: RegistryValue, reason: string) => Promise<void>,
  changes: Change[],
  reason: string,
): Promise<boolean> {
  const install = await infInstallSection(inf, driver.hardwareIds);
  if (!install) return false;
  const infName = basename(inf).toLowerCase();
  const archName = arch === 'x86_64' ? 'amd64' : arch === 'i386' ? 'x86' : 'arm64';
  // The package folder name is "<inf>_<arch>_<hash>"; Windows hashes the package, any stable hash works.
  const hash = createHash('sha256').update(await readFile(inf)).digest('hex').slice(0, 16);
  const pkg = `${infName}_${archName}_${hash}`;
  const repo = `${root}/System32/DriverStore/FileRepository/${pkg}`;
  for (const f of files) changes.push({ kind: 'file.upload', path: `${repo}/${basename(f).toLowerCase()}`, source: f, reason: `${reason}: the driver store package` });
  changes.push({ kind: 'file.upload', path: `${root}/INF/${oemInf}`, source: inf, reason: `${reason}: the INF under its oem name` });
  const why = `${reason}: the driver database (Windows 8 and later)`;
  const db = 'DriverDatabase';
  for (const id of driver.hardwareIds) await set('SYSTEM', `${db}\\DeviceIds\\${id}`, oemInf, { type: 'REG_BINARY', data: '01ff0000' }, why);
  await set('SYSTEM', `${db}\\DriverInfFiles\\${oemInf}`, '', { type: 'REG_MULTI_SZ', data: [pkg] }, why);
  await set('SYSTEM', `${db}\\DriverInfFiles\\${oemInf}`, 'Active', { type: 'REG_SZ', data: pkg }, why);
  await set('SYSTEM', `${db}\\DriverInfFiles\\${oemInf}`, 'Configurations', { type: 'REG_MULTI_SZ', data: [install.section] }, why);
  await set('SYSTEM', `${db}\\DriverPackages\\${pkg}`, '', { type: 'REG_SZ', data: oemInf }, why);
  await set('SYSTEM', `${db}\\DriverPackages\\${pkg}`, 'InfName', { type: 'REG_SZ', data: infName }, why);
  await set('SYSTEM', `${db}\\DriverPackages\\${pkg}`, 'OemPath', { type: 'REG_SZ', data: `C:\\Windows\\System32\\DriverStore\\FileRepository\\${pkg}` }, why);
  await set('SYSTEM', `${db}\\DriverPackages\\${pkg}\\Configurations\\${install.section}`, 'Service', { type: 'REG_SZ', data: driver.service }, why);
  await set('SYSTEM', `${db}\\DriverPackages\\${pkg}\\Configurations\\${install.section}`, 'ConfigFlags', { type: 'REG_DWORD', data: 0 }, why);
  for (const id of driver.hardwareIds) {
    await set('SYSTEM', `${db}\\DriverPackages\\${pkg}\\Descriptors\\${id}`, 'Configuration', { type: 'REG_SZ', data: install.section }, why);
  }
  return true;
}

/** The first oemN.inf name the driver database does not use yet. */
async function nextOemNumber(systemHive: string): Promise<number> {
  const used = new Set((await subkeys(systemHive, 'DriverDatabase\\DriverInfFiles')).map((k) => k.toLowerCase()));
  let n = 1;
  while (used.has(`oem${n}.inf`)) n++;
  return n;
}

/** A silent uninstall command from an Uninstall entry (MSI product codes get msiexec /x … /qn). */
function uninstallCommand(values: Map<string, RegistryValue>): string | null {
  const quiet = values.get('QuietUninstallString');
  if (quiet && typeof quiet.data === 'string') return quiet.data;
  const plain = values.get('UninstallString');
  if (!plain || typeof plain.data !== 'string') return null;
  const msi = /msiexec(?:\.exe)?\s+\/[XI]\s*(\{[0-9A-F-]+\})/i.exec(plain.data);
  return msi ? `msiexec /x ${msi[1]} /qn /norestart` : plain.data;
}

async function findFile(root: string, pattern: RegExp): Promise<string | undefined> {
  for (const entry of await readdir(root, { withFileTypes: true, recursive: true })) {
    if (entry.isFile() && pattern.test(entry.name)) return join(entry.parentPath, entry.name);
  }
  return undefined;
}

/** After applying: reads the hives back and checks every planned registry value is there. */
export async function verifyWindows(g: GuestFs, changes: Change[], work: string): Promise<{ check: string; ok: boolean; detail: string }[]> {
  const registryChanges = changes.filter((c): c is Extract<Change, { kind: 'registry.set' }> => c.kind === 'registry.set');
  if (!registryChanges.length) return [];
  const paths = await windowsPaths(g);
  const local: Record<Hive, string> = { SYSTEM: join(work, 'verify-SYSTEM'), SOFTWARE: join(work, 'verify-SOFTWARE') };
  await g.run('download', [paths.system, local.SYSTEM]);
  await g.run('download', [paths.software, local.SOFTWARE]);
  let wrong = 0;
  const details: string[] = [];
  for (const c of registryChanges) {
    const value = (await readKey(local[c.hive], c.key))?.get(c.name);
    if (!sameValue(value, c.after)) {
      wrong++;
      details.push(`${c.hive}\\${c.key}\\${c.name}`);
    }
  }
  return [{ check: `${registryChanges.length} registry values read back from the hives`, ok: wrong === 0, detail: wrong ? `differ: ${details.join(', ')}` : 'all as planned' }];
}
