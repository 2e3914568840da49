// Processes of the built CLI for tests that drive it from outside, and the small QEMU checks around them.
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer, type AddressInfo } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { QmpClient, queryStatus } from '../../src/live/qmp.js';
import { FERRY } from './env.js';
import type { TestVm } from './qemu-guest.js';

export interface CliRun {
  child: ChildProcess;
  lines: string[];
  stderr: () => string;
  exit: Promise<number>;
  /** Resolves with the first stdout line matching. */
  line(pattern: RegExp | ((line: string) => boolean), timeoutMs: number): Promise<string>;
}

export function ferryCli(args: string[]): CliRun {
  const child = spawn(process.execPath, [FERRY, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: string[] = [];
  let partial = '';
  let stderr = '';
  child.stdout!.on('data', (d) => {
    partial += d;
    const parts = partial.split('\n');
    partial = parts.pop()!;
    lines.push(...parts);
  });
  child.stderr!.on('data', (d) => (stderr += d));
  const exit = new Promise<number>((resolve) => child.once('exit', (code, signal) => resolve(code ?? (signal ? 128 : -1))));
  return {
    child,
    lines,
    stderr: () => stderr,
    exit,
    async line(pattern, timeoutMs) {
      const deadline = performance.now() + timeoutMs;
      for (;;) {
        const found = lines.find((l) => (typeof pattern === 'function' ? pattern(l) : pattern.test(l)));
        if (found) return found;
        if (performance.now() > deadline || child.exitCode !== null) throw new Error(`ferry ${args[0]}: no line ${pattern}; stdout:\n${lines.join('\n')}\nstderr:\n${stderr}`);
        await delay(50);
      }
    },
  };
}

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

export async function statusOf(vm: TestVm): Promise<string> {
  const qmp = await QmpClient.connect(vm.qmpPath);
  try {
    return await queryStatus(qmp);
  } finally {
    qmp.close();
  }
}
