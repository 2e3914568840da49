import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ferry, imagesIdentical, qemuImg, requireTool, tempDir } from './helpers/env.js';
import { makePatternedRaw } from './helpers/fixtures.js';

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

  it('refuses an unknown target before converting anything', async () => {
    const source = await makePatternedRaw(dir, 'any.raw');
    const r = await ferry(['convert', '-O', 'qcow2', '--inject', 'amiga', source, join(dir, 'never.qcow2')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/amiga/);
    expect(await readdir(dir)).not.toContain('never.qcow2');
  });
});
