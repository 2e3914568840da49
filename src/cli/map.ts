import type { Command } from 'commander';
import { parseSize } from '../util/size.js';
import { outputMode } from './common.js';

export function registerMap(program: Command): void {
  program
    .command('map')
    .summary('show which ranges of an image hold data, zeroes, or nothing')
    .argument('<file>', 'image to map')
    .option('-f, --format <fmt>', 'image format (probed when omitted)')
    .option('--output <fmt>', 'human or json (same fields as qemu-img)', 'human')
    .option('-s, --start-offset <size>', 'first guest byte to map')
    .option('-l, --max-length <size>', 'map at most this many bytes')
    .option('-U, --force-share', 'accepted for qemu-img compatibility')
    .option('--allow-external', 'allow backing files outside the image folder')
    .action(async (file: string, o) => {
      const output = outputMode(o.output);
      const { imageMap } = await import('../convert/map.js');
      const entries = imageMap(file, {
        format: o.format,
        allowExternal: o.allowExternal === true,
        start: o.startOffset ? parseSize(o.startOffset) : undefined,
        maxLength: o.maxLength ? parseSize(o.maxLength) : undefined,
      });
      const out: string[] = [];
      if (output === 'json') {
        // One object per line, spaced as qemu-img prints it, so scripts that parse either keep working.
        for await (const { file: _file, ...e } of entries) {
          out.push('{ ' + Object.entries(e).map(([k, v]) => `${JSON.stringify(k)}: ${JSON.stringify(v)}`).join(', ') + '}');
        }
        process.stdout.write('[' + out.join(',\n') + ']\n');
        return;
      }
      const hex = (n: number) => '0x' + n.toString(16);
      out.push('Offset          Length          Mapped to       File');
      for await (const e of entries) {
        if (!e.data || e.offset === undefined) continue;
        out.push(`${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset).padEnd(16)}${e.file}`);
      }
      process.stdout.write(out.join('\n') + '\n');
    });
}
