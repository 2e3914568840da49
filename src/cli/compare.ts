import type { Command } from 'commander';
import { progressMode } from './common.js';
import { createProgress } from './progress.js';

/** Exit codes as qemu-img compare: 0 identical, 1 different, 2 error (set by the CLI's error handler). */
export function registerCompare(program: Command): void {
  program
    .command('compare')
    .summary('check whether two images have the same content')
    .description('Exit status: 0 identical, 1 different, 2 error. Images of different sizes are identical when the extra part reads as zeroes, unless -s.')
    .argument('<a>', 'first image')
    .argument('<b>', 'second image')
    .option('-f, --format-a <fmt>', 'format of the first image')
    .option('-F, --format-b <fmt>', 'format of the second image')
    .option('-s, --strict', 'images of different sizes are different')
    .option('-p', 'show a progress bar')
    .option('--progress <mode>', 'bar or json')
    .option('-q, --quiet', 'print nothing; only the exit status tells')
    .option('-U, --force-share', 'accepted for qemu-img compatibility')
    .option('--allow-external', 'allow backing files outside the image folders')
    .action(async (a: string, b: string, o) => {
      const progress = createProgress(o.quiet ? 'none' : progressMode(o.p, o.progress), 'compare');
      const { compareImages } = await import('../convert/compare.js');
      const result = await compareImages(a, b, {
        formatA: o.formatA,
        formatB: o.formatB,
        strict: o.strict === true,
        allowExternal: o.allowExternal === true,
        onProgress: (done, total) => progress.update({ done, total, bytesRead: done, bytesWritten: 0 }),
      });
      const say = (text: string) => o.quiet || process.stdout.write(text + '\n');
      if (result.identical) {
        say('Images are identical.');
        return;
      }
      say(result.reason === 'size' ? 'Strict mode: Image size mismatch!' : `Content mismatch at offset ${result.offset}!`);
      process.exitCode = 1;
    });
}
