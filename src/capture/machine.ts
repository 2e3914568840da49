/**
 * What a conversion and the target VM definition need to know about a source machine: CPUs, memory,
 * firmware, disks with their partitions, NICs with MAC addresses, OS release. Gathered with standard tools
 * (lsblk, /proc, /sys) over the capture's SSH connection; parsed here, on the Ferry side.
 */
import { SourceConnectionError } from './errors.js';
import type { SshConnection } from './ssh-connection.js';

export interface MachinePartition {
  name: string;
  path: string;
  /** Byte offset on its disk. */
  start: number | null;
  size: number;
  /** MBR type (0x83) or GPT type GUID. */
  type: string | null;
  uuid: string | null;
  label: string | null;
  fsType: string | null;
  fsUuid: string | null;
  mountpoint: string | null;
}

export interface MachineDisk {
  name: string;
  path: string;
  size: number;
  model: string | null;
  serial: string | null;
  partitionTable: { type: string; uuid: string | null } | null;
  partitions: MachinePartition[];
  /** Filled in once captured: the image file (relative to machine.json) and its format. */
  image?: { file: string; format: string };
}

export interface MachineNic {
  name: string;
  mac: string;
  /** No device behind it (a bridge, a bond, a veth): not something the target VM needs as hardware. */
  virtual: boolean;
  driver: string | null;
}

export interface MachineDescription {
  hostname: string;
  cpus: number;
  memoryBytes: number;
  firmware: 'bios' | 'uefi';
  architecture: string;
  kernel: string;
  os: { id: string | null; versionId: string | null; prettyName: string | null };
  disks: MachineDisk[];
  nics: MachineNic[];
}

const SECTION = '=== ferry:';
const COLUMNS = 'NAME,KNAME,PATH,SIZE,TYPE,RM,RO,PTTYPE,PTUUID,PARTTYPE,PARTUUID,PARTLABEL,FSTYPE,UUID,MOUNTPOINT,MODEL,SERIAL';

/** One round trip: every section printed under a marker, parsed below. Nothing here needs root. */
const INVENTORY_SCRIPT = `
s() { echo "${SECTION}$1"; }
s hostname; cat /proc/sys/kernel/hostname
s cpus; getconf _NPROCESSORS_ONLN 2>/dev/null || grep -c ^processor /proc/cpuinfo
s memory; grep '^MemTotal:' /proc/meminfo
s firmware; if [ -d /sys/firmware/efi ]; then echo uefi; else echo bios; fi
s uname; uname -m; uname -r
s os-release; cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null
s lsblk; lsblk -J -b -o ${COLUMNS}
s starts; for p in /sys/class/block/*/start; do [ -r "$p" ] && echo "$(basename "$(dirname "$p")") $(cat "$p")"; done
s nics; for n in /sys/class/net/*; do
  [ "$(cat "$n/type" 2>/dev/null)" = 772 ] && continue
  d=-; [ -e "$n/device" ] && d=$(basename "$(readlink -f "$n/device/driver" 2>/dev/null)" 2>/dev/null)
  echo "$(basename "$n") $(cat "$n/address" 2>/dev/null) $([ -e "$n/device" ] && echo physical || echo virtual) \${d:--}"
done
s end
`;

export async function describeMachine(conn: SshConnection): Promise<MachineDescription> {
  const r = await conn.exec(INVENTORY_SCRIPT);
  if (r.code !== 0) throw new SourceConnectionError(`cannot inventory the source: ${r.stderr.trim() || `exit status ${r.code}`}`);
  return parseInventory(r.stdout.toString('utf8'));
}

export function parseInventory(text: string): MachineDescription {
  const sections = new Map<string, string[]>();
  let current: string[] | undefined;
  for (const line of text.split('\n')) {
    if (line.startsWith(SECTION)) sections.set(line.slice(SECTION.length).trim(), (current = []));
    else current?.push(line);
  }
  const lines = (name: string) => (sections.get(name) ?? []).filter((l) => l.trim() !== '');
  const first = (name: string) => lines(name)[0]?.trim() ?? '';

  const osRelease = new Map<string, string>();
  for (const l of lines('os-release')) {
    const m = /^([A-Z_]+)=(.*)$/.exec(l.trim());
    if (m) osRelease.set(m[1], m[2].replace(/^"(.*)"$/, '$1'));
  }
  const memKiB = Number(/MemTotal:\s+(\d+)/.exec(first('memory'))?.[1] ?? 0);
  const [architecture = '', kernel = ''] = lines('uname').map((l) => l.trim());
  const starts = new Map<string, number>();
  for (const l of lines('starts')) {
    const [name, sectors] = l.trim().split(/\s+/);
    // /sys reports partition starts in 512-byte units whatever the disk's sector size.
    if (name && /^\d+$/.test(sectors ?? '')) starts.set(name, Number(sectors) * 512);
  }
  return {
    hostname: first('hostname'),
    cpus: Number(first('cpus')) || 0,
    memoryBytes: memKiB * 1024,
    firmware: first('firmware') === 'uefi' ? 'uefi' : 'bios',
    architecture,
    kernel,
    os: { id: osRelease.get('ID') ?? null, versionId: osRelease.get('VERSION_ID') ?? null, prettyName: osRelease.get('PRETTY_NAME') ?? null },
    disks: parseDisks(lines('lsblk').join('\n'), starts),
    nics: lines('nics').flatMap((l): MachineNic[] => {
      const [name, mac, kind, driver] = l.trim().split(/\s+/);
      if (!name || !mac || !/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i.test(mac) || /^(00:){5}00$/.test(mac)) return [];
      return [{ name, mac: mac.toLowerCase(), virtual: kind === 'virtual', driver: driver && driver !== '-' ? driver : null }];
    }),
  };
}

interface LsblkNode {
  name: string;
  kname?: string;
  path?: string;
  size: number | string;
  type: string;
  rm: boolean | string;
  ro: boolean | string;
  pttype?: string | null;
  ptuuid?: string | null;
  parttype?: string | null;
  partuuid?: string | null;
  partlabel?: string | null;
  fstype?: string | null;
  uuid?: string | null;
  mountpoint?: string | null;
  model?: string | null;
  serial?: string | null;
  children?: LsblkNode[];
}

/**
 * The fixed disks: whole disks that are not removable, read-only, empty, or RAM-backed (zram, ram).
 * Loop devices, optical drives and device-mapper volumes on top of disks are not disks of their own.
 */
function parseDisks(json: string, starts: Map<string, number>): MachineDisk[] {
  if (!json.trim()) return [];
  const tree = JSON.parse(json) as { blockdevices?: LsblkNode[] };
  const flag = (v: boolean | string) => v === true || v === '1' || v === 'true';
  const str = (v: string | null | undefined) => (v === undefined || v === null || v === '' ? null : String(v).trim());
  return (tree.blockdevices ?? [])
    .filter((d) => d.type === 'disk' && !flag(d.rm) && !flag(d.ro) && Number(d.size) > 0 && !/^(zram|ram)\d/.test(d.name))
    .map((d) => ({
      name: d.name,
      path: d.path ?? `/dev/${d.name}`,
      size: Number(d.size),
      model: str(d.model),
      serial: str(d.serial),
      partitionTable: d.pttype ? { type: d.pttype, uuid: str(d.ptuuid) } : null,
      partitions: (d.children ?? [])
        .filter((p) => p.type === 'part')
        .map((p) => ({
          name: p.name,
          path: p.path ?? `/dev/${p.name}`,
          start: starts.get(p.kname ?? p.name) ?? null,
          size: Number(p.size),
          type: str(p.parttype),
          uuid: str(p.partuuid),
          label: str(p.partlabel),
          fsType: str(p.fstype),
          fsUuid: str(p.uuid),
          mountpoint: str(p.mountpoint),
        })),
    }));
}
