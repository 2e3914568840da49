import { copyFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { CredentialVault } from '../src/jobs/credentials.js';
import { tempDir } from './helpers/env.js';

describe('credential vault', () => {
  let dir: string;
  let cleanup: () => Promise<void>;

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir('ferry-vault-'));
  });
  afterEach(async () => {
    delete process.env.FERRY_SECRET_KEY;
    await cleanup();
  });

  test('seals the secret at rest and opens it again for the worker that needs it', async () => {
    const vault = await CredentialVault.open(dir);
    const info = await vault.create({ type: 'password', name: 'root on db1', password: 'hunter2-correct-horse' });
    const file = await readFile(join(dir, '.ferry', 'credentials', `${info.id}.json`), 'utf8');
    expect(file).not.toContain('hunter2');
    expect(await vault.reveal(info.id)).toEqual({ password: 'hunter2-correct-horse' });
    // A second process on the same data dir (a worker) uses the same key file.
    expect(await (await CredentialVault.open(dir)).reveal(info.id)).toEqual({ password: 'hunter2-correct-horse' });
  });

  test('a sealed secret copied under another id does not open; a different key does not open it', async () => {
    const vault = await CredentialVault.open(dir);
    const info = await vault.create({ type: 'ssh-key', name: 'k', privateKey: 'PRIVATE', passphrase: 'pp' });
    const otherId = '00000000-0000-4000-8000-000000000000';
    const sealed = JSON.parse(await readFile(join(dir, '.ferry', 'credentials', `${info.id}.json`), 'utf8'));
    await copyFile(join(dir, '.ferry', 'credentials', `${info.id}.json`), join(dir, '.ferry', 'credentials', `${otherId}.json`));
    expect(sealed.id).toBe(info.id);
    await expect(vault.reveal(otherId)).rejects.toThrow(/authenticate/);

    process.env.FERRY_SECRET_KEY = 'ab'.repeat(32);
    await expect((await CredentialVault.open(dir)).reveal(info.id)).rejects.toThrow(/authenticate/);
    process.env.FERRY_SECRET_KEY = 'too-short';
    await expect(CredentialVault.open(dir)).rejects.toThrow(/FERRY_SECRET_KEY must be 32 bytes/);
  });
});
