import { readFile, unlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { Command } from 'commander';
import { InvalidOptionError } from '../errors.js';
import { parseSize } from '../util/size.js';
import { collectOptions, parseCount, printOptionsHelp, progressMode } from './common.js';
import { createProgress } from './progress.js';

const CACHE_MODES = ['unsafe', 'writeback', 'writethrough', 'none', 'directsync'];

/**
 * --inject: the guest is fixed on the converted copy, never the source. An output that could not be made
 * bootable is removed, like any other failed conversion's output.
 */
async function injectIntoOutput(dst: string, format: string, target: string, driversPath: string | undefined): Promise<void> {
  const [{ injectDrivers, describeChange }, { InjectionError }] = await Promise.all([import('../drivers/index.js'), import('../drivers/errors.js')]);
  const { findDriver } = await import('../convert/registry.js');
  const { unlink } = await import('node:fs/promises');
  try {
    const report = await injectDrivers(dst, { target, driversPath, format: findDriver(format).name === 'vhd' ? 'vpc' : format });
    process.stderr.write(`inject ${target}: ${report.changes.length} changes\n${report.changes.map((c) => `  ${describeChange(c)}`).join('\n')}\n`);
    const failed = report.verification.filter((v) => !v.ok);
    if (failed.length) throw new InjectionError(`driver injection did not verify: ${failed.map((v) => `${v.check}: ${v.detail}`).join('; ')}`, { file: dst });
  } catch (err) {
    await unlink(dst).catch(() => undefined);
    await unlink(`${dst}.ferry-inject.json`).catch(() => undefined);
    throw err;
  }
}

export function registerConvert(program: Command): void {
  program
    .command('convert')
    .summary('convert a disk image to another format')
    .description(
      'Copy SRC into a new image DST in format -O, skipping unallocated and zero blocks. DST is written ' +
        'under a temporary name and renamed only when complete; SRC is only read. With -n, DST must already ' +
        'exist (raw or qcow2, at least as large as SRC) and is written in place.',
    )
    .argument('<src>', 'source image')
    .argument('<dst>', 'output image')
    .option('-f, --format <fmt>', 'source format (probed when omitted)')
    .option('-O, --output-format <fmt>', 'output format', 'raw')
    .option('-o, --options <k=v,...>', 'output format options, e.g. compat=0.10,cluster_size=2M (repeatable; -o help lists them)', collectOptions)
    .option('-c, --compress', 'compress the output (qcow2: zlib, or zstd with -o compression_type=zstd)')
    .option('-p', 'show a progress bar')
    .option('--progress <mode>', 'progress output: bar (stderr) or json (JSON lines on stdout, for programs)')
    .option('-S, --sparse-size <size>', 'zero detection granularity; 0 writes every byte', '4k')
    .option('-m, --parallel <n>', 'parallel copy workers (default: 2 per core, at most 8)')
    .option('-n, --no-create', 'write into an existing target instead of creating it (raw and qcow2 targets; it must be at least as large as SRC)')
    .option('--target-is-zero', 'the target already reads as zeroes: do not write zero ranges (with -n)')
    .option('-t, --cache <mode>', `output cache mode: unsafe (no fsync, as qemu-img) or writeback/none/... (fsync before the rename)`, 'unsafe')
    .option('-W', 'allow out-of-order writes (accepted for qemu-img compatibility; Ferry already writes in parallel)')
    .option('-U, --force-share', 'accepted for qemu-img compatibility: Ferry opens sources read-only without locks')
    .option('-q, --quiet', 'no progress output')
    .option('--allow-external', 'allow backing files outside the image folder')
    .option('--inject <target>', 'then make the converted guest boot on TARGET (kvm, hyperv, vmware, xen, aws, azure): see ferry inject')
    .option('--drivers <path>', 'with --inject: Windows driver folder or ISO (virtio-win folder or virtio-win.iso for kvm)')
    .action(async (src: string, dst: string, o) => {
      if (await printOptionsHelp(o.outputFormat, o.options)) return;
      if (!CACHE_MODES.includes(o.cache)) throw new InvalidOptionError(`-t must be one of ${CACHE_MODES.join(', ')}`, { field: 'cache' });
      if (o.targetIsZero && o.create !== false) throw new InvalidOptionError('--target-is-zero requires -n', { field: 'target-is-zero' });
      if (o.inject) (await import('../drivers/targets/index.js')).findTarget(o.inject); // a bad target fails before any work
      const mode = o.quiet ? 'none' : progressMode(o.p, o.progress);
      const progress = createProgress(mode, 'convert');
      const { convertImage } = await import('../convert/convert.js');
      const copying = { workers: o.parallel === undefined ? undefined : parseCount(o.parallel, '-m', 1, 64), sparseSize: parseSize(o.sparseSize, '-S') };
      // A streamOptimized VMDK is written once, front to back: neither QEMU nor libguestfs can change it
      // afterwards. The guest is fixed on a qcow2 copy beside DST first, which then becomes DST.
      const staged = o.inject !== undefined && (await writtenOnce(o.outputFormat, o.options));
      const fixed = staged ? join(dirname(dst), `.${basename(dst)}.ferry-inject.qcow2`) : dst;
      const stats = await convertImage({
        source: src,
        sourceFormat: o.format,
        target: fixed,
        targetFormat: staged ? 'qcow2' : o.outputFormat,
        options: staged ? undefined : o.options,
        compress: !staged && o.compress === true,
        durable: o.cache !== 'unsafe',
        allowExternal: o.allowExternal === true,
        noCreate: o.create === false,
        pipeline: {
          ...copying,
          targetIsZero: o.targetIsZero === true,
          onProgress: (p) => progress.update(p),
        },
      });
      progress.done(stats);
      // The CLI logs at warn unless FERRY_LOG_LEVEL says otherwise: only then is pino worth loading.
      if (process.env.FERRY_LOG_LEVEL) {
        const { createLogger } = await import('../log.js');
        createLogger('convert').info(
          { source: src, target: dst, format: o.outputFormat, ...stats, elapsedMs: Math.round(stats.elapsedMs) },
          'conversion finished',
        );
      }
      if (!o.inject) return;
      if (!staged) return injectIntoOutput(dst, o.outputFormat, o.inject, o.drivers);
      try {
        await injectIntoOutput(fixed, 'qcow2', o.inject, o.drivers);
        const finalProgress = createProgress(mode, 'convert');
        const written = await convertImage({
          source: fixed,
          sourceFormat: 'qcow2',
          target: dst,
          targetFormat: o.outputFormat,
          options: o.options,
          compress: o.compress === true,
          durable: o.cache !== 'unsafe',
          pipeline: { ...copying, onProgress: (p) => finalProgress.update(p) },
        });
        finalProgress.done(written);
        const report = JSON.parse(await readFile(`${fixed}.ferry-inject.json`, 'utf8'));
        await writeFile(`${dst}.ferry-inject.json`, JSON.stringify({ ...report, image: dst, reportPath: `${dst}.ferry-inject.json` }, null, 2) + '\n');
      } finally {
        await unlink(fixed).catch(() => undefined);
        await unlink(`${fixed}.ferry-inject.json`).catch(() => undefined);
      }
    });
}

async function writtenOnce(format: string, options: Record<string, string> | undefined): Promise<boolean> {
  const { findDriver } = await import('../convert/registry.js');
  return findDriver(format).name === 'vmdk' && options?.subformat === 'streamOptimized';
}
