import { createRequire } from 'node:module';

type Crypto = typeof import('node:crypto');
let crypto: Crypto | undefined;

/**
 * node:crypto, loaded on first use. Every image command loads the format writers, and only some writers need
 * random identifiers: loading it up front costs each conversion's start-up Node's two dozen crypto modules.
 */
function nodeCrypto(): Crypto {
  return (crypto ??= createRequire(import.meta.url)('node:crypto') as Crypto);
}

export function randomBytes(size: number): Buffer {
  return nodeCrypto().randomBytes(size);
}

export function randomUUID(): string {
  return nodeCrypto().randomUUID();
}
