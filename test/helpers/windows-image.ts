import { execFile } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { GuestFs } from '../../src/drivers/guestfs.js';
import type { RegistryValue } from '../../src/drivers/types.js';
import { toRegFile, type RegistryEdit } from '../../src/drivers/windows/registry.js';
import { requireTool } from './env.js';

const run = promisify(execFile);

/**
 * An empty registry hive: the base block and one 4 KiB bin holding a root key and its security
 * descriptor. hivex edits hives but cannot create one, so tests make their own from the format
 * (regf base block, hbin, nk and sk cells).
 */
export function emptyHive(rootName: string): Buffer {
  const hive = Buffer.alloc(0x2000);
  // Base block.
  hive.write('regf', 0, 'latin1');
  hive.writeUInt32LE(1, 4); // primary sequence number
  hive.writeUInt32LE(1, 8); // secondary sequence number (equal: the hive is consistent)
  hive.writeUInt32LE(1, 0x14); // major version
  hive.writeUInt32LE(3, 0x18); // minor version
  hive.writeUInt32LE(0, 0x1c); // primary file
  hive.writeUInt32LE(1, 0x20); // direct memory load
  hive.writeUInt32LE(0x20, 0x24); // root cell offset (relative to the first bin)
  hive.writeUInt32LE(0x1000, 0x28); // hive bins data size
  hive.writeUInt32LE(1, 0x2c); // clustering factor
  let checksum = 0;
  for (let i = 0; i < 0x1fc; i += 4) checksum ^= hive.readUInt32LE(i);
  hive.writeUInt32LE(checksum >>> 0, 0x1fc);

  // The bin.
  const bin = 0x1000;
  hive.write('hbin', bin, 'latin1');
  hive.writeUInt32LE(0, bin + 4); // offset of this bin
  hive.writeUInt32LE(0x1000, bin + 8); // size of this bin

  // Root key (nk) at bin offset 0x20.
  const name = Buffer.from(rootName, 'latin1');
  const nkOffset = 0x20;
  const nkSize = align8(4 + 0x4c + name.length);
  const nk = bin + nkOffset;
  hive.writeInt32LE(-nkSize, nk); // negative: allocated
  hive.write('nk', nk + 4, 'latin1');
  hive.writeUInt16LE(0x2c, nk + 6); // KEY_HIVE_ENTRY | KEY_NO_DELETE | KEY_COMP_NAME
  hive.writeUInt32LE(0xffffffff, nk + 0x14); // parent (none)
  hive.writeUInt32LE(0, nk + 0x18); // subkeys
  hive.writeUInt32LE(0xffffffff, nk + 0x20); // subkey list
  hive.writeUInt32LE(0xffffffff, nk + 0x24); // volatile subkey list
  hive.writeUInt32LE(0, nk + 0x28); // values
  hive.writeUInt32LE(0xffffffff, nk + 0x2c); // value list
  const skOffset = nkOffset + nkSize;
  hive.writeUInt32LE(skOffset, nk + 0x30); // security
  hive.writeUInt32LE(0xffffffff, nk + 0x34); // class name
  hive.writeUInt16LE(name.length, nk + 0x4c);
  name.copy(hive, nk + 0x50);

  // Security descriptor (sk): a self-relative descriptor with no owner, group or ACLs, shared by every key.
  const descriptor = Buffer.alloc(20);
  descriptor.writeUInt8(1, 0); // revision
  descriptor.writeUInt16LE(0x8000, 2); // SE_SELF_RELATIVE
  const skSize = align8(4 + 0x14 + descriptor.length);
  const sk = bin + skOffset;
  hive.writeInt32LE(-skSize, sk);
  hive.write('sk', sk + 4, 'latin1');
  hive.writeUInt32LE(skOffset, sk + 8); // flink: itself, the only sk
  hive.writeUInt32LE(skOffset, sk + 12); // blink
  hive.writeUInt32LE(1, sk + 16); // reference count
  hive.writeUInt32LE(descriptor.length, sk + 20);
  descriptor.copy(hive, sk + 24);

  // The rest of the bin is one free cell.
  const free = skOffset + skSize;
  hive.writeInt32LE(0x1000 - free, bin + free);
  return hive;
}

function align8(n: number): number {
  return (n + 7) & ~7;
}

/** What the synthetic Windows looks like; its registry is written with `hivexregedit --merge`. */
export interface SyntheticWindows {
  /** "6.1" (Windows 7) uses the CriticalDeviceDatabase; "10.0" the driver database. */
  ntVersion: '6.1' | '10.0';
  productName: string;
  editionId: string;
  /** Put a hibernation header in hiberfil.sys (a hibernated or Fast-Startup shutdown). */
  hibernated?: boolean;
  /** Install a VMware Tools service and uninstall entry. */
  vmwareTools?: boolean;
}

const dword = (data: number): RegistryValue => ({ type: 'REG_DWORD', data });
const sz = (data: string): RegistryValue => ({ type: 'REG_SZ', data });

function systemEdits(w: SyntheticWindows): RegistryEdit[] {
  const cs = 'ControlSet001';
  const edits: RegistryEdit[] = [
    { key: 'Select', name: 'Current', value: dword(1) },
    { key: 'Select', name: 'Default', value: dword(1) },
    { key: 'Select', name: 'LastKnownGood', value: dword(2) },
    { key: `${cs}\\Control\\Session Manager\\Environment`, name: 'PROCESSOR_ARCHITECTURE', value: sz('AMD64') },
    { key: `${cs}\\Control\\Session Manager\\Power`, name: 'HiberbootEnabled', value: dword(w.hibernated ? 1 : 0) },
    { key: `${cs}\\Services\\disk`, name: 'Start', value: dword(0) },
    { key: `${cs}\\Services\\storvsc`, name: 'Start', value: dword(3) },
    { key: `${cs}\\Services\\vmbus`, name: 'Start', value: dword(3) },
  ];
  if (w.ntVersion === '6.1') {
    edits.push({ key: `${cs}\\Control\\CriticalDeviceDatabase\\pci#ven_8086&dev_7111`, name: 'Service', value: sz('intelide') });
  } else {
    edits.push({ key: 'DriverDatabase\\DeviceIds\\PCI\\VEN_8086&DEV_7111', name: 'mshdc.inf', value: { type: 'REG_BINARY', data: '01ff0000' } });
    edits.push({ key: 'DriverDatabase\\DriverInfFiles\\mshdc.inf', name: 'Active', value: sz('mshdc.inf_amd64_0000000000000000') });
  }
  if (w.vmwareTools) {
    edits.push({ key: `${cs}\\Services\\VMTools`, name: 'Start', value: dword(2) }, { key: `${cs}\\Services\\VMTools`, name: 'DisplayName', value: sz('VMware Tools') });
  }
  return edits;
}

function softwareEdits(w: SyntheticWindows): RegistryEdit[] {
  const nt = 'Microsoft\\Windows NT\\CurrentVersion';
  const edits: RegistryEdit[] = [
    { key: nt, name: 'ProductName', value: sz(w.productName) },
    { key: nt, name: 'EditionID', value: sz(w.editionId) },
    { key: nt, name: 'InstallationType', value: sz('Client') },
    // Windows 10 keeps "6.3" here for old programs; the real version is in the Major/Minor numbers.
    { key: nt, name: 'CurrentVersion', value: sz(w.ntVersion === '10.0' ? '6.3' : w.ntVersion) },
    { key: nt, name: 'CurrentBuildNumber', value: sz(w.ntVersion === '10.0' ? '19045' : '7601') },
    { key: 'Microsoft\\Windows\\CurrentVersion', name: 'DevicePath', value: { type: 'REG_EXPAND_SZ', data: '%SystemRoot%\\inf' } },
  ];
  if (w.ntVersion === '10.0') edits.push({ key: nt, name: 'CurrentMajorVersionNumber', value: dword(10) }, { key: nt, name: 'CurrentMinorVersionNumber', value: dword(0) });
  if (w.vmwareTools) {
    const key = 'Microsoft\\Windows\\CurrentVersion\\Uninstall\\{FE2F6A2C-196E-4210-9C04-2B1BC21F07EF}';
    edits.push({ key, name: 'DisplayName', value: sz('VMware Tools') }, { key, name: 'UninstallString', value: sz('MsiExec.exe /X{FE2F6A2C-196E-4210-9C04-2B1BC21F07EF}') });
  }
  return edits;
}

/**
 * A synthetic Windows disk: an MBR-partitioned raw image with one NTFS partition (mkntfs on a file)
 * holding what Ferry reads and edits: Windows\System32\config\SYSTEM and SOFTWARE (built here with
 * hivexregedit), System32\drivers with the in-box Hyper-V drivers, INF, and hiberfil.sys. NTFS folders
 * cannot be made with the ntfs-3g file tools, so the files go in through one libguestfs session.
 */
export async function syntheticWindowsImage(dir: string, w: SyntheticWindows): Promise<string> {
  for (const [tool, pkg] of [
    ['mkntfs', 'ntfs-3g'],
    ['hivexregedit', 'libwin-hivex-perl'],
    ['sfdisk', 'fdisk'],
    ['guestfish', 'libguestfs-tools'],
  ]) {
    requireTool(tool, pkg);
  }
  const work = join(dir, 'windows-build');
  await mkdir(work, { recursive: true });
  const files: Record<string, string> = {};
  for (const [name, edits] of [['SYSTEM', systemEdits(w)], ['SOFTWARE', softwareEdits(w)]] as const) {
    const hive = join(work, name);
    await writeFile(hive, emptyHive(name));
    await writeFile(`${hive}.reg`, toRegFile(name, edits));
    await run('hivexregedit', ['--merge', '--prefix', `HKEY_LOCAL_MACHINE\\${name}`, hive, `${hive}.reg`]);
    files[`/Windows/System32/config/${name}`] = hive;
  }
  const plain: Record<string, Buffer> = {
    '/Windows/System32/drivers/disk.sys': Buffer.from('MZ synthetic disk.sys'),
    '/Windows/System32/drivers/storvsc.sys': Buffer.from('MZ synthetic storvsc.sys'),
    '/Windows/System32/drivers/vmbus.sys': Buffer.from('MZ synthetic vmbus.sys'),
    '/Windows/System32/drivers/netvsc.sys': Buffer.from('MZ synthetic netvsc.sys'),
    '/Windows/INF/disk.inf': Buffer.from('; synthetic\r\n'),
    '/hiberfil.sys': w.hibernated ? Buffer.concat([Buffer.from('HIBR'), Buffer.alloc(4092)]) : Buffer.alloc(4096),
  };
  for (const [path, content] of Object.entries(plain)) {
    const local = join(work, path.replace(/\//g, '_'));
    await writeFile(local, content);
    files[path] = local;
  }

  const partition = join(work, 'ntfs.img');
  await run('truncate', ['-s', '64M', partition]);
  await run('mkntfs', ['-q', '-F', '-f', '-p', '2048', '-H', '16', '-S', '63', '-L', 'Windows', partition]);
  const disk = join(dir, 'windows.raw');
  await run('truncate', ['-s', '65M', disk]);
  await new Promise<void>((resolve, reject) => {
    const child = execFile('sfdisk', ['-q', disk], (err) => (err ? reject(err) : resolve()));
    child.stdin!.end('label: dos\nstart=2048, type=7, bootable\n');
  });
  await run('dd', [`if=${partition}`, `of=${disk}`, 'bs=1M', 'seek=1', 'conv=notrunc,sparse', 'status=none']);

  const g = await GuestFs.open([{ path: disk, format: 'raw' }]);
  try {
    await g.run('mount', ['/dev/sda1', '/']);
    for (const [path, local] of Object.entries(files)) {
      await g.run('mkdir-p', [path.slice(0, path.lastIndexOf('/')) || '/']);
      await g.run('upload', [local, path]);
    }
  } finally {
    await g.close();
  }
  return disk;
}
