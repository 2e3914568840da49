import { execFile } from 'node:child_process';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ferry, imagesIdentical, qemuImg, requireTool, tempDir } from './helpers/env.js';
import { debianGuestImage } from './helpers/debian-guest.js';
import { makePatternedRaw } from './helpers/fixtures.js';

const run = promisify(execFile);

/** convert --inject fixes the converted copy, never the source; an output that cannot be fixed is removed. */
describe('ferry convert --inject', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => ({ dir, cleanup } = await tempDir()));
  afterAll(() => cleanup());

  it('refuses a disk with no operating system, removes the output and leaves the source as it was', async () => {
    requireTool('guestfish', 'libguestfs-tools');
    const source = await makePatternedRaw(dir, 'no-os.raw');
    const pristine = join(dir, 'pristine.raw');
    await qemuImg('convert', '-O', 'raw', source, pristine);
    const out = join(dir, 'out.qcow2');
    const r = await ferry(['convert', '-O', 'qcow2', '--inject', 'kvm', source, out], { timeoutMs: 300_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/no operating system found/);
    expect((await readdir(dir)).sort()).toEqual(['no-os.raw', 'pristine.raw']);
    expect(await imagesIdentical(source, pristine)).toBe(true);
  });

  it('fixes the guest for a streamOptimized VMDK on a qcow2 copy first, as that format cannot be changed once written', async () => {
    requireTool('virt-cat', 'libguestfs-tools');
    const guest = await debianGuestImage();
    const out = join(dir, 'guest.vmdk');
    const r = await ferry(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', '--inject', 'kvm', guest, out], { timeoutMs: 600_000 });
    expect(r.code, r.stderr).toBe(0);
    const info = JSON.parse(await qemuImg('info', '--output=json', out));
    expect(info['format-specific'].data['create-type']).toBe('streamOptimized');
    expect(await qemuImg('check', out)).toMatch(/No errors/);
    const report = JSON.parse(await readFile(`${out}.ferry-inject.json`, 'utf8'));
    expect(report.image).toBe(out);
    expect((await readdir(dir)).filter((name) => name.includes('.ferry-inject.qcow2'))).toEqual([]);
    // The fix is in the final image, read back by libguestfs from the VMDK itself.
    const { stdout } = await run('virt-cat', ['-a', out, '/etc/initramfs-tools/modules'], { env: { ...process.env, LIBGUESTFS_BACKEND: 'direct', LIBGUESTFS_BACKEND_SETTINGS: 'force_tcg' } });
    expect(stdout).toMatch(/virtio_blk/);
  }, 700_000);

  it('refuses an unknown target before converting anything', async () => {
    const source = await makePatternedRaw(dir, 'any.raw');
    const r = await ferry(['convert', '-O', 'qcow2', '--inject', 'amiga', source, join(dir, 'never.qcow2')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/amiga/);
    expect(await readdir(dir)).not.toContain('never.qcow2');
  });
});
