import { execFile } from 'node:child_process';
import { chmod, lstat, mkdir, open, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { InvalidOptionError } from '../../errors.js';

const run = promisify(execFile);

/** ISO 9660 volume descriptors start at sector 16; each carries "CD001" after its type byte. */
const ISO_SIGNATURE_OFFSET = 16 * 2048 + 1;
const ISO_SIGNATURE = 'CD001';

/**
 * The folder behind `--drivers`. A folder is used as it is. An ISO 9660 image — virtio-win is shipped as
 * virtio-win.iso — is unpacked into `work` with xorriso, on the host and without mounting (which would need
 * privileges an injection should not ask for). Anything else is refused.
 */
export async function driverFolder(path: string, work: string): Promise<string> {
  if ((await driverMediaKind(path)) === 'folder') return path;
  const into = join(work, 'drivers-iso');
  await mkdir(into);
  try {
    await run('xorriso', ['-osirrox', 'on', '-indev', path, '-extract', '/', into], { maxBuffer: 16 * 1024 * 1024 });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT') throw new InvalidOptionError('reading a driver ISO needs xorriso (Debian package xorriso)', { field: 'drivers' });
    const reason = (e.stderr ?? '').split('\n').find((l) => /FAILURE|SORRY|FATAL/.test(l)) ?? e.message;
    throw new InvalidOptionError(`--drivers ${path}: the ISO could not be read: ${reason.trim()}`, { field: 'drivers' });
  }
  await keepPlainFiles(into);
  return into;
}

/** What `--drivers` names, checked before any long work starts; a bad path is a usage error. */
export async function driverMediaKind(path: string): Promise<'folder' | 'iso'> {
  const info = await lstat(path).catch(() => null);
  if (!info) throw new InvalidOptionError(`--drivers ${path}: no such file or folder`, { field: 'drivers' });
  if (info.isDirectory()) return 'folder';
  if (info.isFile() && (await isIso9660(path))) return 'iso';
  throw new InvalidOptionError(`--drivers ${path}: neither a folder nor an ISO 9660 image (such as virtio-win.iso)`, { field: 'drivers' });
}

async function isIso9660(path: string): Promise<boolean> {
  const handle = await open(path, 'r');
  try {
    const signature = Buffer.alloc(ISO_SIGNATURE.length);
    const { bytesRead } = await handle.read(signature, 0, signature.length, ISO_SIGNATURE_OFFSET);
    return bytesRead === signature.length && signature.toString('latin1') === ISO_SIGNATURE;
  } finally {
    await handle.close();
  }
}

/**
 * Removes what an ISO may carry besides files and folders: a Rock Ridge symlink to, say, /etc/shadow would
 * otherwise be followed and copied into the guest. Folders are made writable so the work folder can be
 * removed (ISO folders extract read-only).
 */
async function keepPlainFiles(dir: string): Promise<void> {
  await chmod(dir, 0o755);
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) await keepPlainFiles(path);
    else if (!entry.isFile()) await rm(path, { force: true });
  }
}
