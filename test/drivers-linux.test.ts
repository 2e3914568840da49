import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Change, InjectionReport } from '../src/drivers/types.js';
import { bootUntil } from './helpers/boot.js';
import { BOOT_MARKER, GUEST_NIC, copyGuest, debianGuestImage } from './helpers/debian-guest.js';
import { fileDigest, ferry, tempDir } from './helpers/env.js';

/** initramfs-tools gives up on a missing root after rootdelay (10 s in the fixture) and drops to a shell. */
const ROOT_NOT_FOUND = /ALERT! .* does not exist|Gave up waiting for root|Dropping to a shell/;
const INJECT_TIMEOUT_MS = 600_000;
const BOOT_TIMEOUT_MS = 240_000;

const summary = (changes: Change[]) => changes.map((c) => `${c.kind} ${'path' in c ? c.path : c.command}`);

describe('ferry inject --target kvm on a Debian guest built for other hardware', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let pristine: string;
  let guest: string;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir());
    pristine = await debianGuestImage();
    guest = await copyGuest(pristine, dir);
  }, 1_800_000); // the first build runs debootstrap; later runs take the cached image
  afterAll(() => cleanup());

  it('without injection the guest cannot find its root filesystem on a virtio disk', async () => {
    const boot = await bootUntil(pristine, { marker: BOOT_MARKER, failures: ROOT_NOT_FOUND, timeoutMs: BOOT_TIMEOUT_MS, snapshot: true, log: join(dir, 'before.log') });
    expect(boot.outcome, boot.console.slice(-2000)).toBe('failure');
    expect(boot.console).not.toContain(BOOT_MARKER);
  }, BOOT_TIMEOUT_MS + 30_000);

  it('--dry-run prints the plan and changes nothing; the real run makes the same changes and the guest boots on virtio', async () => {
    const before = await fileDigest(guest);
    const mtime = (await stat(guest)).mtimeMs;
    const dry = await ferry(['inject', '--target', 'kvm', '--dry-run', '--output', 'json', guest], { timeoutMs: INJECT_TIMEOUT_MS });
    expect(dry.code, dry.stderr).toBe(0);
    const plan = JSON.parse(dry.stdout) as InjectionReport;
    expect(plan.dryRun).toBe(true);
    expect(await fileDigest(guest)).toBe(before);
    expect((await stat(guest)).mtimeMs).toBe(mtime);

    const real = await ferry(['inject', '--target', 'kvm', '--output', 'json', guest], { timeoutMs: INJECT_TIMEOUT_MS });
    expect(real.code, real.stderr).toBe(0);
    const report = JSON.parse(real.stdout) as InjectionReport;
    expect(summary(report.changes)).toEqual(summary(plan.changes));
    expect(report.verification.length).toBe(1);
    expect(report.verification.every((v) => v.ok), JSON.stringify(report.verification)).toBe(true);
    expect(JSON.parse(await readFile(`${guest}.ferry-inject.json`, 'utf8'))).toEqual(report);

    const byPath = (path: string) => report.changes.find((c): c is Extract<Change, { kind: 'file.write' }> => c.kind === 'file.write' && c.path === path);
    expect(byPath('/etc/fstab')?.after).toMatch(/^UUID=[0-9a-f-]+ \/ ext4 errors=remount-ro 0 1\nUUID=[0-9a-f-]+ none swap sw 0 0\n$/);
    expect(byPath('/boot/grub/grub.cfg')?.after).toMatch(/root=UUID=[0-9a-f-]+ ro .*resume=UUID=[0-9a-f-]+/);
    expect(byPath('/etc/initramfs-tools/conf.d/resume')?.after).toMatch(/^RESUME=UUID=[0-9a-f-]+\n$/);
    expect(byPath('/etc/initramfs-tools/modules')?.after).toContain('virtio_blk\n');
    expect(report.changes).toContainEqual(expect.objectContaining({ kind: 'guest.command', command: 'dpkg --purge open-vm-tools' }));
    expect(report.changes.some((c) => c.kind === 'file.copy' && c.path.endsWith('.ferry-bak'))).toBe(true);
    // initramfs-tools images are extended on the host; the guest's update-initramfs does not run in the appliance.
    expect(report.changes).toContainEqual(expect.objectContaining({ kind: 'file.upload', path: expect.stringMatching(/^\/boot\/initrd\.img-/) }));
    expect(report.changes.some((c) => c.kind === 'guest.command' && c.command.startsWith('update-initramfs'))).toBe(false);
    expect(byPath('/var/lib/ferry/firstboot.d/20-install-kvm-agent.sh')?.after).toContain('apt-get install -y qemu-guest-agent');

    const boot = await bootUntil(guest, { marker: BOOT_MARKER, failures: ROOT_NOT_FOUND, timeoutMs: BOOT_TIMEOUT_MS, log: join(dir, 'after.log') });
    expect(boot.outcome, boot.console.slice(-3000)).toBe('marker');
    // The NIC is virtio now and still comes up under the name the guest's configuration uses.
    const line = boot.console.split('\n').find((l) => l.includes(BOOT_MARKER))!;
    expect(line.split('nics=')[1]!.trim().split(/\s+/)).toContain(GUEST_NIC);
  }, 2 * INJECT_TIMEOUT_MS + BOOT_TIMEOUT_MS);
});
