import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { GuestFs } from '../guestfs.js';
import type { GuestTool, WindowsDetails } from '../types.js';
import { toolFamilyOf } from '../inspect.js';
import { readKey, readTree } from './registry.js';

const UNINSTALL_KEYS = ['Microsoft\\Windows\\CurrentVersion\\Uninstall', 'WOW6432Node\\Microsoft\\Windows\\CurrentVersion\\Uninstall'];

export interface WindowsInspection {
  details: WindowsDetails;
  architecture: string;
  blockers: string[];
  tools: GuestTool[];
}

/** Guest paths of a Windows root, with the case the filesystem actually uses. */
export async function windowsPaths(g: GuestFs): Promise<{ systemRoot: string; system: string; software: string }> {
  const systemRoot = (await g.run('case-sensitive-path', ['/windows'])).trim();
  return {
    systemRoot,
    system: (await g.run('case-sensitive-path', [`${systemRoot}/system32/config/system`])).trim(),
    software: (await g.run('case-sensitive-path', [`${systemRoot}/system32/config/software`])).trim(),
  };
}

/** The control set Windows boots from (Select\Current), e.g. "ControlSet001". */
export async function currentControlSet(systemHive: string): Promise<string> {
  const current = (await readKey(systemHive, 'Select'))?.get('Current');
  return `ControlSet${String(current?.type === 'REG_DWORD' ? current.data : 1).padStart(3, '0')}`;
}

/** Version, edition and architecture from the registry; hibernation state from hiberfil.sys. */
export async function inspectWindows(g: GuestFs): Promise<WindowsInspection> {
  const paths = await windowsPaths(g);
  const work = await mkdtemp(join(tmpdir(), 'ferry-windows-'));
  try {
    const system = join(work, 'SYSTEM');
    const software = join(work, 'SOFTWARE');
    await g.run('download', [paths.system, system]);
    await g.run('download', [paths.software, software]);
    const controlSet = await currentControlSet(system);
    const str = (v: { type: string; data: unknown } | undefined) => (v && typeof v.data === 'string' ? v.data : null);
    const current = (await readKey(software, 'Microsoft\\Windows NT\\CurrentVersion')) ?? new Map();
    const major = current.get('CurrentMajorVersionNumber');
    const minor = current.get('CurrentMinorVersionNumber');
    // Windows 10 and later keep CurrentVersion at "6.3" for old programs; the real version is in these two.
    const ntVersion = major?.type === 'REG_DWORD' && minor?.type === 'REG_DWORD' ? `${major.data}.${minor.data}` : (str(current.get('CurrentVersion')) ?? '0.0');
    const environment = await readKey(system, `${controlSet}\\Control\\Session Manager\\Environment`);
    const arch = str(environment?.get('PROCESSOR_ARCHITECTURE'))?.toUpperCase();
    const power = await readKey(system, `${controlSet}\\Control\\Session Manager\\Power`);
    const hiberboot = power?.get('HiberbootEnabled');
    const fastStartup = hiberboot?.type === 'REG_DWORD' && hiberboot.data === 1;

    const blockers: string[] = [];
    const hiberfil = await g.tryRun('case-sensitive-path', ['/hiberfil.sys']);
    if (hiberfil && (await g.isFile(hiberfil.trim()))) {
      const header = join(work, 'hiberfil.header');
      await g.run('download-offset', [hiberfil.trim(), header, '0', '4']);
      const magic = (await readFile(header)).toString('latin1').toLowerCase();
      // A full shutdown zeroes the header; "hibr"/"wake" means a saved session Windows will resume.
      if (magic === 'hibr' || magic === 'wake') {
        blockers.push(
          fastStartup
            ? 'Windows was shut down with Fast Startup (hybrid shutdown) and will resume its saved session over any change: boot it, disable Fast Startup (powercfg /h off) or run "shutdown /s /t 0", then convert again'
            : 'Windows is hibernated and will resume its saved session over any change: boot it and shut it down fully ("shutdown /s /t 0"), then convert again',
        );
      }
    }

    const tools: GuestTool[] = [];
    for (const key of UNINSTALL_KEYS) {
      for (const [, values] of await readTree(software, key)) {
        const name = str(values.get('DisplayName'));
        const family = name ? toolFamilyOf(name) : undefined;
        if (name && family) tools.push({ family, name, kind: 'package' });
      }
    }
    return {
      details: {
        systemRoot: paths.systemRoot,
        productName: str(current.get('ProductName')),
        editionId: str(current.get('EditionID')),
        installationType: str(current.get('InstallationType')),
        currentBuild: str(current.get('CurrentBuildNumber')) ?? str(current.get('CurrentBuild')),
        ntVersion,
        controlSet,
        fastStartup,
      },
      architecture: arch === 'AMD64' ? 'x86_64' : arch === 'X86' ? 'i386' : arch === 'ARM64' ? 'aarch64' : 'unknown',
      blockers,
      tools,
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
