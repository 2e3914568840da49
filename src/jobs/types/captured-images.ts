import { readFile, readdir, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { MachineDescription } from '../../capture/machine.js';
import { convertImage } from '../../convert/convert.js';
import { findDriver } from '../../convert/registry.js';
import { writeFileAtomic } from '../atomic-file.js';
import { ABORT_CANCEL, type StageContext } from '../handler.js';
import type { CaptureJob, CaptureJobResult, CapturedImage } from './capture.js';
import { optionStrings } from './output-image.js';

/** The folder, inside target.path, where a whole machine's raw captures wait for the convert stage. */
const STAGING_FOLDER = '.ferry-captured';

/**
 * Where the capture stage puts its raw, verified capture when later stages convert it and inject drivers
 * (relative to the data dir): a hidden file beside target.path, or a hidden folder inside it with disk 'all'.
 */
export function capturePath(spec: CaptureJob): string {
  if (spec.source.disk === 'all') return join(spec.target.path, STAGING_FOLDER);
  return join(dirname(spec.target.path), `.${basename(spec.target.path)}.ferry-captured.raw`);
}

/**
 * Removes raw captures an earlier run of the job completed (the service restarted during a later stage),
 * so the capture runs again instead of refusing an existing destination. Resume files stay: they are how an
 * interrupted capture continues.
 */
export async function removeFinishedCaptures(dest: string, wholeMachine: boolean): Promise<void> {
  if (!wholeMachine) return rm(dest, { force: true });
  for (const name of await readdir(dest).catch(() => [] as string[])) {
    if (!name.startsWith('.')) await rm(join(dest, name), { force: true });
  }
}

/** Image file names with disk 'all': the disk's name and the format's own extension, as `ferry capture --all-disks` names them. */
function convertedPath(spec: CaptureJob, captured: CapturedImage): string {
  if (spec.source.disk !== 'all') return spec.target.path;
  return join(spec.target.path, `${basename(captured.path, '.raw')}.${findDriver(spec.target.format).name}`);
}

/**
 * The convert stage of a P2V flow: each raw capture into target.format at target.path (durably, through
 * the conversion pipeline), machine.json moved beside the images; the raw captures are removed once all
 * are converted, so a retried attempt still finds them.
 */
export async function convertCaptures(ctx: StageContext<CaptureJob>): Promise<CaptureJobResult> {
  const { spec, resolvePath, signal, log, progress } = ctx;
  const captured = ctx.previous as CaptureJobResult;
  const total = captured.images.reduce((sum, image) => sum + image.size, 0);
  const converted: string[] = [];
  let done = 0;
  try {
    const images: CapturedImage[] = [];
    for (const image of captured.images) {
      const path = convertedPath(spec, image);
      log(`converting ${image.path} to ${spec.target.format} ${path}`);
      const target = await resolvePath(path, 'target.path');
      const stats = await convertImage({
        source: await resolvePath(image.path, 'target.path'),
        sourceFormat: 'raw',
        target,
        targetFormat: spec.target.format,
        options: optionStrings(spec.target.options),
        compress: spec.target.compress ?? false,
        durable: true,
        pipeline: { signal, onProgress: (p) => progress({ done: done + p.done, total }) },
      });
      converted.push(target);
      done += image.size;
      log(`converted ${path}: ${stats.bytesWritten} bytes written in ${(stats.elapsedMs / 1000).toFixed(2)} s`);
      images.push({ ...image, path });
    }
    const machineFile = captured.machineFile && (await moveMachineFile(ctx, captured.machineFile, images));
    for (const image of captured.images) await rm(await resolvePath(image.path, 'target.path'), { force: true });
    if (spec.source.disk === 'all') await rm(await resolvePath(capturePath(spec), 'target.path'), { recursive: true, force: true });
    return { format: spec.target.format, images, ...(machineFile && { machineFile }) };
  } catch (err) {
    // A cancelled job is over: neither its raw captures nor the images converted so far are kept.
    if (signal.aborted && signal.reason === ABORT_CANCEL) {
      for (const file of converted) await rm(file, { force: true });
      for (const image of captured.images) await rm(await resolvePath(image.path, 'target.path'), { force: true });
      if (spec.source.disk === 'all') await rm(await resolvePath(capturePath(spec), 'target.path'), { recursive: true, force: true });
    }
    throw err;
  }
}

/** machine.json goes beside the converted images, naming them and their format instead of the raw captures. */
async function moveMachineFile({ spec, resolvePath }: StageContext<CaptureJob>, staged: string, images: CapturedImage[]): Promise<string> {
  const machine = JSON.parse(await readFile(await resolvePath(staged, 'target.path'), 'utf8')) as MachineDescription;
  const format = findDriver(spec.target.format).name;
  for (const disk of machine.disks) {
    const image = images.find((i) => basename(i.path) === `${disk.name}.${format}`);
    if (image) disk.image = { file: basename(image.path), format };
  }
  const path = join(spec.target.path, basename(staged));
  await writeFileAtomic(await resolvePath(path, 'target.path'), JSON.stringify(machine, null, 2) + '\n', { durable: true });
  return path;
}
