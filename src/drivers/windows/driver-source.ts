import { readFile, readdir, stat } from 'node:fs/promises';
import { basename, dirname, join, relative } from 'node:path';

/**
 * Finds a driver's files for one Windows version and architecture in a driver folder: a virtio-win
 * tree ("viostor/w10/amd64/viostor.sys" or "amd64/w10/viostor.sys"), a VMware Tools or AWS driver
 * folder, or a flat folder. Folder names carry the version and architecture; the best match wins.
 */
export interface DriverPackage {
  /** Folder holding the .sys (and usually the .inf and .cat). */
  folder: string;
  /** Files of the package in that folder (debug symbols left out). */
  files: string[];
  sys: string;
  inf: string | null;
}

const ARCH_FOLDERS: Record<string, string[]> = {
  x86_64: ['amd64', 'x64', 'x86_64'],
  i386: ['x86', 'i386'],
  aarch64: ['arm64', 'aarch64'],
};

/** Version folder names, most specific first, for an NT version and client/server installation. */
export function versionFolders(ntVersion: string, server: boolean, build: number): string[] {
  const client: Record<string, string[]> = {
    '6.1': ['w7', 'win7'],
    '6.2': ['w8', 'win8'],
    '6.3': ['w8.1', 'win8.1'],
    '10.0': build >= 22000 ? ['w11', 'win11', 'w10', 'win10'] : ['w10', 'win10'],
  };
  const servers: Record<string, string[]> = {
    '6.1': ['2k8r2', 'win2008r2'],
    '6.2': ['2k12', 'win2012'],
    '6.3': ['2k12r2', 'win2012r2'],
    '10.0': [...(build >= 20348 ? ['2k22', 'win2022'] : []), ...(build >= 17763 ? ['2k19', 'win2019'] : []), '2k16', 'win2016'],
  };
  return (server ? servers : client)[ntVersion] ?? [];
}

export async function findDriverPackage(root: string, sysName: string, arch: string, versions: string[]): Promise<DriverPackage | null> {
  const matches = (await walk(root)).filter((p) => basename(p).toLowerCase() === sysName.toLowerCase());
  const archNames = ARCH_FOLDERS[arch] ?? [];
  const allArchs = Object.values(ARCH_FOLDERS).flat();
  const ranked = matches
    .map((path) => {
      const parts = relative(root, dirname(path)).toLowerCase().split(/[\\/]/);
      const archOk = parts.some((p) => archNames.includes(p)) || !parts.some((p) => allArchs.includes(p));
      const versionRank = versions.findIndex((v) => parts.includes(v));
      const hasVersion = parts.some((p) => /^(w\d|win\d|2k\d|xp|vista)/.test(p));
      return { path, archOk, score: versionRank >= 0 ? versionRank : hasVersion ? -1 : versions.length };
    })
    .filter((m) => m.archOk && m.score >= 0)
    .sort((a, b) => a.score - b.score || a.path.localeCompare(b.path));
  const best = ranked[0];
  if (!best) return null;
  const folder = dirname(best.path);
  const files = (await readdir(folder)).filter((f) => !/\.pdb$/i.test(f)).map((f) => join(folder, f));
  const stem = sysName.replace(/\.sys$/i, '').toLowerCase();
  const inf = files.find((f) => basename(f).toLowerCase() === `${stem}.inf`) ?? files.find((f) => /\.inf$/i.test(f)) ?? null;
  return { folder, files, sys: best.path, inf };
}

async function walk(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await walk(path)));
    else if (entry.isFile() || (entry.isSymbolicLink() && (await stat(path)).isFile())) out.push(path);
  }
  return out;
}

/**
 * The install section an INF uses for a hardware id: the models sections listed under [Manufacturer]
 * hold lines "%Desc% = section, PCI\VEN_…". Used to register the driver in Windows 8+'s driver database.
 */
export async function infInstallSection(infPath: string, hardwareIds: string[]): Promise<{ section: string; hardwareId: string } | null> {
  const raw = await readFile(infPath);
  const text = raw[0] === 0xff && raw[1] === 0xfe ? raw.toString('utf16le') : raw.toString('latin1');
  const wanted = hardwareIds.map((h) => h.toLowerCase());
  for (const line of text.split(/\r?\n/)) {
    const m = /^\s*[^;=]*=\s*([^,;\s]+)\s*,([^;]*)/.exec(line);
    if (!m) continue;
    const ids = m[2]!.split(',').map((s) => s.trim().toLowerCase());
    const hit = ids.find((id) => wanted.some((w) => id === w || id.startsWith(w + '&')));
    if (hit) return { section: m[1]!, hardwareId: hardwareIds.find((h) => hit.startsWith(h.toLowerCase()))! };
  }
  return null;
}
