import { join } from 'node:path';
import { afterAll, beforeAll, expect } from 'vitest';
import { ferry, imagesIdentical, qemuImg, qemuIo, tempDir, type Result } from './env.js';
import { makePatternedRaw } from './fixtures.js';

/**
 * Gives the enclosing describe block (or file) a fresh temporary folder: `prepare` receives it once before
 * the block's tests, to keep its path and make the inputs the tests share; the folder is removed after them.
 */
export function inTempDir(prepare: (dir: string) => unknown): void {
  let cleanup: (() => Promise<void>) | undefined;
  beforeAll(async () => {
    const made = await tempDir();
    cleanup = made.cleanup;
    await prepare(made.dir);
  });
  afterAll(() => cleanup?.());
}

/** `inTempDir` with the patterned 64 MiB source disk made in the folder, where most read and write groups start. */
export function inTempDirWithPatternedSource(receive: (made: { dir: string; source: string }) => void): void {
  inTempDir(async (dir) => receive({ dir, source: await makePatternedRaw(dir) }));
}

/** Runs the CLI and expects it to succeed silently: exit 0 and nothing on stderr. `label` names the case in a failure. */
export async function ferryOk(args: string[], label?: string): Promise<Result> {
  const r = await ferry(args);
  expect(r.stderr, label).toBe('');
  expect(r.code, label).toBe(0);
  return r;
}

/** `ferry info --output=json` of one image, which must succeed silently. */
export async function ferryInfo(image: string): Promise<Record<string, any>> {
  return JSON.parse((await ferryOk(['info', '--output=json', image])).stdout);
}

/** `qemu-img info --output=json` of one image, the reference Ferry's info is held to. */
export async function qemuInfo(image: string): Promise<Record<string, any>> {
  return JSON.parse(await qemuImg('info', '--output=json', image));
}

/**
 * Ferry's `info --backing-chain` of `top` must list the same files, formats, sizes and backing file names as
 * qemu-img's. Returns both chains, top first, for further comparisons.
 */
export async function expectBackingChainAsQemu(top: string): Promise<{ ours: Array<Record<string, any>>; theirs: Array<Record<string, any>> }> {
  const ours = JSON.parse((await ferryOk(['info', '--output=json', '--backing-chain', top])).stdout);
  const theirs = JSON.parse(await qemuImg('info', '--output=json', '--backing-chain', top));
  const described = (chain: Array<Record<string, unknown>>) => chain.map((i) => [i.filename, i.format, i['virtual-size'], i['backing-filename']]);
  expect(described(ours)).toEqual(described(theirs));
  return { ours, theirs };
}

/** Ferry converts `image` to raw at `out` silently, and qemu-img compare finds `out` identical to `expected`. */
export async function expectRawConversion(image: string, out: string, expected = image): Promise<void> {
  await ferryOk(['convert', '-O', 'raw', image, out]);
  expect(await imagesIdentical(expected, out)).toBe(true);
}

/**
 * qemu-img writes `source` as a `format` image at `at`.FORMAT (with `options`); Ferry must convert it to raw
 * at `at`.raw identical both to what qemu reads from the image and to the source.
 */
export async function expectFerryReadsQemuImage(source: string, format: string, options: string[], at: string): Promise<{ image: string; out: string }> {
  const image = `${at}.${format}`;
  const out = `${at}.raw`;
  await qemuImg('convert', '-f', 'raw', '-O', format, ...options, source, image);
  await expectRawConversion(image, out);
  expect(await imagesIdentical(source, out)).toBe(true);
  return { image, out };
}

/** Has qemu-img create a `format` image of `size` at `path` and qemu-io apply `writes` to it; returns `path`. */
export async function makeImage(path: string, format: string, size: string, ...writes: string[]): Promise<string> {
  await qemuImg('create', '-q', '-f', format, path, size);
  await qemuIo(path, format, ...writes);
  return path;
}

/**
 * Makes DIR/base.qcow2, `baseMiB` MiB of 0x61, and returns DIR/top.qcow2, an overlay 8 MiB longer than it:
 * data of its own at 1 MiB, zero clusters hiding backing data at 4-6 MiB, and data past the backing file's end.
 */
export async function makeQcow2OverlayOverShorterBase(dir: string, baseMiB: number): Promise<string> {
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await makeImage(base, 'qcow2', `${baseMiB}M`, `write -P 0x61 0 ${baseMiB}M`);
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, `${baseMiB + 8}M`);
  await qemuIo(top, 'qcow2', 'write -P 0x62 1M 1M', 'write -z 4M 2M', `write -P 0x63 ${baseMiB + 4}M 1M`);
  return top;
}
