import { createCipheriv, createDecipheriv, randomBytes, randomUUID } from 'node:crypto';
import { mkdir, readFile, readdir, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Type, type Static } from 'typebox';
import { writeFileAtomic } from './atomic-file.js';
import { NotFoundError } from './errors.js';
import { STATE_DIR } from './paths.js';

const SshKeyCredential = Type.Object(
  {
    type: Type.Literal('ssh-key'),
    name: Type.String({ minLength: 1, maxLength: 200 }),
    privateKey: Type.String({ minLength: 1, maxLength: 64 * 1024, description: 'OpenSSH or PEM private key' }),
    passphrase: Type.Optional(Type.String({ maxLength: 1024 })),
  },
  { additionalProperties: false, title: 'SshKeyCredential' },
);
const PasswordCredential = Type.Object(
  { type: Type.Literal('password'), name: Type.String({ minLength: 1, maxLength: 200 }), password: Type.String({ minLength: 1, maxLength: 1024 }) },
  { additionalProperties: false, title: 'PasswordCredential' },
);

/** POST /v1/credentials: the secret goes in and never comes out of the API again. */
export const CredentialRequestSchema = Type.Unsafe<Static<typeof SshKeyCredential> | Static<typeof PasswordCredential>>({
  oneOf: [SshKeyCredential, PasswordCredential],
  discriminator: { propertyName: 'type' },
});
export type CredentialRequest = Static<typeof SshKeyCredential> | Static<typeof PasswordCredential>;

export const CredentialInfoSchema = Type.Object(
  { id: Type.String(), type: Type.Union([Type.Literal('ssh-key'), Type.Literal('password')]), name: Type.String(), createdAt: Type.String({ format: 'date-time' }) },
  { title: 'Credential', description: 'a stored credential; its secret is never returned' },
);
export type CredentialInfo = Static<typeof CredentialInfoSchema>;

/** What a credential file holds: the public fields in clear, the secret fields sealed with AES-256-GCM. */
interface SealedCredential extends CredentialInfo {
  iv: string;
  tag: string;
  sealed: string;
}

/**
 * Credentials (SSH keys, passwords) for capture, encrypted at rest with AES-256-GCM. The key is
 * FERRY_SECRET_KEY (32 bytes, hex or base64) or a key file generated (0600) in the data dir; workers on
 * other machines share the data dir or the variable. The credential id is bound to its ciphertext
 * (additional authenticated data), so a sealed secret cannot be moved under another id.
 */
export class CredentialVault {
  private constructor(
    private readonly dir: string,
    private readonly key: Buffer,
  ) {}

  static async open(dataDir: string): Promise<CredentialVault> {
    const stateDir = join(dataDir, STATE_DIR);
    const dir = join(stateDir, 'credentials');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    return new CredentialVault(dir, await loadSecretKey(stateDir));
  }

  async create(request: CredentialRequest): Promise<CredentialInfo> {
    const info: CredentialInfo = { id: randomUUID(), type: request.type, name: request.name, createdAt: new Date().toISOString() };
    const { type: _type, name: _name, ...secret } = request;
    const iv = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', this.key, iv);
    cipher.setAAD(Buffer.from(info.id));
    const sealed = Buffer.concat([cipher.update(JSON.stringify(secret), 'utf8'), cipher.final()]);
    const file: SealedCredential = { ...info, iv: iv.toString('base64'), tag: cipher.getAuthTag().toString('base64'), sealed: sealed.toString('base64') };
    await writeFileAtomic(this.path(info.id), JSON.stringify(file), { durable: true, mode: 0o600 });
    return info;
  }

  async list(): Promise<CredentialInfo[]> {
    const names = (await readdir(this.dir)).filter((n) => n.endsWith('.json'));
    const all = await Promise.all(names.map(async (n) => publicFields(JSON.parse(await readFile(join(this.dir, n), 'utf8')) as SealedCredential)));
    return all.sort((a, b) => (a.createdAt < b.createdAt ? -1 : 1));
  }

  /** The secret fields, for the worker that opens the SSH session; never for an API response or a log. */
  async reveal(id: string): Promise<Record<string, string>> {
    const file = await this.read(id);
    const decipher = createDecipheriv('aes-256-gcm', this.key, Buffer.from(file.iv, 'base64'));
    decipher.setAAD(Buffer.from(id));
    decipher.setAuthTag(Buffer.from(file.tag, 'base64'));
    return JSON.parse(Buffer.concat([decipher.update(Buffer.from(file.sealed, 'base64')), decipher.final()]).toString('utf8'));
  }

  async delete(id: string): Promise<void> {
    await unlink(this.path(id)).catch((err: NodeJS.ErrnoException) => {
      throw err.code === 'ENOENT' ? new NotFoundError(`no credential ${id}`) : err;
    });
  }

  private async read(id: string): Promise<SealedCredential> {
    const text = await readFile(this.path(id), 'utf8').catch((err: NodeJS.ErrnoException) => {
      throw err.code === 'ENOENT' ? new NotFoundError(`no credential ${id}`) : err;
    });
    return JSON.parse(text) as SealedCredential;
  }

  private path(id: string): string {
    // Ids are UUIDs we made; anything else cannot name a file here.
    if (!/^[0-9a-f-]{36}$/.test(id)) throw new NotFoundError(`no credential ${id}`);
    return join(this.dir, `${id}.json`);
  }
}

function publicFields(file: SealedCredential): CredentialInfo {
  return { id: file.id, type: file.type, name: file.name, createdAt: file.createdAt };
}

async function loadSecretKey(stateDir: string): Promise<Buffer> {
  const fromEnv = process.env.FERRY_SECRET_KEY;
  if (fromEnv) {
    const key = /^[0-9a-f]{64}$/i.test(fromEnv) ? Buffer.from(fromEnv, 'hex') : Buffer.from(fromEnv, 'base64');
    if (key.length !== 32) throw new Error('FERRY_SECRET_KEY must be 32 bytes, as 64 hex digits or base64');
    return key;
  }
  const path = join(stateDir, 'secret.key');
  try {
    await writeFile(path, randomBytes(32), { flag: 'wx', mode: 0o600 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  const key = await readFile(path);
  if (key.length !== 32) throw new Error(`${path} must hold a 32-byte key`);
  return key;
}
