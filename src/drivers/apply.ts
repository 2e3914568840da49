import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createLogger } from '../log.js';
import { GuestFsError, InjectionError } from './errors.js';
import type { GuestFs } from './guestfs.js';
import type { Change, Hive } from './types.js';
import { windowsPaths } from './windows/inspect.js';
import { mergeIntoHive, type RegistryEdit } from './windows/registry.js';

const log = createLogger('inject');

/**
 * Applies planned changes to the mounted guest, in order. Registry changes are gathered per hive and
 * merged in one pass at the end (download the hive, hivexregedit --merge, upload).
 */
export async function applyChanges(g: GuestFs, changes: Change[], work: string): Promise<void> {
  const registry = new Map<Hive, RegistryEdit[]>();
  let n = 0;
  for (const change of changes) {
    switch (change.kind) {
      case 'file.write': {
        const local = join(work, `write-${n++}`);
        await writeFile(local, change.after);
        await g.run('mkdir-p', [parent(change.path)]);
        await g.run('upload', [local, change.path]);
        if (change.mode !== undefined) await g.run('chmod', ['0' + change.mode.toString(8), change.path]);
        break;
      }
      case 'file.upload':
        await g.run('mkdir-p', [parent(change.path)]);
        await g.run('upload', [change.source, change.path]);
        break;
      case 'file.copy':
        await g.run('cp-a', [change.source, change.path]);
        break;
      case 'file.remove':
        await g.run('rm-f', [change.path]);
        break;
      case 'guest.command': {
        const started = Date.now();
        try {
          const output = await g.run('sh', [change.command]);
          log.info({ command: change.command, ms: Date.now() - started, output: output.slice(-2000) }, 'guest command finished');
        } catch (err) {
          if (err instanceof GuestFsError) throw new InjectionError(`'${change.command}' failed in the guest: ${err.message}`, { field: change.command });
          throw err;
        }
        break;
      }
      case 'registry.set': {
        const edits = registry.get(change.hive) ?? [];
        edits.push({ key: change.key, name: change.name, value: change.after });
        registry.set(change.hive, edits);
        break;
      }
    }
  }
  if (!registry.size) return;
  const paths = await windowsPaths(g);
  for (const [hive, edits] of registry) {
    const guestPath = hive === 'SYSTEM' ? paths.system : paths.software;
    const local = join(work, `apply-${hive}`);
    await g.run('download', [guestPath, local]);
    await mergeIntoHive(local, hive, edits, `${local}.reg`);
    await g.run('upload', [local, guestPath]);
  }
}

function parent(path: string): string {
  return path.slice(0, path.lastIndexOf('/')) || '/';
}
