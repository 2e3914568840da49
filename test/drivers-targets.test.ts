import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestFs } from '../src/drivers/guestfs.js';
import { inspectGuest } from '../src/drivers/inspect.js';
import { planLinux } from '../src/drivers/linux/fixer.js';
import { findTarget } from '../src/drivers/targets/index.js';
import type { Change, InjectionReport, Inspection } from '../src/drivers/types.js';
import { copyGuest, debianGuestImage } from './helpers/debian-guest.js';
import { ferry, requireTool, tempDir } from './helpers/env.js';

const run = promisify(execFile);
const INJECT_TIMEOUT_MS = 600_000;

const written = (changes: Change[], path: string) =>
  changes.find((c): c is Extract<Change, { kind: 'file.write' }> => c.kind === 'file.write' && c.path === path)?.after;

describe('Linux targets other than KVM', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let pristine: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir());
    pristine = await debianGuestImage();
  }, 1_800_000);
  afterAll(() => cleanup());

  it('hyperv: the rebuilt initramfs holds the VMBus drivers (lsinitramfs), the old one is kept, the config is fixed', async () => {
    requireTool('lsinitramfs', 'initramfs-tools-core');
    const guest = await copyGuest(pristine, dir, 'hyperv.raw');
    const r = await ferry(['inject', '--target', 'hyperv', '--output', 'json', guest], { timeoutMs: INJECT_TIMEOUT_MS });
    expect(r.code, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout) as InjectionReport;
    expect(report.verification.every((v) => v.ok), JSON.stringify(report.verification)).toBe(true);

    // Read the result back independently of Ferry's own verification: the files, and the host's lsinitramfs.
    const g = await GuestFs.open([{ path: guest, format: 'raw', readonly: true }]);
    try {
      await g.run('mount-ro', ['/dev/sda1', '/']);
      const kernel = (await g.lines('ls', ['/lib/modules']))[0]!;
      const initrd = `/boot/initrd.img-${kernel}`;
      expect(await g.isFile(`${initrd}.ferry-bak`)).toBe(true);
      await g.run('download', [initrd, join(dir, 'new.img')]);
      await g.run('download', [`${initrd}.ferry-bak`, join(dir, 'old.img')]);
      const modules = async (file: string) => (await run('lsinitramfs', [file], { maxBuffer: 64 * 1024 * 1024 })).stdout;
      const after = await modules(join(dir, 'new.img'));
      for (const m of ['hv_vmbus.ko', 'hv_storvsc.ko', 'hv_netvsc.ko']) expect(after, m).toContain(m);
      expect(await modules(join(dir, 'old.img'))).not.toContain('hv_storvsc.ko');
      expect(await g.run('cat', ['/etc/fstab'])).toMatch(/^UUID=\S+ \/ ext4/);
      expect(await g.run('cat', ['/etc/systemd/network/10-ferry-hyperv-primary.link'])).toContain('Driver=hv_netvsc\n');
      // open-vm-tools is purged: dpkg no longer lists it as installed.
      expect(await g.run('cat', ['/var/lib/dpkg/status'])).not.toMatch(/^Package: open-vm-tools$/m);
    } finally {
      await g.close();
    }
  }, INJECT_TIMEOUT_MS + 120_000);

  it('inspection of the guest; vmware, xen, aws and azure: each plan includes that target\'s modules, NIC driver, tools and agent', async () => {
    const g = await GuestFs.open([{ path: pristine, format: 'raw', readonly: true }]);
    let inspection: Inspection;
    const plans: Record<string, Change[]> = {};
    const warnings: Record<string, string[]> = {};
    try {
      inspection = await inspectGuest(g, pristine);
      for (const target of ['vmware', 'xen', 'aws', 'azure']) {
        const plan = await planLinux(g, inspection, findTarget(target), dir);
        plans[target] = plan.changes;
        warnings[target] = plan.warnings;
        expect(plan.expectedModules.map((e) => e.kernel)).toEqual(inspection.os!.linux!.kernels.map((k) => k.version));
      }
    } finally {
      await g.close();
    }
    // What `ferry inspect` prints for this guest (the same function).
    expect(inspection).toMatchObject({ partitionTable: 'mbr', firmware: 'bios', bootloader: 'grub2', blockers: [] });
    expect(inspection.filesystems.map((f) => [f.device, f.type])).toEqual([['/dev/sda1', 'ext4'], ['/dev/sda2', 'swap']]);
    expect(inspection.os).toMatchObject({ type: 'linux', majorVersion: 12, architecture: 'x86_64', hostname: 'ferry-guest', mountpoints: { '/': '/dev/sda1' } });
    expect(inspection.os!.linux).toMatchObject({ distribution: 'debian', packageFormat: 'deb', initramfsTool: 'initramfs-tools' });
    const [kernel] = inspection.os!.linux!.kernels;
    expect(kernel!.initramfs!.path).toBe(`/boot/initrd.img-${kernel!.version}`);
    expect(kernel!.initramfs!.modules).not.toContain('virtio_blk');
    expect(kernel!.builtin).not.toContain('virtio_blk');
    expect(inspection.guestTools).toEqual([{ family: 'vmware', name: 'open-vm-tools', kind: 'package' }]);

    const modules = (t: string) => written(plans[t]!, '/etc/initramfs-tools/modules') ?? '';
    expect(modules('vmware')).toMatch(/^vmw_pvscsi$/m);
    expect(modules('vmware')).toMatch(/^vmxnet3$/m);
    expect(modules('xen')).toMatch(/^xen_blkfront$/m);
    expect(modules('xen')).toMatch(/^xen_netfront$/m);
    expect(modules('aws')).toMatch(/^nvme$/m);
    expect(modules('aws')).toMatch(/^ena$/m);
    expect(modules('azure')).toMatch(/^hv_storvsc$/m);
    expect(modules('azure')).toMatch(/^hv_netvsc$/m);
    for (const t of ['vmware', 'xen', 'aws', 'azure']) {
      expect(modules(t), t).not.toMatch(/^virtio_blk$/m);
      expect(written(plans[t]!, '/etc/fstab'), t).toMatch(/^UUID=/);
    }
    expect(written(plans.xen!, '/etc/systemd/network/10-ferry-xen-primary.link')).toContain('Driver=vif\n');
    expect(written(plans.aws!, '/etc/systemd/network/10-ferry-aws-primary.link')).toContain('Driver=ena\n');
    // open-vm-tools stays on VMware and goes everywhere else.
    const purges = (t: string) => plans[t]!.some((c) => c.kind === 'guest.command' && c.command === 'dpkg --purge open-vm-tools');
    expect(purges('vmware')).toBe(false);
    for (const t of ['xen', 'aws', 'azure']) expect(purges(t), t).toBe(true);
    // Agents: Azure's is installed at first boot; VMware's is already there; Xen and AWS have none in the distribution.
    expect(written(plans.azure!, '/var/lib/ferry/firstboot.d/20-install-azure-agent.sh')).toContain('apt-get install -y walinuxagent');
    expect(plans.vmware!.some((c) => c.kind === 'file.write' && c.path.includes('install-vmware-agent'))).toBe(false);
    expect(plans.xen!.some((c) => c.kind === 'file.write' && c.path.startsWith('/var/lib/ferry/firstboot.d/'))).toBe(false);
  }, 300_000);
});
