import type { Command } from 'commander';
import { outputMode } from './common.js';

/** Exit codes as qemu-img check: 0 clean, 2 corruptions, 3 leaks only, 63 format without checks. */
export function registerCheck(program: Command): void {
  program
    .command('check')
    .summary('check an image for consistency (refcounts, tables)')
    .description('Exit status: 0 no errors, 2 corruptions found, 3 leaked clusters only, 1 the check could not run.')
    .argument('<file>', 'image to check')
    .option('-f, --format <fmt>', 'image format (probed when omitted)')
    .option('--output <fmt>', 'human or json', 'human')
    .option('-U, --force-share', 'accepted for qemu-img compatibility')
    .action(async (file: string, o) => {
      const output = outputMode(o.output);
      const { checkImage } = await import('../convert/check.js');
      const r = await checkImage(file, o.format);
      const errors = r.corruptions.length;
      if (output === 'json') {
        const json: Record<string, unknown> = {
          'image-end-offset': r.imageEndOffset,
          'total-clusters': r.totalClusters,
          'check-errors': 0,
          'allocated-clusters': r.allocatedClusters,
          filename: r.filename,
          format: r.format,
          'fragmented-clusters': r.fragmentedClusters,
          'compressed-clusters': r.compressedClusters,
        };
        if (errors) json.corruptions = errors;
        if (r.leakedClusters) json.leaks = r.leakedClusters;
        process.stdout.write(JSON.stringify(json, null, 4) + '\n');
      } else {
        const lines = [...r.corruptions, ...r.leaks];
        if (errors) lines.push(`\n${errors} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.`);
        if (r.leakedClusters) lines.push(`\n${r.leakedClusters} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.`);
        if (!errors && !r.leakedClusters) lines.push('No errors were found on the image.');
        // Formats that do not count clusters (qemu-img prints nothing here for them either) omit the summary.
        if (r.totalClusters !== undefined && r.allocatedClusters !== undefined) {
          const [total, alloc] = [r.totalClusters, r.allocatedClusters];
          const pct = (n: number, of: number) => (of ? ((n * 100) / of).toFixed(2) : '0.00');
          lines.push(
            `${alloc}/${total} = ${pct(alloc, total)}% allocated, ${pct(r.fragmentedClusters ?? 0, alloc)}% fragmented, ${pct(r.compressedClusters ?? 0, alloc)}% compressed clusters`,
          );
        }
        if (r.imageEndOffset !== undefined) lines.push(`Image end offset: ${r.imageEndOffset}`);
        process.stdout.write(lines.join('\n') + '\n');
      }
      process.exitCode = errors ? 2 : r.leakedClusters ? 3 : 0;
    });
}
