import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, readFile, readdir } from 'node:fs/promises';
import { FERRY } from './env.js';
import { stopProcess, waitForLine } from './redis.js';

/** A `ferry serve` or `ferry worker` child process; its output is kept for failure messages. */
export interface FerryProcess {
  child: ChildProcess;
  pid: number;
  output(): string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

function spawnFerry(args: string[], env: Record<string, string | undefined>): FerryProcess {
  const child = spawn(process.execPath, [FERRY, ...args], { env: { ...process.env, FERRY_API_TOKEN: undefined, REDIS_URL: undefined, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (d) => (output += d));
  child.stderr!.on('data', (d) => (output += d));
  return { child, pid: child.pid!, output: () => output, stop: (signal = 'SIGTERM') => stopProcess(child, signal) };
}

export interface Service extends FerryProcess {
  baseUrl: string;
  token: string;
  /** fetch against the service with the bearer token (unless headers say otherwise). */
  request(path: string, init?: RequestInit & { json?: unknown }): Promise<Response>;
}

/** Starts `ferry serve --port 0` and reads back the address it chose and where its token is. */
export async function startService(dataDir: string, opts: { redisUrl?: string; args?: string[] } = {}): Promise<Service> {
  const proc = spawnFerry(['serve', '--host', '127.0.0.1', '--port', '0', '--data-dir', dataDir, ...(opts.args ?? [])], { REDIS_URL: opts.redisUrl });
  const [, baseUrl, tokenFile] = await waitForLine(proc.child, /listening on (http:\/\/[\d.:]+)[\s\S]*?API token in (\S+)/, 'ferry serve');
  const token = (await readFile(tokenFile, 'utf8')).trim();
  return {
    ...proc,
    baseUrl,
    token,
    request(path, init = {}) {
      const headers = new Headers(init.headers);
      if (!headers.has('authorization')) headers.set('authorization', `Bearer ${token}`);
      let body = init.body;
      if (init.json !== undefined) {
        headers.set('content-type', 'application/json');
        body = JSON.stringify(init.json);
      }
      return fetch(baseUrl + path, { ...init, headers, body });
    },
  };
}

/** Starts `ferry worker` against the Redis at `redisUrl`, and waits until it takes jobs. */
export async function startWorker(dataDir: string, redisUrl: string, args: string[] = []): Promise<FerryProcess> {
  const proc = spawnFerry(['worker', '--data-dir', dataDir, ...args], { REDIS_URL: redisUrl, FERRY_LOG_LEVEL: 'info' });
  await waitForLine(proc.child, /worker ready/, 'ferry worker');
  return proc;
}

export interface JobView {
  id: string;
  type: string;
  state: string;
  stage: string | null;
  progress: { done: number; total: number };
  attempts: number;
  worker: string | null;
  error: { type: string; message: string } | null;
  result: Record<string, unknown> | null;
}

/**
 * Reads the job's events stream until `until` holds for a record (or the stream ends), and returns the
 * records seen. The stream is the API under test, so this also checks it delivers what happens.
 */
export async function watchJob(service: Service, id: string, until: (job: JobView) => boolean): Promise<JobView[]> {
  const res = await service.request(`/v1/jobs/${id}/events`);
  if (res.status !== 200) throw new Error(`events stream: ${res.status} ${await res.text()}`);
  const seen: JobView[] = [];
  const decoder = new TextDecoder();
  let buffer = '';
  const reader = res.body!.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return seen;
      buffer += decoder.decode(value, { stream: true });
      for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
        const data = buffer.slice(0, end).split('\n').find((l) => l.startsWith('data: '));
        buffer = buffer.slice(end + 2);
        if (!data) continue;
        const job = JSON.parse(data.slice(6)) as JobView;
        seen.push(job);
        if (until(job)) return seen;
      }
    }
  } finally {
    await reader.cancel().catch(() => undefined);
  }
}

export const isFinished = (job: JobView) => ['completed', 'failed', 'cancelled'].includes(job.state);

/** Submits a convert job and returns its id, failing with the problem body if refused. */
export async function submitConvert(service: Service, source: string, target: string, format: string, extra: Record<string, unknown> = {}): Promise<string> {
  const res = await service.request('/v1/jobs', { method: 'POST', json: { type: 'convert', source: { path: source }, target: { path: target, format, ...extra } } });
  if (res.status !== 202) throw new Error(`POST /v1/jobs: ${res.status} ${await res.text()}`);
  return ((await res.json()) as { id: string }).id;
}

/** `size` bytes of random data: incompressible, so a compressed conversion of it takes a while. */
export async function writeRandomFile(path: string, size: number): Promise<void> {
  const handle = await open(path, 'w');
  try {
    for (let at = 0; at < size; at += 8 * 1024 * 1024) await handle.write(randomBytes(Math.min(8 * 1024 * 1024, size - at)));
  } finally {
    await handle.close();
  }
}

/** OutputFile's temporary names: what an interrupted conversion may leave. */
export async function temporaryFiles(dir: string): Promise<string[]> {
  return (await readdir(dir)).filter((n) => /\.ferry-[0-9a-f]{8}\.tmp$/.test(n));
}
