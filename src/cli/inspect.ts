import type { Command } from 'commander';

export function registerInspect(program: Command): void {
  program
    .command('inspect')
    .summary('describe the guest on a disk image (JSON): partitions, OS, kernels, drivers, blockers')
    .description(
      'Print, as JSON, what driver injection decides on: partition table, filesystems, LVM, operating ' +
        'system (Linux distribution or Windows version and edition from the registry), firmware and ' +
        'bootloader, installed kernels with the storage and network modules each initramfs holds, foreign ' +
        'guest tools, and blockers (a hibernated or Fast-Startup Windows). The image is opened read-only.',
    )
    .argument('<image>', 'disk image')
    .option('-f, --format <fmt>', 'image format as qemu names it (probed when omitted)')
    .action(async (image: string, o) => {
      const { inspectImage } = await import('../drivers/index.js');
      const inspection = await inspectImage(image, { format: o.format });
      process.stdout.write(JSON.stringify(inspection, null, 2) + '\n');
    });
}
