import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { InjectionError } from './errors.js';

/**
 * Reads and writes initramfs images on the host, whatever built them: one or more "newc" cpio
 * archives, each plain (early microcode) or compressed (gzip, zstd, xz, lzma, bzip2, lz4),
 * concatenated. The (de)compressors are the host's command-line tools; the cpio headers are parsed
 * and written here.
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
    const name = moduleNameOf(p);
    if (name) modules.add(name);
  }
  return [...modules].sort();
}

/** The module name of a .ko path ("kernel/lib/crc-t10dif.ko.xz" → "crc_t10dif"); undefined for other paths. */
export function moduleNameOf(path: string): string | undefined {
  const m = /(?:^|\/)([^/]+)\.ko(?:\.(?:xz|zst|gz))?$/.exec(path);
  return m ? normaliseModule(m[1]!) : undefined;
}

export function normaliseModule(name: string): string {
  return name.replace(/-/g, '_');
}

interface Codec {
  name: string;
  magic: Buffer;
  decompress: string[];
  /** How mkinitramfs compresses: xz must use CRC32 and lz4 the legacy frame, the only ones the kernel reads. */
  compress: string[];
}

const CODECS: Codec[] = [
  { name: 'gzip', magic: Buffer.from([0x1f, 0x8b]), decompress: ['gzip', '-dc'], compress: ['gzip', '-n', '-c'] },
  { name: 'zstd', magic: Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), decompress: ['zstd', '-dcq'], compress: ['zstd', '-q', '-9', '-T0', '-c'] },
  { name: 'xz', magic: Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), decompress: ['xz', '-dc'], compress: ['xz', '--check=crc32', '--threads=0', '-c'] },
  { name: 'lzma', magic: Buffer.from([0x5d, 0x00, 0x00]), decompress: ['xz', '--format=lzma', '-dc'], compress: ['xz', '--format=lzma', '-c'] },
  { name: 'bzip2', magic: Buffer.from('BZh'), decompress: ['bzip2', '-dc'], compress: ['bzip2', '-c'] },
  { name: 'lz4', magic: Buffer.from([0x02, 0x21, 0x4c, 0x18]), decompress: ['lz4', '-dc'], compress: ['lz4', '-9', '-l', '-c'] },
];

function codecAt(data: Buffer, offset: number): Codec | undefined {
  return CODECS.find((c) => data.subarray(offset, offset + c.magic.length).equals(c.magic));
}

async function walk(data: Buffer, path: string, names: string[]): Promise<void> {
  let offset = 0;
  while (offset < data.length) {
    // Archives are padded with zeroes to 4-byte (often 512-byte) boundaries between members.
    if (data[offset] === 0) {
      offset++;
      continue;
    }
    if (isCpioAt(data, offset)) {
      const archive = parseCpio(data, offset, path);
      for (const e of archive.entries) if (e.name !== '.') names.push('/' + e.name);
      offset = archive.end;
      continue;
    }
    const codec = codecAt(data, offset);
    if (!codec) throw new InjectionError(`unrecognised data at offset ${offset} of the initramfs`, { file: path });
    // A compressed member runs to the end of the file (the kernel's own rule for the last member).
    await walk(await pipeThrough(codec.decompress, data.subarray(offset), path, true), path, names);
    return;
  }
}

function isCpioAt(data: Buffer, offset: number): boolean {
  const magic = data.toString('latin1', offset, offset + 6);
  return magic === '070701' || magic === '070702';
}

/** One member of a newc archive; `start`/`end` delimit its header, name and data in the archive. */
export interface CpioEntry {
  /** Path without a leading "/" or "./" ("usr/lib/modules/…"); "." for the root folder. */
  name: string;
  ino: number;
  mode: number;
  nlink: number;
  start: number;
  end: number;
  dataStart: number;
  dataSize: number;
}

const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;

/** Parses one newc archive from `start` up to and including its TRAILER!!! entry (not listed). */
function parseCpio(data: Buffer, start: number, path: string): { entries: CpioEntry[]; end: number } {
  const entries: CpioEntry[] = [];
  let offset = start;
  for (;;) {
    if (offset + 110 > data.length) throw new InjectionError(`truncated cpio header at offset ${offset}`, { file: path });
    const field = (i: number) => parseInt(data.toString('latin1', offset + 6 + i * 8, offset + 14 + i * 8), 16);
    const fileSize = field(6);
    const nameSize = field(11);
    const rawName = data.toString('utf8', offset + 110, offset + 110 + nameSize - 1);
    const dataStart = align4(offset + 110 + nameSize);
    const end = align4(dataStart + fileSize);
    if (end > data.length) throw new InjectionError(`cpio member ${rawName} runs past the end of the archive`, { file: path });
    if (rawName === 'TRAILER!!!') return { entries, end };
    // "." (the root folder, whose mode the kernel applies to /) is kept as "."; other names lose "./" or "/".
    const name = rawName === '.' ? '.' : rawName.replace(/^\.?\/+/, '');
    if (name !== '') entries.push({ name, ino: field(0), mode: field(1), nlink: field(4), start: offset, end, dataStart, dataSize: fileSize });
    offset = end;
  }
}

function align4(n: number): number {
  return (n + 3) & ~3;
}

/**
 * An initramfs split for rewriting: everything before the main archive kept byte for byte (early
 * microcode archives), and the main archive decompressed with the codec it came in.
 */
export interface InitramfsImage {
  path: string;
  head: Buffer;
  codec: Codec;
  archive: Buffer;
  entries: CpioEntry[];
}

/**
 * Opens an image of the shape initramfs-tools and dracut write: plain archives, then one compressed
 * member holding one archive. Anything else (several compressed members, data after the archive)
 * is refused, since rewriting it could drop what the kernel would have unpacked.
 */
export async function openInitramfs(path: string): Promise<InitramfsImage> {
  const data = await readFile(path);
  let offset = 0;
  while (offset < data.length) {
    if (data[offset] === 0) offset++;
    else if (isCpioAt(data, offset)) offset = parseCpio(data, offset, path).end;
    else break;
  }
  const codec = codecAt(data, offset);
  if (!codec) throw new InjectionError(offset >= data.length ? 'no compressed archive in the initramfs' : `unrecognised data at offset ${offset} of the initramfs`, { file: path });
  const archive = await pipeThrough(codec.decompress, data.subarray(offset), path, false);
  if (!isCpioAt(archive, 0)) throw new InjectionError(`the ${codec.name} member of the initramfs is not a cpio archive`, { file: path });
  const { entries, end } = parseCpio(archive, 0, path);
  if (archive.subarray(end).some((b) => b !== 0)) throw new InjectionError(`the ${codec.name} member of the initramfs holds more than one archive`, { file: path });
  return { path, head: data.subarray(0, offset), codec, archive, entries };
}

/** A member to add to an archive. */
export interface NewEntry {
  name: string;
  mode: number;
  data?: Buffer;
}

/**
 * The image with `remove` dropped and `add` appended (before the trailer), compressed again with its
 * own codec behind the unchanged head. Folders in `add` must precede their contents, as in any cpio.
 */
export async function rewriteInitramfs(image: InitramfsImage, remove: Set<string>, add: NewEntry[]): Promise<Buffer> {
  const parts: Buffer[] = [];
  let size = 0;
  const push = (b: Buffer) => {
    parts.push(b);
    size += b.length;
  };
  let ino = 0;
  for (const e of image.entries) {
    ino = Math.max(ino, e.ino);
    if (remove.has(e.name)) {
      // newc stores a hard-linked file's data once, in the last link: dropping a link could lose it.
      if (e.nlink > 1 && (e.mode & S_IFMT) === S_IFREG) throw new InjectionError(`${e.name} is hard-linked in the initramfs and cannot be replaced`, { file: image.path });
      continue;
    }
    push(image.archive.subarray(e.start, e.end));
  }
  const mtime = Math.floor(Date.now() / 1000);
  for (const e of add) push(cpioMember(e.name, e.mode, e.data ?? Buffer.alloc(0), ++ino, (e.mode & S_IFMT) === S_IFDIR ? 2 : 1, mtime));
  push(cpioMember('TRAILER!!!', 0, Buffer.alloc(0), 0, 1, 0));
  // cpio(1) pads archives to 512-byte blocks; so does this.
  push(Buffer.alloc((512 - (size % 512)) % 512));
  const compressed = await pipeThrough(image.codec.compress, Buffer.concat(parts, size), image.path, false);
  return Buffer.concat([image.head, compressed]);
}

function cpioMember(name: string, mode: number, data: Buffer, ino: number, nlink: number, mtime: number): Buffer {
  const nameBytes = Buffer.from(name + '\0', 'utf8');
  const fields = [ino, mode, 0, 0, nlink, mtime, data.length, 0, 0, 0, 0, nameBytes.length, 0];
  const header = Buffer.from('070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join(''), 'latin1');
  const headerAndName = Buffer.concat([header, nameBytes]);
  return Buffer.concat([headerAndName, Buffer.alloc(align4(headerAndName.length) - headerAndName.length), data, Buffer.alloc(align4(data.length) - data.length)]);
}

/** The data of a regular file or a symlink's target. */
export function entryData(image: InitramfsImage, entry: CpioEntry): Buffer {
  return image.archive.subarray(entry.dataStart, entry.dataStart + entry.dataSize);
}

export function isDirectory(entry: CpioEntry): boolean {
  return (entry.mode & S_IFMT) === S_IFDIR;
}

export function isRegularFile(entry: CpioEntry): boolean {
  return (entry.mode & S_IFMT) === S_IFREG;
}

/**
 * Resolves a path inside the image through the image's own symlinks (usr-merged images hold
 * "lib -> usr/lib"), as the kernel does when it unpacks a later member under that path.
 */
export function resolveInImage(image: InitramfsImage, path: string): string {
  const byName = new Map(image.entries.map((e) => [e.name, e]));
  let pending = path.split('/').filter((c) => c && c !== '.');
  const resolved: string[] = [];
  for (let hops = 0; pending.length; ) {
    const component = pending.shift()!;
    if (component === '..') {
      resolved.pop();
      continue;
    }
    const candidate = [...resolved, component].join('/');
    const entry = byName.get(candidate);
    if (entry && (entry.mode & S_IFMT) === S_IFLNK) {
      if (++hops > 40) throw new InjectionError(`too many symlinks resolving ${path} in the initramfs`, { file: image.path });
      const target = entryData(image, entry).toString('utf8');
      if (target.startsWith('/')) resolved.length = 0;
      pending = [...target.split('/').filter((c) => c && c !== '.'), ...pending];
      continue;
    }
    resolved.push(component);
  }
  return resolved.join('/');
}

/** Runs `command` with `input` on stdin and returns its stdout. */
export function pipeThrough(command: string[], input: Buffer, path: string, tolerateTrailingGarbage: boolean): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn(command[0]!, command.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
    const chunks: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => chunks.push(d));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', (err) => reject(new InjectionError(`${command[0]} is needed for this initramfs: ${err.message}`, { file: path })));
    child.on('close', (code) => {
      // Trailing padding after a compressed stream makes some tools complain; for listing, the data is complete.
      if (code === 0 || (tolerateTrailingGarbage && chunks.length > 0)) resolve(Buffer.concat(chunks));
      else reject(new InjectionError(`${command.join(' ')} failed: ${stderr.trim()}`, { file: path }));
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
  });
}
