/**
 * Point-in-time captures of LVM logical volumes: when the device is a plain LVM volume and its volume
 * group has room, Ferry reads a temporary snapshot instead of the live volume. Creating it suspends the
 * volume with its filesystem frozen (device-mapper's lockfs), so the image is filesystem-consistent without
 * Ferry freezing anything, and the volume keeps running meanwhile.
 *
 * When the volume is not plain, the group has too little room, or lvcreate fails, the volume is read live
 * (with the usual passes and freeze) and the reason logged. The snapshot never outlives the capture: a guard command on the source removes it when its input ends,
 * which happens when Ferry releases it, and also when Ferry dies or the connection drops.
 */
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { shellQuote, type SshConnection } from './ssh-connection.js';

/** A snapshot's copy-on-write space, as a share of the volume, below which Ferry does not take one. */
const MIN_COW_SHARE = 0.1;
/** How long removing the snapshot may take before Ferry stops waiting (the guard still removes it). */
const REMOVE_TIMEOUT_MS = 60_000;

export interface LvmVolume {
  vg: string;
  lv: string;
  size: number;
  vgFree: number;
  extentSize: number;
  /** lv_attr: the first letter is the volume type ('-' plain, 'o' origin of snapshots, 's' a snapshot, 'V' thin, …). */
  attr: string;
}

export interface TemporarySnapshot {
  /** The device to read: /dev/VG/NAME. */
  path: string;
  name: string;
  /** Copy-on-write space, bytes. */
  size: number;
  /** Whether the snapshot overflowed its copy-on-write space (reading it then fails): why a capture failed. */
  overflowed(): Promise<boolean>;
  /** Removes the snapshot. */
  release(): Promise<void>;
}

/** The LVM volume `device` is, or undefined when it is none (or the source has no LVM tools). */
export async function findLvmVolume(conn: SshConnection, device: string): Promise<LvmVolume | undefined> {
  const r = await conn.exec(
    `lvs --noheadings --nosuffix --units b --separator '|' -o vg_name,lv_name,lv_size,vg_free,vg_extent_size,lv_attr -- ${shellQuote(device)} 2>/dev/null`,
    { asRoot: true },
  );
  if (r.code !== 0) return undefined;
  return parseLvs(r.stdout.toString('utf8'));
}

export function parseLvs(text: string): LvmVolume | undefined {
  const line = text.split('\n').find((l) => l.trim() !== '');
  if (!line) return undefined;
  const [vg, lv, size, vgFree, extentSize, attr] = line.trim().split('|');
  const numbers = [size, vgFree, extentSize].map(Number);
  if (!vg || !lv || !attr || numbers.some((n) => !Number.isSafeInteger(n) || n < 0)) return undefined;
  return { vg, lv, size: numbers[0], vgFree: numbers[1], extentSize: numbers[2], attr };
}

/**
 * The copy-on-write space a snapshot of `v` gets: as much as the volume (it can then never overflow) when
 * the group has it, else what the group has free, rounded down to whole extents; undefined, with the reason,
 * when a snapshot does not fit or does not apply.
 */
export function snapshotSize(v: LvmVolume): { size: number } | { reason: string } {
  const type = v.attr[0];
  if (type !== '-' && type !== 'o') return { reason: `${v.vg}/${v.lv} is not a plain logical volume (lv_attr ${v.attr})` };
  const extents = Math.floor(Math.min(v.size, v.vgFree) / v.extentSize);
  const size = extents * v.extentSize;
  if (size === 0 || size < Math.min(v.size, MIN_COW_SHARE * v.size)) {
    return { reason: `volume group ${v.vg} has ${v.vgFree} bytes free, less than a tenth of ${v.vg}/${v.lv} (${v.size} bytes)` };
  }
  return { size };
}

/** Takes a snapshot of `v` with `size` bytes of copy-on-write space, guarded so that it is removed whatever happens. */
export async function takeSnapshot(conn: SshConnection, v: LvmVolume, size: number, log: Logger): Promise<TemporarySnapshot> {
  const name = `ferry-snap-${randomBytes(4).toString('hex')}`;
  const target = `${v.vg}/${name}`;
  // Started first: whatever happens from here on (Ferry killed mid-lvcreate included), the snapshot goes.
  // sshd closes the command's input when the connection ends; HUP is ignored in case a terminal is involved.
  const guard = await conn.execChannel(`sh -c ${shellQuote(`trap '' HUP INT TERM PIPE; cat >/dev/null; lvremove -f ${shellQuote(target)} >/dev/null 2>&1`)}`, { asRoot: true });
  const removed = new Promise<void>((resolve) => guard.on('close', () => resolve()));
  guard.on('data', () => undefined);
  guard.stderr.on('data', () => undefined);
  const release = async () => {
    guard.end();
    await Promise.race([removed, new Promise<void>((resolve) => setTimeout(resolve, REMOVE_TIMEOUT_MS).unref())]);
  };
  const created = await conn.exec(`lvcreate --snapshot --yes --name ${shellQuote(name)} --size ${size}b -- ${shellQuote(`${v.vg}/${v.lv}`)}`, { asRoot: true });
  if (created.code !== 0) {
    await release();
    throw new Error(`lvcreate could not snapshot ${v.vg}/${v.lv}: ${created.stderr.trim() || `exit status ${created.code}`}`);
  }
  log.info({ volume: `${v.vg}/${v.lv}`, snapshot: target, cowBytes: size }, 'reading a temporary LVM snapshot');
  return {
    path: `/dev/${v.vg}/${name}`,
    name,
    size,
    async overflowed() {
      const r = await conn.exec(`lvs --noheadings -o lv_attr -- ${shellQuote(target)}`, { asRoot: true });
      // lv_attr's fifth letter is the state: 'I' for a snapshot invalidated by overflowing its space.
      return r.code === 0 && r.stdout.toString('utf8').trim()[4] === 'I';
    },
    release,
  };
}
