import { execFile, execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const FERRY = join(ROOT, 'bin', 'ferry.js');
const run = promisify(execFile);

/** The hex digest of a file's content, read as a stream (disk images are large). */
export async function fileDigest(path: string, algorithm = 'sha256'): Promise<string> {
  const hash = createHash(algorithm);
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Fails (never skips) when a peer tool is missing, naming the package that provides it. */
export function requireTool(command: string, debianPackage: string): string {
  try {
    return execFileSync('sh', ['-c', `command -v ${command}`], { encoding: 'utf8' }).trim();
  } catch {
    throw new Error(`${command} is not installed: install the Debian package ${debianPackage} (npm run setup does)`);
  }
}

export async function tempDir(prefix = 'ferry-test-'): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export async function qemuImg(...args: string[]): Promise<string> {
  requireTool('qemu-img', 'qemu-utils');
  const { stdout } = await run('qemu-img', args, { maxBuffer: 64 * 1024 * 1024 });
  return stdout;
}

export async function qemuIo(image: string, format: string, ...commands: string[]): Promise<void> {
  requireTool('qemu-io', 'qemu-utils');
  await run('qemu-io', ['-f', format, ...commands.flatMap((c) => ['-c', c]), image]);
}

export interface Result {
  code: number;
  stdout: string;
  stderr: string;
  /** Peak resident memory of the run in KiB, measured by GNU time. */
  maxRssKiB: number;
}

/** Runs the built CLI. A hang is killed after `timeoutMs` and reported as code -1. */
export function ferry(args: string[], opts: { timeoutMs?: number; cwd?: string } = {}): Promise<Result> {
  requireTool('/usr/bin/time', 'time');
  return new Promise((resolve) => {
    const child = spawn('/usr/bin/time', ['-f', 'FERRY_MAXRSS=%M', process.execPath, FERRY, ...args], { cwd: opts.cwd ?? ROOT });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      const m = /FERRY_MAXRSS=(\d+)\n?$/.exec(stderr);
      resolve({ code: code ?? -1, stdout, stderr: stderr.replace(/(Command exited with non-zero status \d+\n)?FERRY_MAXRSS=\d+\n?$/, ''), maxRssKiB: m ? Number(m[1]) : -1 });
    });
  });
}

/** qemu-img compare: true when identical (exit 0), false when different (exit 1). */
export async function imagesIdentical(a: string, b: string): Promise<boolean> {
  try {
    await qemuImg('compare', a, b);
    return true;
  } catch (err) {
    if ((err as { code?: number }).code === 1) return false;
    throw err;
  }
}

/** The JSON lines of a command's --progress=json output. */
export function jsonLines(stdout: string): Array<Record<string, unknown>> {
  return stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** The final report of a command run with --progress=json (its `type: done` line). */
export function doneLine(stdout: string): Record<string, unknown> {
  const done = jsonLines(stdout).find((l) => l.type === 'done');
  if (!done) throw new Error(`no done line in: ${stdout}`);
  return done;
}
