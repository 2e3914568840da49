import type { Command } from 'commander';
import { InvalidOptionError } from '../errors.js';
import { parseSize } from '../util/size.js';
import { collectOptions, outputMode, printOptionsHelp } from './common.js';

export function registerMeasure(program: Command): void {
  program
    .command('measure')
    .summary('compute the size an image would take in another format')
    .argument('[file]', 'image to measure (or give --size)')
    .requiredOption('-O, --output-format <fmt>', 'format to measure for')
    .option('-o, --options <k=v,...>', 'format options, as for convert', collectOptions)
    .option('-f, --format <fmt>', 'source format (probed when omitted)')
    .option('--size <size>', 'measure a new empty image of this size instead of a file')
    .option('--output <fmt>', 'human or json', 'human')
    .option('-U, --force-share', 'accepted for qemu-img compatibility')
    .option('--allow-external', 'allow backing files outside the image folder')
    .action(async (file: string | undefined, o) => {
      const output = outputMode(o.output);
      if (await printOptionsHelp(o.outputFormat, o.options)) return;
      if (!file === !o.size) throw new InvalidOptionError('give either a file or --size', { field: 'size' });
      const { measureImage } = await import('../convert/measure.js');
      const r = await measureImage({
        targetFormat: o.outputFormat,
        options: o.options,
        source: file,
        sourceFormat: o.format,
        allowExternal: o.allowExternal === true,
        size: o.size ? parseSize(o.size) : undefined,
      });
      if (output === 'json') process.stdout.write(JSON.stringify({ required: r.required, 'fully-allocated': r.fullyAllocated }, null, 4) + '\n');
      else process.stdout.write(`required size: ${r.required}\nfully allocated size: ${r.fullyAllocated}\n`);
    });
}
