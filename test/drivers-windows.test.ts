import { execFile } from 'node:child_process';
import { copyFile, mkdir, rm, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Change, InjectionReport } from '../src/drivers/types.js';
import { fileDigest, ferry, requireTool, tempDir } from './helpers/env.js';
import { syntheticWindowsImage } from './helpers/windows-image.js';

const run = promisify(execFile);
const TIMEOUT = 300_000;

/** A virtio-win style tree: <driver>/<version>/<arch>/ with .sys, .inf, .cat for Windows 7 and 10. */
async function fakeVirtioWin(root: string): Promise<void> {
  const drivers = [
    { name: 'viostor', ids: 'PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00, PCI\\VEN_1AF4&DEV_1001', section: 'rhelscsi_inst' },
    { name: 'vioscsi', ids: 'PCI\\VEN_1AF4&DEV_1004&SUBSYS_00081AF4&REV_00, PCI\\VEN_1AF4&DEV_1004', section: 'scsi_inst' },
    { name: 'netkvm', ids: 'PCI\\VEN_1AF4&DEV_1000&SUBSYS_00011AF4&REV_00', section: 'kvmnet6.ndi' },
  ];
  for (const d of drivers) {
    for (const folder of ['w7/amd64', 'w10/amd64', 'w10/x86']) {
      const dir = join(root, d.name === 'netkvm' ? 'NetKVM' : d.name, folder);
      await mkdir(dir, { recursive: true });
      await writeFile(join(dir, `${d.name}.sys`), `MZ fake ${d.name} for ${folder}`);
      await writeFile(join(dir, `${d.name}.cat`), `catalog ${d.name}`);
      await writeFile(join(dir, `${d.name}.inf`), `[Manufacturer]\r\n%VENDOR% = Models,NTamd64\r\n\r\n[Models.NTamd64]\r\n%Desc% = ${d.section}, ${d.ids}\r\n`);
    }
  }
}

/** Copies a file out of the NTFS partition (1 MiB into the disk) with ntfscat: no libguestfs involved. */
async function ntfsRead(disk: string, dir: string, path: string): Promise<Buffer> {
  const partition = join(dir, 'partition.img');
  await run('dd', [`if=${disk}`, `of=${partition}`, 'bs=1M', 'skip=1', 'status=none']);
  const { stdout } = await run('ntfscat', [partition, path], { encoding: 'buffer', maxBuffer: 256 * 1024 * 1024 });
  return stdout;
}

async function hivexget(hive: string, key: string, value: string): Promise<string> {
  return (await run('hivexget', [hive, key, value])).stdout.trim();
}

const summary = (changes: Change[]) => changes.map((c) => `${c.kind} ${'path' in c ? c.path : 'key' in c ? `${c.key}\\${c.name}` : ''}`);

describe('Windows driver injection on synthetic NTFS images', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let virtioWin: string;
  let win10: string;

  beforeAll(async () => {
    requireTool('ntfscat', 'ntfs-3g');
    requireTool('hivexget', 'libhivex-bin');
    ({ dir, cleanup } = await tempDir());
    virtioWin = join(dir, 'virtio-win');
    await fakeVirtioWin(virtioWin);
    win10 = await syntheticWindowsImage(join(dir, 'w10'), { ntVersion: '10.0', productName: 'Windows 10 Pro', editionId: 'Professional', vmwareTools: true });
  }, TIMEOUT);
  afterAll(() => cleanup());

  it('kvm on Windows 10: --dry-run lists the changes and changes nothing; the run writes the same changes', async () => {
    const disk = join(dir, 'w10-kvm.raw');
    await copyFile(win10, disk);
    const before = await fileDigest(disk);
    const dry = await ferry(['inject', '--target', 'kvm', '--drivers', virtioWin, '--dry-run', '--output', 'json', disk], { timeoutMs: TIMEOUT });
    expect(dry.code, dry.stderr).toBe(0);
    const plan = JSON.parse(dry.stdout) as InjectionReport;
    expect(await fileDigest(disk)).toBe(before);

    const real = await ferry(['inject', '--target', 'kvm', '--drivers', virtioWin, '--output', 'json', disk], { timeoutMs: TIMEOUT });
    expect(real.code, real.stderr).toBe(0);
    const report = JSON.parse(real.stdout) as InjectionReport;
    expect(summary(report.changes)).toEqual(summary(plan.changes));
    expect(report.verification.every((v) => v.ok), JSON.stringify(report.verification)).toBe(true);
    expect(report.os).toEqual({ type: 'windows', product: 'Windows 10 Pro', architecture: 'x86_64' });

    const work = join(dir, 'w10-check');
    await mkdir(work);
    const system = join(work, 'SYSTEM');
    const software = join(work, 'SOFTWARE');
    await writeFile(system, await ntfsRead(disk, work, 'Windows/System32/config/SYSTEM'));
    await writeFile(software, await ntfsRead(disk, work, 'Windows/System32/config/SOFTWARE'));
    const svc = '\\ControlSet001\\Services\\viostor';
    expect(await hivexget(system, svc, 'Start')).toBe('0');
    expect(await hivexget(system, svc, 'Type')).toBe('1');
    expect(await hivexget(system, svc, 'Group')).toBe('SCSI miniport');
    expect(await hivexget(system, svc, 'ImagePath')).toBe('system32\\drivers\\viostor.sys');
    expect(await hivexget(system, `${svc}\\Parameters\\PnpInterface`, '5')).toBe('1');
    expect(await hivexget(system, '\\ControlSet001\\Services\\vioscsi', 'Start')).toBe('0');
    // Windows 8 and later: the driver database, not the CriticalDeviceDatabase.
    expect((await run('hivexget', [system, '\\DriverDatabase\\DeviceIds\\PCI\\VEN_1AF4&DEV_1001'])).stdout).toMatch(/"oem1\.inf"=hex\(3\):01,ff,00,00/);
    expect(await hivexget(system, '\\DriverDatabase\\DriverInfFiles\\oem1.inf', 'Configurations')).toBe('rhelscsi_inst');
    expect(await hivexget(system, '\\DriverDatabase\\DriverInfFiles\\oem2.inf', 'Configurations')).toBe('scsi_inst');
    await expect(run('hivexget', [system, '\\ControlSet001\\Control\\CriticalDeviceDatabase\\pci#ven_1af4&dev_1001', 'Service'])).rejects.toThrow();
    // Foreign tools: the VMware service is disabled and its uninstall queued for the first boot.
    expect(await hivexget(system, '\\ControlSet001\\Services\\VMTools', 'Start')).toBe('4');
    expect(await hivexget(system, '\\ControlSet001\\Services\\FerryFirstboot', 'Start')).toBe('2');
    expect((await ntfsRead(disk, work, 'Windows/Ferry/firstboot.cmd')).toString()).toContain('msiexec /x {FE2F6A2C-196E-4210-9C04-2B1BC21F07EF} /qn /norestart');
    expect(await hivexget(software, '\\Microsoft\\Windows\\CurrentVersion', 'DevicePath')).toBe('%SystemRoot%\\inf;%SystemRoot%\\Drivers\\Ferry');
    // The driver files: the Windows 10 amd64 build, in drivers, the staging folder and the driver store.
    expect((await ntfsRead(disk, work, 'Windows/System32/drivers/viostor.sys')).toString()).toBe('MZ fake viostor for w10/amd64');
    expect((await ntfsRead(disk, work, 'Windows/Drivers/Ferry/netkvm/netkvm.inf')).toString()).toContain('kvmnet6.ndi');
    expect((await ntfsRead(disk, work, 'Windows/INF/oem1.inf')).toString()).toContain('rhelscsi_inst');
  }, 2 * TIMEOUT);

  it('takes the drivers from a virtio-win ISO as from the folder, and refuses a file that is not an ISO', async () => {
    requireTool('xorriso', 'xorriso');
    const iso = join(dir, 'virtio-win.iso');
    // Rock Ridge keeps the names as they are, as in Red Hat's virtio-win.iso; a symlink to a host file is dropped.
    await symlink('/etc/hostname', join(virtioWin, 'viostor', 'w10', 'amd64', 'hostname.inf'));
    await run('xorriso', ['-as', 'mkisofs', '-R', '-J', '-quiet', '-o', iso, virtioWin]);
    await rm(join(virtioWin, 'viostor', 'w10', 'amd64', 'hostname.inf'));
    const disk = join(dir, 'w10-iso.raw');
    await copyFile(win10, disk);
    const fromFolder = await ferry(['inject', '--target', 'kvm', '--drivers', virtioWin, '--dry-run', '--output', 'json', disk], { timeoutMs: TIMEOUT });
    const fromIso = await ferry(['inject', '--target', 'kvm', '--drivers', iso, '--dry-run', '--output', 'json', disk], { timeoutMs: TIMEOUT });
    expect(fromIso.code, fromIso.stderr).toBe(0);
    const isoChanges = (JSON.parse(fromIso.stdout) as InjectionReport).changes;
    expect(summary(isoChanges)).toEqual(summary((JSON.parse(fromFolder.stdout) as InjectionReport).changes));
    expect(summary(isoChanges).some((c) => c.includes('hostname'))).toBe(false);

    const notIso = join(dir, 'drivers.zip');
    await writeFile(notIso, 'PK not an iso');
    const refused = await ferry(['inject', '--target', 'kvm', '--drivers', notIso, '--dry-run', disk], { timeoutMs: TIMEOUT });
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/neither a folder nor an ISO 9660 image/);
  }, 2 * TIMEOUT);

  it('kvm on Windows 7: the drivers for 7 and the CriticalDeviceDatabase', async () => {
    const disk = await syntheticWindowsImage(join(dir, 'w7'), { ntVersion: '6.1', productName: 'Windows 7 Professional', editionId: 'Professional' });
    const r = await ferry(['inject', '--target', 'kvm', '--drivers', virtioWin, disk], { timeoutMs: TIMEOUT });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('CriticalDeviceDatabase');
    const work = join(dir, 'w7-check');
    await mkdir(work);
    const system = join(work, 'SYSTEM');
    await writeFile(system, await ntfsRead(disk, work, 'Windows/System32/config/SYSTEM'));
    const cdd = '\\ControlSet001\\Control\\CriticalDeviceDatabase\\pci#ven_1af4&dev_1001';
    expect(await hivexget(system, cdd, 'Service')).toBe('viostor');
    expect(await hivexget(system, cdd, 'ClassGUID')).toBe('{4D36E97B-E325-11CE-BFC1-08002BE10318}');
    expect(await hivexget(system, '\\ControlSet001\\Services\\viostor', 'Start')).toBe('0');
    expect((await ntfsRead(disk, work, 'Windows/System32/drivers/viostor.sys')).toString()).toBe('MZ fake viostor for w7/amd64');
  }, TIMEOUT);

  it('hyperv uses the in-box VMBus drivers: they load at boot, no --drivers needed', async () => {
    const disk = join(dir, 'w10-hyperv.raw');
    await copyFile(win10, disk);
    const r = await ferry(['inject', '--target', 'hyperv', disk], { timeoutMs: TIMEOUT });
    expect(r.code, r.stderr).toBe(0);
    const work = join(dir, 'hv-check');
    await mkdir(work);
    const system = join(work, 'SYSTEM');
    await writeFile(system, await ntfsRead(disk, work, 'Windows/System32/config/SYSTEM'));
    expect(await hivexget(system, '\\ControlSet001\\Services\\storvsc', 'Start')).toBe('0');
    expect(await hivexget(system, '\\ControlSet001\\Services\\vmbus', 'Group')).toBe('System Bus Extender');
    expect(await hivexget(system, '\\ControlSet001\\Services\\VMTools', 'Start')).toBe('4');
  }, TIMEOUT);

  it('a hibernated (Fast Startup) Windows is refused with a clear message and left unchanged', async () => {
    const disk = await syntheticWindowsImage(join(dir, 'hib'), { ntVersion: '10.0', productName: 'Windows 10 Pro', editionId: 'Professional', hibernated: true });
    const before = await fileDigest(disk);
    const r = await ferry(['inject', '--target', 'kvm', '--drivers', virtioWin, disk], { timeoutMs: TIMEOUT });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^ferry inject: .*windows\.raw: Windows was shut down with Fast Startup .*powercfg \/h off/);
    expect(await fileDigest(disk)).toBe(before);
    const inspected = await ferry(['inspect', disk], { timeoutMs: TIMEOUT });
    expect(inspected.code, inspected.stderr).toBe(0);
    const inspection = JSON.parse(inspected.stdout);
    expect(inspection.blockers).toHaveLength(1);
    expect(inspection.os).toMatchObject({ type: 'windows', product: 'Windows 10 Pro', majorVersion: 10, minorVersion: 0, architecture: 'x86_64' });
    expect(inspection.os.windows).toMatchObject({ editionId: 'Professional', controlSet: 'ControlSet001', fastStartup: true });
  }, 2 * TIMEOUT);
});
