/**
 * Entry points for capturing over SSH, shared by the CLI and (later) jobs: one disk into one image, or a
 * whole machine (every fixed disk plus machine.json).
 */
import { randomBytes } from 'node:crypto';
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { findDriver } from '../convert/registry.js';
import { resolveOptions } from '../convert/options.js';
import { InvalidOptionError, errorMessage } from '../errors.js';
import { MAX_CHUNK, MIN_CHUNK } from '../transfer/protocol.js';
import { RateLimiter } from '../transfer/rate-limiter.js';
import { knownHostsPolicy, pinnedHostKeys, type HostKeyPolicy } from './known-hosts.js';
import { describeMachine, type MachineDescription } from './machine.js';
import { CaptureSession, type CaptureProgress, type CaptureResult, type CaptureSettings } from './session.js';
import { SshConnection, type SshAuth, type SshTarget } from './ssh-connection.js';
import { SshBlockSource } from './ssh-source.js';
import { CaptureConsistencyError } from './errors.js';
import { findLvmVolume, snapshotSize, takeSnapshot, type TemporarySnapshot } from './lvm-snapshot.js';
import type { Logger } from 'pino';

export interface TransferSettings {
  /** Agent processes reading in parallel (SSH exec channels on one connection). */
  channels: number;
  /** zstd level at the source; 0 sends data uncompressed. */
  level: number;
  /** Bytes per second on the wire, all channels together; undefined for no limit. */
  bandwidth?: number;
}

export interface HostKeySettings {
  /** An OpenSSH known_hosts file; ~/.ssh/known_hosts when neither this nor `pins` is given. */
  knownHostsFile?: string;
  /** Trusted SHA256 fingerprints (--host-key). */
  pins?: string[];
}

export type DiskSettings = Omit<CaptureSettings, 'dest' | 'onProgress'>;

export interface DiskCaptureRequest {
  target: SshTarget;
  auth: SshAuth;
  hostKeys: HostKeySettings;
  transfer: TransferSettings;
  dest: string;
  settings: DiskSettings;
  onProgress?: (p: CaptureProgress) => void;
}

export interface MachineCaptureRequest extends Omit<DiskCaptureRequest, 'dest' | 'onProgress'> {
  outDir: string;
  /** Write machine.json only, capturing nothing (to review what a capture would take). */
  inventoryOnly: boolean;
  onProgress?: (disk: string, p: CaptureProgress) => void;
}

export interface MachineCaptureResult {
  machine: MachineDescription;
  disks: CaptureResult[];
  machineFile: string;
}

/** Image file name extensions, by format. */
const EXTENSION: Record<string, string> = { raw: 'raw', qcow2: 'qcow2', vmdk: 'vmdk', vhd: 'vhd', vhdx: 'vhdx', vdi: 'vdi' };

export async function captureDisk(req: DiskCaptureRequest): Promise<CaptureResult> {
  checkSettings(req);
  if (!req.target.device) throw new InvalidOptionError('the source URL names no device: ssh://USER@HOST/DEVICE (or use --all-disks)', { field: 'source' });
  const conn = await connect(req);
  try {
    return await captureOne(conn, req.target.device, req.dest, req, req.onProgress);
  } finally {
    conn.close();
  }
}

export async function captureMachine(req: MachineCaptureRequest): Promise<MachineCaptureResult> {
  checkSettings(req);
  if (req.target.device) throw new InvalidOptionError('--all-disks captures every disk: give the source as ssh://USER@HOST[:PORT] without a device', { field: 'source' });
  const conn = await connect(req);
  try {
    const machine = await describeMachine(conn);
    await mkdir(req.outDir, { recursive: true });
    const format = findDriver(req.settings.format).name;
    const machineFile = join(req.outDir, 'machine.json');
    const results: CaptureResult[] = [];
    for (const disk of machine.disks) {
      const file = `${disk.name}.${EXTENSION[format] ?? format}`;
      disk.image = { file, format };
      if (req.inventoryOnly) continue;
      results.push(await captureOne(conn, disk.path, join(req.outDir, file), req, (p) => req.onProgress?.(disk.name, p)));
    }
    await writeAtomically(machineFile, JSON.stringify({ source: `${req.target.user}@${req.target.host}`, capturedAt: new Date().toISOString(), ...machine }, null, 2) + '\n');
    return { machine, disks: results, machineFile };
  } finally {
    conn.close();
  }
}

async function captureOne(
  conn: SshConnection,
  device: string,
  dest: string,
  req: Omit<DiskCaptureRequest, 'dest' | 'target' | 'onProgress'>,
  onProgress: ((p: CaptureProgress) => void) | undefined,
): Promise<CaptureResult> {
  const limiter = req.transfer.bandwidth ? new RateLimiter(req.transfer.bandwidth) : undefined;
  const snapshot = req.settings.snapshot ? await snapshotOf(conn, device, req.settings.log) : undefined;
  try {
    const source = await SshBlockSource.open(conn, device, { channels: req.transfer.channels, level: req.transfer.level, limiter, readFrom: snapshot?.path });
    try {
      const result = await new CaptureSession(source, { ...req.settings, dest, onProgress }).run();
      return snapshot ? { ...result, snapshot: { name: snapshot.name, cowBytes: snapshot.size } } : result;
    } catch (err) {
      if (snapshot && (await snapshot.overflowed().catch(() => false))) {
        throw new CaptureConsistencyError(
          `the snapshot of ${device} overflowed its ${snapshot.size} bytes of copy-on-write space while it was read (the volume changed faster than it could be copied): ` +
            'free space in the volume group and run the same command again (only the rest is fetched), or capture with --no-snapshot',
          { cause: err },
        );
      }
      throw err;
    } finally {
      await source.close();
    }
  } finally {
    await snapshot?.release();
  }
}

/** A temporary snapshot of `device` when it is an LVM volume whose group has room; the reason is logged when not. */
async function snapshotOf(conn: SshConnection, device: string, log: Logger): Promise<TemporarySnapshot | undefined> {
  const volume = await findLvmVolume(conn, device);
  if (!volume) return undefined;
  const fit = snapshotSize(volume);
  let reason: string;
  if ('reason' in fit) reason = fit.reason;
  else {
    try {
      return await takeSnapshot(conn, volume, fit.size, log);
    } catch (err) {
      reason = errorMessage(err);
    }
  }
  log.warn({ device, reason }, 'no LVM snapshot: reading the volume live');
  return undefined;
}

/** Fails on bad settings before anything connects. */
function checkSettings(req: { settings: DiskSettings; transfer: TransferSettings }): void {
  const s = req.settings;
  const driver = findDriver(s.format);
  if (!driver.create) throw new InvalidOptionError(`format ${driver.name} is read-only`, { field: 'format' });
  resolveOptions(driver.name, driver.createOptions, s.formatOptions ?? {});
  if (s.compress && !driver.compression) throw new InvalidOptionError(`format ${driver.name} does not support compression (-c)`, { field: 'compress' });
  if (!Number.isInteger(s.chunkSize) || s.chunkSize < MIN_CHUNK || s.chunkSize > MAX_CHUNK || s.chunkSize % MIN_CHUNK !== 0) {
    throw new InvalidOptionError(`chunk size must be a multiple of ${MIN_CHUNK} from ${MIN_CHUNK} to ${MAX_CHUNK} bytes`, { field: 'chunk-size' });
  }
  if (req.transfer.level < 0 || req.transfer.level > 19) throw new InvalidOptionError('--level must be 0 (no compression) to 19', { field: 'level' });
}

async function connect(req: { target: SshTarget; auth: SshAuth; hostKeys: HostKeySettings }): Promise<SshConnection> {
  return SshConnection.open(req.target, req.auth, await hostKeyPolicy(req.target, req.hostKeys));
}

async function hostKeyPolicy(target: SshTarget, keys: HostKeySettings): Promise<HostKeyPolicy> {
  if (keys.pins?.length) return pinnedHostKeys(keys.pins);
  return knownHostsPolicy(keys.knownHostsFile ?? join(homedir(), '.ssh', 'known_hosts'), target.host, target.port);
}

async function writeAtomically(path: string, text: string): Promise<void> {
  const tmp = `${path}.${randomBytes(4).toString('hex')}.tmp`;
  await writeFile(tmp, text, { mode: 0o644 });
  await rename(tmp, path);
}
