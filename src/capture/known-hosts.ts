import { createHash, createHmac } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { ServerHostKeyAlgorithm } from 'ssh2';
import { InvalidOptionError } from '../errors.js';

/** What a host key check concluded. Only 'trusted' lets the connection proceed. */
export type HostKeyVerdict = 'trusted' | 'unknown' | 'changed' | 'revoked';

/** Decides whether the key a server presents is the one expected for it. */
export interface HostKeyPolicy {
  check(keyBlob: Buffer): HostKeyVerdict;
  /** Host key algorithms to offer, so the server presents a key type the policy can vouch for. */
  readonly algorithms?: ServerHostKeyAlgorithm[];
  /** Where the expected keys come from, for error messages. */
  readonly origin: string;
}

/** OpenSSH's fingerprint: SHA256:base64(sha256(key blob)) without padding. */
export function fingerprint(keyBlob: Buffer): string {
  return 'SHA256:' + createHash('sha256').update(keyBlob).digest('base64').replace(/=+$/, '');
}

/** The key type named inside an SSH public key blob (its first length-prefixed string). */
export function keyType(keyBlob: Buffer): string {
  if (keyBlob.length < 4) return '';
  const n = keyBlob.readUInt32BE(0);
  return n > 64 || 4 + n > keyBlob.length ? '' : keyBlob.subarray(4, 4 + n).toString('latin1');
}

/** Trusts exactly the given fingerprints (`--host-key SHA256:...`). */
export function pinnedHostKeys(fingerprints: string[]): HostKeyPolicy {
  const wanted = new Set(
    fingerprints.map((f) => {
      const m = /^SHA256:([A-Za-z0-9+/]{43})=?$/.exec(f.trim());
      if (!m) throw new InvalidOptionError(`--host-key must be an OpenSSH SHA256 fingerprint (SHA256:<43 base64 characters>), not '${f}'`, { field: 'host-key' });
      return `SHA256:${m[1]}`;
    }),
  );
  return {
    origin: '--host-key',
    check: (blob) => (wanted.has(fingerprint(blob)) ? 'trusted' : 'changed'),
  };
}

interface KnownHostEntry {
  marker: '' | '@revoked' | '@cert-authority';
  patterns: string;
  type: string;
  key: Buffer;
}

/** Host key algorithms that can present a key of each known_hosts key type. */
const ALGORITHMS_FOR_TYPE: Record<string, ServerHostKeyAlgorithm[]> = {
  'ssh-ed25519': ['ssh-ed25519'],
  'ecdsa-sha2-nistp256': ['ecdsa-sha2-nistp256'],
  'ecdsa-sha2-nistp384': ['ecdsa-sha2-nistp384'],
  'ecdsa-sha2-nistp521': ['ecdsa-sha2-nistp521'],
  'ssh-rsa': ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'],
};

/**
 * Trusts the keys an OpenSSH known_hosts file lists for the host: plain and hashed (|1|salt|hash) names,
 * `[host]:port` for other ports, `*`/`?` wildcards and `!` negation, and @revoked markers. A host with
 * entries but none matching is 'changed'; a host without entries is 'unknown'.
 */
export async function knownHostsPolicy(file: string, host: string, port: number): Promise<HostKeyPolicy> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    text = '';
  }
  const name = port === 22 ? host : `[${host}]:${port}`;
  const entries = parseKnownHosts(text).filter((e) => e.marker !== '@cert-authority' && hostMatches(e.patterns, name));
  const trusted = entries.filter((e) => e.marker === '');
  const types = [...new Set(trusted.map((e) => e.type))];
  const algorithms = types.flatMap((t) => ALGORITHMS_FOR_TYPE[t] ?? []);
  return {
    origin: file,
    algorithms: algorithms.length ? algorithms : undefined,
    check(blob) {
      if (entries.some((e) => e.marker === '@revoked' && e.key.equals(blob))) return 'revoked';
      if (trusted.some((e) => e.key.equals(blob))) return 'trusted';
      return trusted.length ? 'changed' : 'unknown';
    },
  };
}

function parseKnownHosts(text: string): KnownHostEntry[] {
  const out: KnownHostEntry[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const fields = line.split(/\s+/);
    let marker: KnownHostEntry['marker'] = '';
    if (fields[0] === '@revoked' || fields[0] === '@cert-authority') marker = fields.shift() as KnownHostEntry['marker'];
    if (fields.length < 3) continue;
    const [patterns, type, base64] = fields;
    const key = Buffer.from(base64, 'base64');
    // A line whose blob does not name its own type is damaged: skip it rather than trust garbage.
    if (keyType(key) !== type) continue;
    out.push({ marker, patterns, type, key });
  }
  return out;
}

function hostMatches(patterns: string, name: string): boolean {
  if (patterns.startsWith('|1|')) return hashedMatches(patterns, name);
  let matched = false;
  for (const p of patterns.split(',')) {
    if (p.startsWith('!')) {
      if (globMatches(p.slice(1), name)) return false;
    } else if (globMatches(p, name)) matched = true;
  }
  return matched;
}

/** HashKnownHosts entries: |1|base64(salt)|base64(HMAC-SHA1(salt, name)). */
function hashedMatches(pattern: string, name: string): boolean {
  const [, , salt, hash] = pattern.split('|');
  if (!salt || !hash) return false;
  const mac = createHmac('sha1', Buffer.from(salt, 'base64')).update(name).digest('base64');
  return mac === hash;
}

function globMatches(pattern: string, name: string): boolean {
  const re = new RegExp('^' + pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.') + '$', 'i');
  return re.test(name);
}
