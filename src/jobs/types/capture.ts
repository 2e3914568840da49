import { readdir, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { Type, type Static } from 'typebox';
import { captureDisk, captureMachine, type DiskSettings, type HostKeySettings, type TransferSettings } from '../../capture/capture.js';
import type { CaptureProgress, CaptureResult } from '../../capture/session.js';
import { describeTarget, type LoginSecrets, type SshTarget } from '../../capture/ssh-connection.js';
import { workingPaths } from '../../capture/working-image.js';
import { InvalidOptionError } from '../../errors.js';
import { createLogger } from '../../log.js';
import { formatSize } from '../../util/size.js';
import { ConflictError, FeatureUnavailableError, MissingInputError } from '../errors.js';
import { ABORT_CANCEL, type RunnableJobHandler, type StageContext } from '../handler.js';
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
      Type.Boolean({ description: "inject the target hypervisor's drivers into the captured images; not in this build yet (true is refused with 501)" }),
    ),
  },
  { additionalProperties: false, title: 'CaptureJob', description: 'P2V: capture a machine over SSH into the target format (driver injection to follow)' },
);
export type CaptureJob = Static<typeof CaptureJobSchema>;

/** How a job captures: the CLI's defaults (`ferry capture --help`), made for a source that keeps running. */
const CAPTURE_SETTINGS = {
  chunkSize: 256 * 1024,
  sync: false,
  freeze: true,
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
    if (spec.injectDrivers) {
      throw new FeatureUnavailableError(
        'injectDrivers: driver injection needs the drivers module (issue 6), which this build does not include; submit without it to capture only',
        { field: 'injectDrivers' },
      );
    }
    checkOutputImage(spec.target);
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
  ],
};

async function runCapture(ctx: StageContext<CaptureJob>): Promise<CaptureJobResult> {
  const { spec, resolvePath, signal, log } = ctx;
  const dest = await resolvePath(spec.target.path, 'target.path');
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
      format: spec.target.format,
      formatOptions: optionStrings(spec.target.options),
      compress: spec.target.compress ?? false,
      signal,
      // The session's detailed lines go to the worker's log; the job log gets the phases below.
      log: createLogger('capture', 'info'),
    },
  };
  const report = progressReporter(ctx);
  log(`capturing ${describeTarget(target)} into ${spec.target.format} ${spec.target.path}`);
  try {
    const result: CaptureJobResult =
      spec.source.disk === 'all'
        ? await captureMachine({ ...request, outDir: dest, inventoryOnly: false, onProgress: (disk, p) => report(p, disk) }).then((m) => ({
            format: spec.target.format,
            images: m.disks.map((r) => capturedImage(r, join(spec.target.path, basename(r.dest)))),
            machineFile: join(spec.target.path, basename(m.machineFile)),
          }))
        : await captureDisk({ ...request, dest, onProgress: (p) => report(p) }).then((r) => ({ format: spec.target.format, images: [capturedImage(r, spec.target.path)] }));
    for (const image of result.images) log(describeImage(image));
    return result;
  } catch (err) {
    // A cancelled job is over: its resume files would only take space. A shutdown keeps them for the next attempt.
    if (signal.aborted && signal.reason === ABORT_CANCEL) {
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
    bytesOnWire: r.bytesOnWire,
    elapsedMs: Math.round(r.elapsedMs),
  };
}

function describeImage(i: CapturedImage): string {
  const resumed = i.start === 'resumed' ? `resumed with ${formatSize(i.resumedBytes)} already captured, ` : '';
  const frozen = i.frozen.length ? `, frozen: ${i.frozen.join(' ')}` : '';
  return `captured ${i.source} into ${i.path}: ${resumed}${formatSize(i.capturedBytes)} in use, ${formatSize(i.bytesOnWire)} on the wire, ${i.passes} pass(es)${frozen}, verified`;
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
