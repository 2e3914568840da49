import { execFile } from 'node:child_process';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidOptionError } from '../src/errors.js';
import { S_IFDIR, S_IFREG, listInitramfs, modulesIn, openInitramfs, resolveInImage, rewriteInitramfs } from '../src/drivers/initramfs.js';
import { moduleClosure, parseAliases, parseBuiltin, parseModulesDep, parseSoftdeps } from '../src/drivers/linux/module-deps.js';
import { DeviceResolver, applianceDevice } from '../src/drivers/linux/devices.js';
import { dracut, initramfsTools } from '../src/drivers/linux/initramfs-strategy.js';
import { macBindingChanges, nicNameChanges, primaryNicName } from '../src/drivers/linux/network.js';
import { findTarget, targetProfiles } from '../src/drivers/targets/index.js';
import { findDriverPackage, infInstallSection, versionFolders } from '../src/drivers/windows/driver-source.js';
import { readKey, readTree, toRegFile } from '../src/drivers/windows/registry.js';
import type { RegistryValue } from '../src/drivers/types.js';
import { requireTool, tempDir } from './helpers/env.js';
import { emptyHive } from './helpers/windows-image.js';

const run = promisify(execFile);
const kvm = findTarget('kvm');

describe('driver injection building blocks', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir());
  });
  afterAll(() => cleanup());

  it('every target profile names storage and network drivers; unknown targets are refused', () => {
    expect(targetProfiles.map((p) => p.name).sort()).toEqual(['aws', 'azure', 'hyperv', 'kvm', 'vmware', 'xen']);
    for (const p of targetProfiles) {
      expect(p.linux.storage.length, p.name).toBeGreaterThan(0);
      expect(p.linux.network.length, p.name).toBeGreaterThan(0);
      expect(p.windows.drivers.some((d) => d.role === 'storage'), p.name).toBe(true);
      expect(p.removeTools, p.name).not.toContain(p.name === 'kvm' ? 'qemu' : p.name === 'azure' || p.name === 'hyperv' ? 'hyperv' : p.name);
    }
    expect(findTarget('azure').output).toMatchObject({ format: 'vhd', options: { subformat: 'fixed' }, sizeAlignment: 1024 * 1024 });
    expect(() => findTarget('bhyve')).toThrow(InvalidOptionError);
  });

  it('maps controller-dependent device names to the appliance disk and rewrites them to UUIDs', () => {
    expect(applianceDevice('/dev/sda1', ['/dev/sda'])).toBe('/dev/sda1');
    expect(applianceDevice('/dev/vda2', ['/dev/sda'])).toBe('/dev/sda2');
    expect(applianceDevice('/dev/xvdb', ['/dev/sda', '/dev/sdb'])).toBe('/dev/sdb');
    expect(applianceDevice('/dev/nvme0n1p3', ['/dev/sda'])).toBe('/dev/sda3');
    expect(applianceDevice('/dev/mapper/vg-root', ['/dev/sda'])).toBeUndefined();

    const resolver = new DeviceResolver(['/dev/sda'], [
      { device: '/dev/sda1', type: 'ext4', uuid: 'aaaa-1111', label: null },
      { device: '/dev/sda2', type: 'swap', uuid: 'bbbb-2222', label: null },
    ]);
    const fstab = '# /dev/sda1 was the root\n/dev/sda1\t/\text4 defaults 0 1\nUUID=cccc /boot ext4 defaults 0 2\n/dev/sda2 none swap sw 0 0\n/dev/sdc1 /data xfs defaults 0 0\n';
    expect(resolver.rewriteTable(fstab, 0)).toBe(
      '# /dev/sda1 was the root\nUUID=aaaa-1111\t/\text4 defaults 0 1\nUUID=cccc /boot ext4 defaults 0 2\nUUID=bbbb-2222 none swap sw 0 0\n/dev/sdc1 /data xfs defaults 0 0\n',
    );
    expect([...resolver.unresolved]).toEqual(['/dev/sdc1']);
    expect(resolver.rewriteTable('cryptdata /dev/sda2 none luks\n', 1)).toBe('cryptdata UUID=bbbb-2222 none luks\n');
    expect(resolver.rewriteCommandLines('linux /vmlinuz root=/dev/sda1 ro resume=/dev/sda2 quiet root=/dev/mapper/x')).toBe(
      'linux /vmlinuz root=UUID=aaaa-1111 ro resume=UUID=bbbb-2222 quiet root=/dev/mapper/x',
    );
    expect(resolver.rewriteResumeConf('RESUME=/dev/sda2\n')).toBe('RESUME=UUID=bbbb-2222\n');
  });

  it('finds the primary NIC name in each network configuration style and pins it with a .link file', () => {
    expect(primaryNicName([{ path: '/etc/network/interfaces', text: 'auto lo\niface lo inet loopback\nallow-hotplug ens192\niface ens192 inet dhcp\n' }])).toBe('ens192');
    expect(primaryNicName([{ path: '/etc/netplan/50-cloud-init.yaml', text: 'network:\n  version: 2\n  ethernets:\n    ens160:\n      dhcp4: true\n' }])).toBe('ens160');
    expect(primaryNicName([{ path: '/etc/sysconfig/network-scripts/ifcfg-eth0', text: 'DEVICE="eth0"\nHWADDR=00:50:56:aa:bb:cc\n' }])).toBe('eth0');
    expect(primaryNicName([{ path: '/etc/NetworkManager/system-connections/Wired.nmconnection', text: '[connection]\ninterface-name=enp0s3\n' }])).toBe('enp0s3');
    expect(primaryNicName([{ path: '/etc/network/interfaces', text: 'auto lo\niface lo inet loopback\n' }])).toBeNull();

    const [link] = nicNameChanges('ens192', kvm, null);
    expect(link).toMatchObject({ kind: 'file.write', path: '/etc/systemd/network/10-ferry-kvm-primary.link', before: null });
    expect(link!.kind === 'file.write' && link!.after).toMatch(/\[Match\]\nDriver=virtio_net\n\n\[Link\]\nName=ens192\n/);
    // Applying twice changes nothing the second time.
    expect(nicNameChanges('ens192', kvm, link!.kind === 'file.write' ? link!.after : null)).toEqual([]);

    const macs = macBindingChanges([
      { path: '/etc/sysconfig/network-scripts/ifcfg-eth0', text: 'DEVICE=eth0\nHWADDR=00:50:56:aa:bb:cc\nBOOTPROTO=dhcp\n' },
      { path: '/etc/udev/rules.d/70-persistent-net.rules', text: 'SUBSYSTEM=="net", ATTR{address}=="00:50:56:aa:bb:cc", NAME="eth0"\n' },
      { path: '/etc/network/interfaces', text: 'iface eth0 inet dhcp\n' },
    ]);
    expect(macs.map((c) => [c.kind, c.path])).toEqual([
      ['file.write', '/etc/sysconfig/network-scripts/ifcfg-eth0'],
      ['file.remove', '/etc/udev/rules.d/70-persistent-net.rules'],
    ]);
    expect(macs[0]!.kind === 'file.write' && macs[0]!.after).toBe('DEVICE=eth0\nBOOTPROTO=dhcp\n');
  });

  it('initramfs-tools gets only the missing modules appended; dracut gets an add_drivers file', () => {
    const change = initramfsTools.configure('# comment\next4\nvirtio-blk\n', ['virtio_blk', 'virtio_net'], kvm);
    expect(change).toMatchObject({ kind: 'file.write', path: '/etc/initramfs-tools/modules' });
    expect(change!.kind === 'file.write' && change!.after).toBe('# comment\next4\nvirtio-blk\n# Added by Ferry: drivers for kvm\nvirtio_net\n');
    expect(initramfsTools.configure('virtio_blk\nvirtio_net\n', ['virtio_blk', 'virtio_net'], kvm)).toBeNull();
    const conf = dracut.configure(null, ['virtio_blk', 'virtio_scsi'], kvm);
    expect(conf).toMatchObject({ path: '/etc/dracut.conf.d/90-ferry-kvm.conf', before: null });
    expect(conf!.kind === 'file.write' && conf!.after).toContain('add_drivers+=" virtio_blk virtio_scsi "');
    // dracut images are rebuilt by the guest's dracut in the appliance; initramfs-tools images can be extended on the host.
    expect(dracut.rebuildOnHost).toBeUndefined();
    expect(initramfsTools.rebuildOnHost).toBeTypeOf('function');
    expect(dracut.rebuildCommand({ version: '5.14.0-1.el9', vmlinuz: null, initramfs: null, builtin: [] }, '/boot/initramfs-5.14.0-1.el9.img')).toBe(
      'dracut -f /boot/initramfs-5.14.0-1.el9.img 5.14.0-1.el9',
    );
  });

  it('lists an initramfs (early cpio + compressed cpio) exactly as lsinitramfs does', async () => {
    requireTool('lsinitramfs', 'initramfs-tools-core');
    const images = (await readdir('/boot')).filter((n) => n.startsWith('initrd.img-'));
    expect(images.length, 'an initramfs in /boot: install the Debian package linux-image-amd64').toBeGreaterThan(0);
    const image = join('/boot', images[0]!);
    const ours = await listInitramfs(image);
    const { stdout } = await run('lsinitramfs', [image], { maxBuffer: 64 * 1024 * 1024 });
    const theirs = stdout.split('\n').filter((l) => l && l !== '.').map((l) => '/' + l.replace(/^\.\//, ''));
    expect(new Set(ours)).toEqual(new Set(theirs));
    expect(modulesIn(ours).length).toBeGreaterThan(10);
  });

  it('module closure: modules.dep dependencies, softdeps (aliases through modules.alias), hidden dependencies, built-ins skipped', () => {
    const index = {
      modules: parseModulesDep(
        [
          'kernel/drivers/virtio/virtio.ko:',
          'kernel/drivers/virtio/virtio_ring.ko:',
          'kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko',
          'kernel/drivers/scsi/sd_mod.ko: kernel/lib/crc-t10dif.ko kernel/drivers/scsi/scsi_mod.ko',
          'kernel/drivers/scsi/scsi_mod.ko:',
          'kernel/lib/crc-t10dif.ko: kernel/crypto/crct10dif_common.ko',
          'kernel/crypto/crct10dif_common.ko:',
          'kernel/crypto/crct10dif_generic.ko: kernel/crypto/crct10dif_common.ko',
          'kernel/arch/x86/crypto/crct10dif-pclmul.ko.xz: kernel/crypto/crct10dif_common.ko',
          'kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/nvme-core.ko',
          'kernel/drivers/nvme/host/nvme-core.ko:',
          'kernel/drivers/pci/controller/vmd.ko:',
          '',
        ].join('\n'),
      ),
      softdeps: parseSoftdeps('# Soft dependencies extracted from modules themselves.\nsoftdep crc_t10dif pre: crct10dif\nsoftdep cifs gcm\n'),
      builtin: parseBuiltin('kernel/drivers/scsi/scsi_mod.ko\n'),
    };
    const first = moduleClosure(index, ['virtio_blk', 'sd_mod', 'no_such_module']);
    expect(first.paths).toEqual([
      'kernel/drivers/block/virtio_blk.ko',
      'kernel/drivers/virtio/virtio_ring.ko',
      'kernel/drivers/virtio/virtio.ko',
      'kernel/drivers/scsi/sd_mod.ko',
      'kernel/lib/crc-t10dif.ko',
      'kernel/drivers/scsi/scsi_mod.ko',
      'kernel/crypto/crct10dif_common.ko',
    ]);
    expect(first.unresolvedAliases).toEqual(['crct10dif']);
    // scsi_mod is built in: listed as sd_mod's dependency, but never needed as a file of its own.
    const withAliases = moduleClosure(
      { ...index, builtin: new Set<string>(), aliases: parseAliases('alias crypto-crct10dif crct10dif_generic\nalias crct10dif crct10dif_generic\nalias crct10dif* crct10dif_pclmul\nalias pci:v00008086d* vmd\n') },
      ['sd_mod'],
    );
    expect(withAliases.unresolvedAliases).toEqual([]);
    expect(withAliases.paths).toContain('kernel/crypto/crct10dif_generic.ko');
    expect(withAliases.paths).toContain('kernel/arch/x86/crypto/crct10dif-pclmul.ko.xz');
    expect(moduleClosure(index, ['nvme']).paths).toEqual(['kernel/drivers/nvme/host/nvme.ko', 'kernel/drivers/nvme/host/nvme-core.ko', 'kernel/drivers/pci/controller/vmd.ko']);
    expect(moduleClosure(index, ['scsi_mod']).paths).toEqual([]);
  });

  it('rewrites a real initramfs: early archives kept, members replaced and added, readable by lsinitramfs and unmkinitramfs', async () => {
    requireTool('lsinitramfs', 'initramfs-tools-core');
    requireTool('unmkinitramfs', 'initramfs-tools-core');
    const images = (await readdir('/boot')).filter((n) => n.startsWith('initrd.img-'));
    expect(images.length, 'an initramfs in /boot: install the Debian package linux-image-amd64').toBeGreaterThan(0);
    // An early uncompressed archive in front, as microcode updates are shipped.
    requireTool('cpio', 'cpio');
    const early = join(dir, 'early');
    await mkdir(join(early, 'kernel/x86/microcode'), { recursive: true });
    await writeFile(join(early, 'kernel/x86/microcode/GenuineIntel.bin'), 'not really microcode');
    const { stdout: earlyArchive } = await run('sh', ['-c', `cd ${early} && find . | sort | cpio --quiet -o -H newc`], { encoding: 'buffer', maxBuffer: 1024 * 1024 });
    const original = join(dir, 'original.img');
    await writeFile(original, Buffer.concat([earlyArchive, await readFile(join('/boot', images[0]!))]));
    const image = await openInitramfs(original);
    expect(image.head.length).toBe(earlyArchive.length);
    // mkinitramfs builds usr-merged images: lib is a link to usr/lib, which a new member must go through.
    expect(resolveInImage(image, 'lib/modules')).toBe('usr/lib/modules');
    expect(resolveInImage(image, '/lib/../lib/systemd/network/x.link')).toBe('usr/lib/systemd/network/x.link');
    const conf = 'conf/initramfs.conf';
    const added = Buffer.from('# written by the test\n');
    const rebuilt = await rewriteInitramfs(image, new Set([conf]), [
      { name: 'ferry-test', mode: S_IFDIR | 0o755 },
      { name: 'ferry-test/added.txt', mode: S_IFREG | 0o644, data: added },
      { name: conf, mode: S_IFREG | 0o644, data: Buffer.from('MODULES=list\n') },
    ]);
    const path = join(dir, 'rebuilt.img');
    await writeFile(path, rebuilt);
    const list = async (file: string) => (await run('lsinitramfs', [file], { maxBuffer: 64 * 1024 * 1024 })).stdout.split('\n').filter(Boolean).sort();
    expect(await list(path)).toEqual([...(await list(original)), 'ferry-test', 'ferry-test/added.txt'].sort());
    expect(rebuilt.subarray(0, image.head.length).equals(image.head)).toBe(true);
    const out = join(dir, 'unpacked');
    await run('unmkinitramfs', [path, out], { maxBuffer: 64 * 1024 * 1024 });
    // unmkinitramfs puts the early archive in early/ and the main one in main/.
    expect(await readFile(join(out, 'early/kernel/x86/microcode/GenuineIntel.bin'), 'utf8')).toBe('not really microcode');
    const root = join(out, 'main');
    expect(await readFile(join(root, 'ferry-test/added.txt'))).toEqual(added);
    expect(await readFile(join(root, conf), 'utf8')).toBe('MODULES=list\n');
    expect(await listInitramfs(path)).toContain('/ferry-test/added.txt');
  });

  it('registry changes as .reg data merge into a hive and read back with hivexget', async () => {
    requireTool('hivexregedit', 'libwin-hivex-perl');
    requireTool('hivexget', 'libhivex-bin');
    const hive = join(dir, 'SYSTEM');
    await writeFile(hive, emptyHive('SYSTEM'));
    const values: [string, RegistryValue][] = [
      ['Start', { type: 'REG_DWORD', data: 0 }],
      ['Group', { type: 'REG_SZ', data: 'SCSI miniport' }],
      ['ImagePath', { type: 'REG_EXPAND_SZ', data: 'system32\\drivers\\viostor.sys' }],
      ['Owners', { type: 'REG_MULTI_SZ', data: ['oem1.inf', 'oem2.inf'] }],
      ['Flags', { type: 'REG_BINARY', data: '01ff0000' }],
      ['Quote"d\\name', { type: 'REG_SZ', data: 'a "b" \\c' }],
      ['', { type: 'REG_SZ', data: 'default' }],
    ];
    const key = 'ControlSet001\\Services\\viostor';
    await writeFile(join(dir, 'edit.reg'), toRegFile('SYSTEM', values.map(([name, value]) => ({ key, name, value }))));
    await run('hivexregedit', ['--merge', '--prefix', 'HKEY_LOCAL_MACHINE\\SYSTEM', hive, join(dir, 'edit.reg')]);

    const read = await readKey(hive, key);
    expect(Object.fromEntries(read!)).toEqual(Object.fromEntries(values));
    expect((await run('hivexget', [hive, '\\ControlSet001\\Services\\viostor', 'Group'])).stdout.trim()).toBe('SCSI miniport');
    expect((await run('hivexget', [hive, '\\ControlSet001\\Services\\viostor', 'Owners'])).stdout.trim().split('\n')).toEqual(['oem1.inf', 'oem2.inf']);
    expect([...(await readTree(hive, 'ControlSet001')).keys()]).toEqual(['', 'Services', 'Services\\viostor']);
    expect(await readKey(hive, 'ControlSet001\\Services\\missing')).toBeNull();
  });

  it('picks the driver folder for the Windows version and architecture, and the INF install section', async () => {
    expect(versionFolders('10.0', false, 19045)).toEqual(['w10', 'win10']);
    expect(versionFolders('10.0', true, 20348)[0]).toBe('2k22');
    const tree = join(dir, 'virtio-win');
    for (const folder of ['viostor/w7/amd64', 'viostor/w10/x86', 'viostor/w10/amd64', 'viostor/2k19/amd64']) {
      await mkdir(join(tree, folder), { recursive: true });
      for (const f of ['viostor.sys', 'viostor.inf', 'viostor.cat', 'viostor.pdb']) await writeFile(join(tree, folder, f), `${folder}/${f}`);
    }
    const pkg = await findDriverPackage(tree, 'viostor.sys', 'x86_64', versionFolders('10.0', false, 19045));
    expect(pkg?.folder).toBe(join(tree, 'viostor/w10/amd64'));
    expect(pkg?.files.map((f) => f.slice(tree.length)).sort()).toEqual(['/viostor/w10/amd64/viostor.cat', '/viostor/w10/amd64/viostor.inf', '/viostor/w10/amd64/viostor.sys']);
    expect((await findDriverPackage(tree, 'viostor.sys', 'x86_64', versionFolders('6.1', false, 7601)))?.folder).toBe(join(tree, 'viostor/w7/amd64'));
    expect(await findDriverPackage(tree, 'viostor.sys', 'aarch64', versionFolders('10.0', false, 19045))).toBeNull();

    const inf = join(dir, 'viostor.inf');
    await writeFile(inf, '[Manufacturer]\r\n%RHEL% = RHEL,NTamd64\r\n\r\n[RHEL.NTamd64]\r\n%RHELScsi.DeviceDesc% = rhelscsi_inst, PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00, PCI\\VEN_1AF4&DEV_1001\r\n');
    expect(await infInstallSection(inf, ['PCI\\VEN_1AF4&DEV_1001'])).toEqual({ section: 'rhelscsi_inst', hardwareId: 'PCI\\VEN_1AF4&DEV_1001' });
    expect(await infInstallSection(inf, ['PCI\\VEN_15AD&DEV_07C0'])).toBeNull();
  });
});
