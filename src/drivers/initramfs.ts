import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { InjectionError } from './errors.js';

/**
 * Lists the files in an initramfs on the host, whatever built it: one or more "newc" cpio archives,
 * each plain (early microcode) or compressed (gzip, zstd, xz, lzma, bzip2, lz4), concatenated. The
 * decompressors are the host's command-line tools; the cpio headers are parsed here.
 */
export async function listInitramfs(path: string): Promise<string[]> {
  const names: string[] = [];
  await walk(await readFile(path), path, names);
  return names;
}

/** Kernel module names (with "_" for "-", as the kernel reports them) among initramfs paths. */
export function modulesIn(paths: string[]): string[] {
  const modules = new Set<string>();
  for (const p of paths) {
    const m = /\/([^/]+)\.ko(?:\.(?:xz|zst|gz))?$/.exec(p);
    if (m) modules.add(normaliseModule(m[1]!));
  }
  return [...modules].sort();
}

export function normaliseModule(name: string): string {
  return name.replace(/-/g, '_');
}

const DECOMPRESSORS: { magic: Buffer; command: string[] }[] = [
  { magic: Buffer.from([0x1f, 0x8b]), command: ['gzip', '-dc'] },
  { magic: Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), command: ['zstd', '-dcq'] },
  { magic: Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), command: ['xz', '-dc'] },
  { magic: Buffer.from([0x5d, 0x00, 0x00]), command: ['xz', '--format=lzma', '-dc'] },
  { magic: Buffer.from('BZh'), command: ['bzip2', '-dc'] },
  { magic: Buffer.from([0x02, 0x21, 0x4c, 0x18]), command: ['lz4', '-dc'] },
];

async function walk(data: Buffer, path: string, names: string[]): Promise<void> {
  let offset = 0;
  while (offset < data.length) {
    // Archives are padded with zeroes to 4-byte (often 512-byte) boundaries between members.
    if (data[offset] === 0) {
      offset++;
      continue;
    }
    const magic = data.toString('latin1', offset, offset + 6);
    if (magic === '070701' || magic === '070702') {
      offset = parseCpio(data, offset, path, names);
      continue;
    }
    const decompressor = DECOMPRESSORS.find((d) => data.subarray(offset, offset + d.magic.length).equals(d.magic));
    if (!decompressor) throw new InjectionError(`unrecognised data at offset ${offset} of the initramfs`, { file: path });
    // A compressed member runs to the end of the file (the kernel's own rule for the last member).
    await walk(await decompress(decompressor.command, data.subarray(offset), path), path, names);
    return;
  }
}

/** Parses one newc archive from `start`; returns the offset after its TRAILER!!! entry. */
function parseCpio(data: Buffer, start: number, path: string, names: string[]): number {
  let offset = start;
  for (;;) {
    if (offset + 110 > data.length) throw new InjectionError(`truncated cpio header at offset ${offset}`, { file: path });
    const field = (i: number) => parseInt(data.toString('latin1', offset + 6 + i * 8, offset + 14 + i * 8), 16);
    const fileSize = field(6);
    const nameSize = field(11);
    const name = data.toString('utf8', offset + 110, offset + 110 + nameSize - 1);
    offset = align4(offset + 110 + nameSize);
    offset = align4(offset + fileSize);
    if (name === 'TRAILER!!!') return offset;
    if (name === '.') continue; // the archive's root folder
    names.push(name.startsWith('/') ? name : '/' + name.replace(/^\.\//, ''));
  }
}

function align4(n: number): number {
  return (n + 3) & ~3;
}

function decompress(command: string[], input: Buffer, path: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn(command[0]!, command.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
    const chunks: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => chunks.push(d));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', (err) => reject(new InjectionError(`${command[0]} is needed to read this initramfs: ${err.message}`, { file: path })));
    child.on('close', (code) => {
      // Trailing padding after the compressed stream makes some tools complain; the data is complete.
      if (code !== 0 && chunks.length === 0) reject(new InjectionError(`${command[0]} failed: ${stderr.trim()}`, { file: path }));
      else resolve(Buffer.concat(chunks));
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
  });
}
