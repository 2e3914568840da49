import type { Command } from 'commander';
import { targetProfiles } from '../drivers/targets/index.js';
import { outputMode } from './common.js';

export function registerInject(program: Command): void {
  program
    .command('inject')
    .summary('make the guest on a disk image boot on another hypervisor (edits the image in place)')
    .description(
      "Add the target's storage and network drivers to the guest and fix what changes with the hardware.\n\n" +
        'Linux: the drivers added to every initramfs (previous kept as .ferry-bak; initramfs-tools images ' +
        "are extended on the host, dracut images rebuilt by the guest's dracut), fstab/GRUB/resume by UUID, " +
        "foreign guest tools removed, the NIC keeps its name, the target's agent installed at first boot.\n\n" +
        'Windows: drivers copied from --drivers, the boot storage driver loaded at boot, foreign tools ' +
        'disabled.\n\n' +
        'Prints a report of every change and stores it as IMAGE.ferry-inject.json; --dry-run prints the plan ' +
        'only.',
    )
    .argument('<image>', 'writable disk image')
    .requiredOption('--target <name>', `target platform: ${targetProfiles.map((p) => p.name).join(', ')}`)
    .option('--drivers <path>', 'Windows driver folder or ISO 9660 image (virtio-win folder or virtio-win.iso for kvm; VMware, Xen or AWS driver folders)')
    .option('--dry-run', 'print the changes without making them (the image is opened read-only)')
    .option('-f, --format <fmt>', 'image format as qemu names it (probed when omitted)')
    .option('--output <fmt>', 'human or json', 'human')
    .action(async (image: string, o) => {
      const output = outputMode(o.output);
      // The libguestfs stack is loaded only when this command runs.
      const { describeChange, injectDrivers } = await import('../drivers/index.js');
      const report = await injectDrivers(image, { target: o.target, driversPath: o.drivers, dryRun: o.dryRun === true, format: o.format });
      if (output === 'json') {
        process.stdout.write(JSON.stringify(report, null, 2) + '\n');
      } else {
        const lines = [`${report.dryRun ? 'Plan' : 'Changes'} for ${report.target} (${report.os?.product ?? report.os?.type}, ${report.os?.architecture}):`];
        lines.push(...(report.changes.length ? report.changes.map((c) => `  ${describeChange(c)}`) : ['  (nothing to change)']));
        for (const w of report.warnings) lines.push(`warning: ${w}`);
        for (const v of report.verification) lines.push(`${v.ok ? 'verified' : 'FAILED'}: ${v.check} (${v.detail})`);
        if (report.reportPath) lines.push(`report: ${report.reportPath}`);
        process.stdout.write(lines.join('\n') + '\n');
      }
      if (report.verification.some((v) => !v.ok)) process.exitCode = 1;
    });
}
