// Disk conversion, Ferry vs qemu-img, on the same generated 4 GiB image, warm cache.
import { join } from 'node:path';
import { FERRY, WORK, benchImage, machineLine, publish, sideBySide } from './lib.js';

const MiB = 1024 * 1024;

/** Rows for every output format Ferry can write; a format without a driver yet is left out. */
async function cases(source) {
  const { formatDrivers } = await import('../dist/convert/registry.js');
  const writable = new Set(formatDrivers.filter((d) => d.create).map((d) => d.name));
  const out = (name) => join(WORK, name);
  const all = [
    { format: 'qcow2', name: 'raw → qcow2', ferry: ['-O', 'qcow2'], peer: ['-O', 'qcow2'], file: 'out.qcow2' },
    {
      format: 'qcow2',
      name: 'raw → qcow2, zstd compressed (-c)',
      ferry: ['-c', '-O', 'qcow2', '-o', 'compression_type=zstd'],
      peer: ['-c', '-O', 'qcow2', '-o', 'compression_type=zstd'],
      file: 'outz.qcow2',
    },
    { format: 'qcow2', name: 'raw → qcow2, zlib compressed (-c)', ferry: ['-c', '-O', 'qcow2'], peer: ['-c', '-O', 'qcow2'], file: 'outc.qcow2' },
    {
      format: 'vmdk',
      name: 'raw → streamOptimized VMDK',
      ferry: ['-O', 'vmdk', '-o', 'subformat=streamOptimized'],
      peer: ['-O', 'vmdk', '-o', 'subformat=streamOptimized'],
      file: 'out.vmdk',
    },
    { format: 'vhd', name: 'raw → dynamic VHD', ferry: ['-O', 'vhd'], peer: ['-O', 'vpc'], file: 'out.vhd' },
    { format: 'vhdx', name: 'raw → VHDX', ferry: ['-O', 'vhdx'], peer: ['-O', 'vhdx'], file: 'out.vhdx' },
    { format: 'vdi', name: 'raw → VDI', ferry: ['-O', 'vdi'], peer: ['-O', 'vdi'], file: 'out.vdi' },
  ];
  return all
    .filter((c) => writable.has(c.format))
    .map((c) => ({
      name: c.name,
      outputs: [out(c.file)],
      ferry: [process.execPath, FERRY, 'convert', '-f', 'raw', ...c.ferry, source, out(c.file)],
      peer: ['qemu-img', 'convert', '-f', 'raw', ...c.peer, source, out(c.file)],
    }));
}

export async function runConvertBench({ runs = 5, only } = {}) {
  const source = await benchImage();
  const rows = [];
  for (const c of await cases(source)) {
    if (only && !c.name.includes(only)) continue;
    rows.push(await sideBySide({ ...c, runs }));
  }
  const lines = [
    `Measured ${new Date().toISOString().slice(0, 10)} on ${machineLine()}; per tool one warm-up and ${runs} timed runs, medians,`,
    'warm page cache, outputs deleted and `sync`ed before every run. Ratio = Ferry time / qemu-img time (below 1: Ferry is faster).',
    '',
    '| conversion | Ferry (s) | qemu-img (s) | ratio | Ferry best / qemu-img best (s) | Ferry peak RSS (MiB) | qemu-img peak RSS (MiB) | output (MiB) |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
    ...rows.map(
      (r) =>
        `| ${r.name} | ${r.ferrySeconds.toFixed(3)} | ${r.peerSeconds.toFixed(3)} | **${r.ratio.toFixed(2)}** | ${r.ferryBest.toFixed(3)} / ${r.peerBest.toFixed(3)} | ${r.ferryRssMiB.toFixed(0)} | ${r.peerRssMiB.toFixed(0)} | ${(r.outputBytes / MiB).toFixed(0)} |`,
    ),
  ];
  if (!only) publish('convert', lines.join('\n'));
  return rows;
}
