import { readdir, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { Type, type Static } from 'typebox';
import { captureDisk, captureMachine, type DiskSettings, type HostKeySettings, type TransferSettings } from '../../capture/capture.js';
import type { CaptureProgress, CaptureResult } from '../../capture/session.js';
import { describeTarget, type LoginSecrets, type SshTarget } from '../../capture/ssh-connection.js';
import { workingPaths } from '../../capture/working-image.js';
import { findDriver } from '../../convert/registry.js';
import { targetProfiles } from '../../drivers/targets/index.js';
import { InvalidOptionError } from '../../errors.js';
import { createLogger } from '../../log.js';
import { formatSize } from '../../util/size.js';
import { ConflictError, MissingInputError } from '../errors.js';
import { ABORT_CANCEL, type RunnableJobHandler, type StageContext } from '../handler.js';
import { capturePath, convertCaptures, removeFinishedCaptures } from './captured-images.js';
import { injectIntoCaptures } from './inject-drivers.js';
import { checkOutputImage, optionStrings, OutputImageFields, RelativePath } from './output-image.js';

const Fingerprint = Type.String({ pattern: '^SHA256:[A-Za-z0-9+/]{43}=?$', description: 'an OpenSSH host key fingerprint, as `ssh-keygen -lf KEY.pub` prints it' });

const SourceFields = {
  host: Type.String({ minLength: 1, maxLength: 255, description: 'SSH host name or address' }),
  port: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535, description: 'SSH port; default 22' })),
  user: Type.String({ minLength: 1, maxLength: 255, description: 'login user: root, or one that may sudo' }),
  credential: Type.String({ pattern: '^[0-9a-f-]{36}$', description: 'id of a stored credential (POST /v1/credentials)' }),
  disk: Type.String({ pattern: '^(all|/.+)$', description: "a block device such as /dev/sda (or a file) on the source, or 'all' for every fixed disk" }),
};

const HostKeyPins = Type.Union([Fingerprint, Type.Array(Fingerprint, { minItems: 1, maxItems: 16 })], { description: 'the host key fingerprint(s) to trust' });
const KnownHostsFile = { ...RelativePath, description: 'an OpenSSH known_hosts file that lists the host, relative to the data dir' };

const SourceObject = Type.Object(
  { ...SourceFields, hostKey: Type.Optional(HostKeyPins), knownHosts: Type.Optional(KnownHostsFile) },
  {
    additionalProperties: false,
    // Exactly one host key policy: a capture never trusts a key on first use.
    oneOf: [{ required: ['hostKey'] }, { required: ['knownHosts'] }],
    description: 'the machine to capture; give hostKey or knownHosts (exactly one): an unknown or changed host key fails the job',
  },
);
type SourceCommon = Omit<Static<typeof SourceObject>, 'hostKey' | 'knownHosts'>;
/** The validated source, typed as the `oneOf` makes it: one policy or the other. */
type CaptureSource = SourceCommon & ({ hostKey: Static<typeof HostKeyPins>; knownHosts?: never } | { knownHosts: string; hostKey?: never });
const CaptureSourceSchema = Type.Unsafe<CaptureSource>(SourceObject);

/** P2V: capture a running machine's disks over SSH straight into the target format. */
export const CaptureJobSchema = Type.Object(
  {
    type: Type.Literal('capture'),
    source: CaptureSourceSchema,
    target: Type.Object(
      { path: { ...RelativePath, description: "output image, relative to the data dir; with disk 'all', a folder that receives one image per disk and machine.json" }, ...OutputImageFields },
      { additionalProperties: false },
    ),
    injectDrivers: Type.Optional(
      Type.Object(
        {
          target: Type.Enum(
            targetProfiles.map((p) => p.name),
            { description: `the hypervisor or cloud the guest must boot on, as \`ferry inject --target\`: ${targetProfiles.map((p) => p.name).join(', ')}` },
          ),
          drivers: Type.Optional({
            ...RelativePath,
            description: 'Windows guests: the driver folder (virtio-win for kvm; the VMware, Xen or AWS drivers), relative to the data dir, as `ferry inject --drivers`',
          }),
        },
        {
          additionalProperties: false,
          description:
            "make the captured guest boot on the target: the job becomes the flow capture → convert → inject. The raw capture is converted to target.format, then the target's " +
            "drivers are injected into the image(s) as `ferry inject` does; the report is in result.injection and the job log. An image that cannot be made bootable is removed",
        },
      ),
    ),
  },
  { additionalProperties: false, title: 'CaptureJob', description: 'P2V: capture a machine over SSH into the target format, optionally making its guest boot on another hypervisor' },
);
export type CaptureJob = Static<typeof CaptureJobSchema>;

/** How a job captures: the CLI's defaults (`ferry capture --help`), made for a source that keeps running. */
const CAPTURE_SETTINGS = {
  chunkSize: 256 * 1024,
  sync: false,
  freeze: true,
  snapshot: true,
  freezeTimeoutMs: 30_000,
  maxPasses: 6,
  convergeBytes: 64 * 1024 * 1024,
  usedBlocksOnly: true,
} satisfies Omit<DiskSettings, 'format' | 'formatOptions' | 'compress' | 'signal' | 'log'>;
const TRANSFER_SETTINGS: TransferSettings = { channels: 4, level: 1 };

/** One captured disk image, as the job result lists it; paths are relative to the data dir. */
export interface CapturedImage {
  source: string;
  path: string;
  size: number;
  capturedBytes: number;
  start: CaptureResult['start'];
  resumedBytes: number;
  passes: number;
  frozen: string[];
  /** The temporary LVM snapshot read instead of the volume, when one was taken. */
  snapshot?: { name: string; cowBytes: number };
  bytesOnWire: number;
  elapsedMs: number;
}

export interface CaptureJobResult {
  format: string;
  images: CapturedImage[];
  /** With disk 'all': the machine's description (CPUs, memory, firmware, disks, NICs) beside the images. */
  machineFile?: string;
}

export const captureJob: RunnableJobHandler<CaptureJob> = {
  type: 'capture',
  summary: 'P2V: capture a running machine over SSH into the target format',
  schema: CaptureJobSchema,

  async check(spec, { resolvePath }) {
    checkOutputImage(spec.target);
    // Injection edits the converted image in place; a streamOptimized VMDK is written once and cannot be.
    if (spec.injectDrivers && findDriver(spec.target.format).name === 'vmdk' && String(spec.target.options?.subformat) === 'streamOptimized') {
      throw new InvalidOptionError(
        'injectDrivers cannot edit a streamOptimized VMDK once it is written: capture into qcow2 with injectDrivers, then convert it (ferry convert -O vmdk -o subformat=streamOptimized, or a convert job)',
        { field: 'injectDrivers' },
      );
    }
    if (spec.injectDrivers?.drivers !== undefined) {
      const drivers = await resolvePath(spec.injectDrivers.drivers, 'injectDrivers.drivers');
      if (!(await stat(drivers).catch(() => undefined))) {
        throw new MissingInputError(`injectDrivers.drivers '${spec.injectDrivers.drivers}' is not in the data dir`, { field: 'injectDrivers.drivers' });
      }
    }
    if (spec.source.knownHosts !== undefined) {
      const file = await resolvePath(spec.source.knownHosts, 'source.knownHosts');
      if (!(await stat(file).catch(() => undefined))?.isFile()) {
        throw new MissingInputError(`source.knownHosts '${spec.source.knownHosts}' is not a file in the data dir`, { field: 'source.knownHosts' });
      }
    }
    const dest = await resolvePath(spec.target.path, 'target.path');
    const existing = await stat(dest).catch(() => undefined);
    if (spec.source.disk === 'all') {
      if (existing && !existing.isDirectory()) throw new InvalidOptionError(`target.path '${spec.target.path}' is a file; with disk 'all' it names a folder`, { field: 'target.path' });
      // The convert stage writes the images under names known only once the machine is inventoried.
      if (existing && spec.injectDrivers && (await readdir(dest)).length) {
        throw new ConflictError(`target.path '${spec.target.path}' is not empty; with injectDrivers, capture a whole machine into a new or empty folder`, { field: 'target.path' });
      }
      return;
    }
    // The capture module never overwrites an image; an interrupted capture's resume files are not DEST yet.
    if (existing) throw new ConflictError(`target.path '${spec.target.path}' exists; capture into a new path`, { field: 'target.path' });
    if (!(await stat(dirname(dest)).catch(() => undefined))?.isDirectory()) {
      throw new MissingInputError(`the folder of target.path '${spec.target.path}' does not exist in the data dir`, { field: 'target.path' });
    }
  },

  stages: [
    {
      name: 'capture',
      // The runner removes stale temporaries of these before each attempt. The capture's resume files
      // (workingPaths) are not temporaries: a retried attempt continues from them.
      outputs: (spec) => [spec.target.path],
      run: runCapture,
    },
    {
      name: 'convert',
      outputs: (spec) => [spec.target.path],
      appliesTo: (spec) => spec.injectDrivers !== undefined,
      run: convertCaptures,
    },
    {
      name: 'inject',
      outputs: (spec) => [spec.target.path],
      appliesTo: (spec) => spec.injectDrivers !== undefined,
      run: injectIntoCaptures,
    },
  ],
};

/**
 * Captures into target.path in its format, verified against the source; or, when later stages convert and
 * inject, into raw images where the convert stage expects them (capturePath).
 */
async function runCapture(ctx: StageContext<CaptureJob>): Promise<CaptureJobResult> {
  const { spec, resolvePath, signal, log } = ctx;
  const staged = spec.injectDrivers !== undefined;
  const destPath = staged ? capturePath(spec) : spec.target.path;
  const format = staged ? 'raw' : spec.target.format;
  const dest = await resolvePath(destPath, 'target.path');
  // A finished raw capture of an earlier run (the service restarted during a later stage) is taken again.
  if (staged) await removeFinishedCaptures(dest, spec.source.disk === 'all');
  const target: SshTarget = { user: spec.source.user, host: spec.source.host, port: spec.source.port ?? 22, device: spec.source.disk === 'all' ? '' : spec.source.disk };
  const hostKeys: HostKeySettings =
    spec.source.hostKey !== undefined ? { pins: [spec.source.hostKey].flat() } : { knownHostsFile: await resolvePath(spec.source.knownHosts, 'source.knownHosts') };
  const request = {
    target,
    auth: { secrets: loginSecrets(await ctx.credentials.reveal(spec.source.credential)) },
    hostKeys,
    transfer: TRANSFER_SETTINGS,
    settings: {
      ...CAPTURE_SETTINGS,
      format,
      formatOptions: staged ? {} : optionStrings(spec.target.options),
      compress: staged ? false : (spec.target.compress ?? false),
      signal,
      // The session's detailed lines go to the worker's log; the job log gets the phases below.
      log: createLogger('capture', 'info'),
    },
  };
  const report = progressReporter(ctx);
  log(`capturing ${describeTarget(target)} into ${format} ${destPath}`);
  try {
    const result: CaptureJobResult =
      spec.source.disk === 'all'
        ? await captureMachine({ ...request, outDir: dest, inventoryOnly: false, onProgress: (disk, p) => report(p, disk) }).then((m) => ({
            format,
            images: m.disks.map((r) => capturedImage(r, join(destPath, basename(r.dest)))),
            machineFile: join(destPath, basename(m.machineFile)),
          }))
        : await captureDisk({ ...request, dest, onProgress: (p) => report(p) }).then((r) => ({ format, images: [capturedImage(r, destPath)] }));
    for (const image of result.images) log(describeImage(image));
    return result;
  } catch (err) {
    // A cancelled job is over: its resume files would only take space. A shutdown keeps them for the next attempt.
    if (signal.aborted && signal.reason === ABORT_CANCEL) {
      // A staging folder (capture then convert) is the job's own: it goes whole.
      if (staged && spec.source.disk === 'all') await rm(dest, { recursive: true, force: true });
      for (const file of spec.source.disk === 'all' ? await resumeFilesIn(dest) : Object.values(workingPaths(dest))) await rm(file, { force: true });
    }
    throw err;
  }
}

/** The stored credential's secret fields (CredentialVault.reveal) as the SSH login takes them. */
function loginSecrets(secret: Record<string, string>): LoginSecrets {
  if (secret.privateKey !== undefined) return { privateKey: secret.privateKey, passphrase: secret.passphrase };
  if (secret.password !== undefined) return { password: secret.password };
  // Names only: the fields' values are secrets.
  throw new InvalidOptionError(`source.credential holds neither a private key nor a password (fields: ${Object.keys(secret).join(', ')})`, { field: 'source.credential' });
}

/** Each phase's bytes become the job's progress; the job log gets a line as each phase (of each disk) starts. */
function progressReporter({ progress, log }: StageContext<CaptureJob>): (p: CaptureProgress, disk?: string) => void {
  let current = '';
  return (p, disk) => {
    const phase = `${disk ? `${disk}: ` : ''}${p.phase}${p.pass ? ` pass ${p.pass}` : ''}`;
    if (phase !== current) {
      current = phase;
      log(p.total ? `${phase} (${formatSize(p.total)})` : phase);
    }
    progress({ done: p.done, total: p.total });
  };
}

function capturedImage(r: CaptureResult, path: string): CapturedImage {
  return {
    source: r.source,
    path,
    size: r.size,
    capturedBytes: r.capturedBytes,
    start: r.start,
    resumedBytes: r.resumedBytes,
    passes: r.passes,
    frozen: r.frozen,
    ...(r.snapshot ? { snapshot: r.snapshot } : {}),
    bytesOnWire: r.bytesOnWire,
    elapsedMs: Math.round(r.elapsedMs),
  };
}

function describeImage(i: CapturedImage): string {
  const resumed = i.start === 'resumed' ? `resumed with ${formatSize(i.resumedBytes)} already captured, ` : '';
  const frozen = i.frozen.length ? `, frozen: ${i.frozen.join(' ')}` : '';
  const snapshot = i.snapshot ? `, read from LVM snapshot ${i.snapshot.name}` : '';
  return `captured ${i.source} into ${i.path}: ${resumed}${formatSize(i.capturedBytes)} in use, ${formatSize(i.bytesOnWire)} on the wire, ${i.passes} pass(es)${frozen}${snapshot}, verified`;
}

/**
 * The resume files in a whole-machine capture's folder. Which images the machine has is known only once it
 * is inventoried, so they are found by name: workingPaths(DIR/IMAGE) are `.IMAGE.ferry-capture.*`.
 */
async function resumeFilesIn(dir: string): Promise<string[]> {
  const names = await readdir(dir).catch(() => [] as string[]);
  const images = new Set(names.map((n) => /^\.(.+)\.ferry-capture\.[a-z]+$/.exec(n)?.[1]).filter((image) => image !== undefined));
  return [...images].flatMap((image) => Object.values(workingPaths(join(dir, image))));
}
