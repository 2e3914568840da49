import type { Command } from 'commander';
import type { ImageInfo } from '../convert/info.js';
import { formatSize } from '../util/size.js';
import { outputMode } from './common.js';

export function registerInfo(program: Command): void {
  program
    .command('info')
    .summary('show an image\'s format, sizes and backing file')
    .argument('<file>', 'image to describe')
    .option('-f, --format <fmt>', 'image format (probed when omitted)')
    .option('--output <fmt>', 'human or json (same fields as qemu-img)', 'human')
    .option('--backing-chain', 'describe every image of the backing chain')
    .option('-U, --force-share', 'accepted for qemu-img compatibility')
    .option('--allow-external', 'allow backing files outside the image folder (with --backing-chain)')
    .action(async (file: string, o) => {
      const output = outputMode(o.output);
      const { imageInfo } = await import('../convert/info.js');
      const infos = await imageInfo(file, { format: o.format, backingChain: o.backingChain === true, allowExternal: o.allowExternal === true });
      if (output === 'json') {
        process.stdout.write(JSON.stringify(o.backingChain ? infos : infos[0], null, 4) + '\n');
        return;
      }
      process.stdout.write(infos.map(humanInfo).join('\n'));
    });
}

function humanInfo(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${formatSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
    `disk size: ${formatSize(info['actual-size'])}`,
  ];
  if (info['cluster-size']) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['backing-filename']) {
    lines.push(`backing file: ${info['backing-filename']} (actual path: ${info['full-backing-filename']})`);
    if (info['backing-filename-format']) lines.push(`backing file format: ${info['backing-filename-format']}`);
  }
  if (info['dirty-flag']) lines.push('dirty: yes');
  const specific = info['format-specific'];
  if (specific) {
    lines.push('Format specific information:');
    appendFields(lines, specific.data, 1);
  }
  return lines.join('\n') + '\n';
}

/** Nested values (VMDK extents) are printed as indented lists, the way qemu-img prints them. */
function appendFields(lines: string[], data: Record<string, unknown>, depth: number): void {
  const pad = '    '.repeat(depth);
  for (const [key, value] of Object.entries(data)) {
    const label = key.replace(/-/g, ' ');
    if (Array.isArray(value)) {
      lines.push(`${pad}${label}:`);
      value.forEach((item, i) => {
        if (item !== null && typeof item === 'object') {
          lines.push(`${pad}    [${i}]:`);
          appendFields(lines, item as Record<string, unknown>, depth + 2);
        } else lines.push(`${pad}    [${i}]: ${item}`);
      });
    } else if (value !== null && typeof value === 'object') {
      lines.push(`${pad}${label}:`);
      appendFields(lines, value as Record<string, unknown>, depth + 1);
    } else lines.push(`${pad}${label}: ${value}`);
  }
}
