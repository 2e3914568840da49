// Job service throughput: 50 small conversions submitted through the API and run by 1 and 2 BullMQ
// workers (and by the embedded queue), against the same 50 conversions run one after another by the CLI.
// Queueing overhead = time the workers were not running a job / time they were, over the whole batch.
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { FERRY, WORK, machineLine, publish, timed } from './lib.js';

const MiB = 1024 * 1024;
const JOBS = 50;

/** 64 MiB raw with 16 MiB of data in 16 regions: a conversion of a few tenths of a second. */
async function smallImage(dir) {
  const path = join(dir, 'small.raw');
  const h = await open(path, 'w');
  await h.truncate(64 * MiB);
  const data = Buffer.alloc(MiB);
  for (let i = 0; i < 16; i++) {
    for (let j = 0; j < data.length; j += 4) data.writeUInt32LE((i * 2654435761 + j * 40503) >>> 0, j);
    await h.write(data, 0, data.length, i * 4 * MiB);
  }
  await h.close();
  return 'small.raw';
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Starts a process and resolves with its match once a line of its output matches `pattern`. */
function start(argv, env, pattern) {
  const child = spawn(argv[0], argv.slice(1), { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  return new Promise((resolve, reject) => {
    let out = '';
    const onData = (d) => {
      out += d;
      const m = pattern.exec(out);
      if (m) resolve({ child, match: m });
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('exit', (code) => reject(new Error(`${argv.join(' ')} exited (${code}):\n${out}`)));
  });
}

function stop(child) {
  if (child.exitCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once('exit', resolve);
    child.kill('SIGTERM');
  });
}

/** Submits the batch through the API and waits on the events stream until every job has completed. */
async function runBatch(label, dataDir, source, { redisUrl, workers }) {
  rmSync(join(dataDir, 'out'), { recursive: true, force: true });
  mkdirSync(join(dataDir, 'out'));
  const processes = [];
  const env = { REDIS_URL: redisUrl ?? '', FERRY_LOG_LEVEL: 'warn', FERRY_API_TOKEN: 'bench-token' };
  const serveArgs = [process.execPath, FERRY, 'serve', '--port', '0', '--data-dir', dataDir, '--workers', redisUrl ? '0' : String(workers)];
  const serve = await start(serveArgs, env, /listening on (http:\/\/[\d.:]+)/);
  processes.push(serve.child);
  if (redisUrl) {
    for (let i = 0; i < workers; i++) {
      processes.push((await start([process.execPath, FERRY, 'worker', '--data-dir', dataDir], { ...env, FERRY_LOG_LEVEL: 'info' }, /worker ready/)).child);
    }
  }
  const base = serve.match[1];
  const headers = { authorization: 'Bearer bench-token', 'content-type': 'application/json' };
  try {
    const events = await fetch(`${base}/v1/events`, { headers });
    const ids = new Set();
    const completed = new Set();
    const started = performance.now();
    for (let i = 0; i < JOBS; i++) {
      const res = await fetch(`${base}/v1/jobs`, {
        method: 'POST',
        headers,
        body: JSON.stringify({ type: 'convert', source: { path: source }, target: { path: `out/job-${i}.qcow2`, format: 'qcow2' } }),
      });
      if (res.status !== 202) throw new Error(`POST /v1/jobs: ${res.status} ${await res.text()}`);
      ids.add((await res.json()).id);
    }
    const reader = events.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    while (completed.size < JOBS) {
      const { value, done } = await reader.read();
      if (done) throw new Error('events stream ended early');
      buffer += value;
      for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
        const data = buffer.slice(0, end).split('\n').find((l) => l.startsWith('data: '));
        buffer = buffer.slice(end + 2);
        if (!data) continue;
        const job = JSON.parse(data.slice(6));
        if (job.state === 'failed') throw new Error(`job failed: ${job.error.message}`);
        if (ids.has(job.id) && job.state === 'completed') completed.add(job.id);
      }
    }
    const wall = (performance.now() - started) / 1000;
    await reader.cancel();
    const list = await (await fetch(`${base}/v1/jobs?limit=500`, { headers })).json();
    const jobs = list.jobs.filter((j) => ids.has(j.id));
    const busy = jobs.reduce((sum, j) => sum + (Date.parse(j.finishedAt) - Date.parse(j.startedAt)) / 1000, 0);
    const converting = jobs.reduce((sum, j) => sum + j.result.elapsedMs / 1000, 0);
    const row = { label, workers, wall, busy, converting, overhead: (wall * workers - busy) / busy };
    console.error(`bench: jobs: ${label}: ${wall.toFixed(2)} s for ${JOBS} jobs, overhead ${(row.overhead * 100).toFixed(1)}%`);
    return row;
  } finally {
    for (const p of processes.reverse()) await stop(p);
  }
}

export async function runJobsBench() {
  const dataDir = join(WORK, 'jobs');
  rmSync(dataDir, { recursive: true, force: true });
  mkdirSync(join(dataDir, 'out'), { recursive: true });
  const source = await smallImage(dataDir);
  const loadBefore = loadavg()[0];

  // The CLI baseline: the same conversions, one process each, one after another.
  const cliStarted = performance.now();
  for (let i = 0; i < JOBS; i++) await timed([process.execPath, FERRY, 'convert', '-f', 'raw', '-O', 'qcow2', join(dataDir, source), join(dataDir, 'out', `cli-${i}.qcow2`)]);
  const cliWall = (performance.now() - cliStarted) / 1000;
  console.error(`bench: jobs: CLI: ${cliWall.toFixed(2)} s for ${JOBS} conversions`);

  const redisDir = join(WORK, 'redis');
  rmSync(redisDir, { recursive: true, force: true });
  mkdirSync(redisDir);
  const port = await freePort();
  const redis = await start(['redis-server', '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', redisDir], {}, /Ready to accept connections/);
  const rows = [];
  try {
    rows.push(await runBatch('embedded queue (no Redis), 1 slot', dataDir, source, { workers: 1 }));
    for (const workers of [1, 2]) {
      rows.push(await runBatch(`Redis + BullMQ, ${workers} worker process${workers > 1 ? 'es' : ''}`, dataDir, source, { redisUrl: `redis://127.0.0.1:${port}`, workers }));
    }
  } finally {
    await stop(redis.child);
    rmSync(redisDir, { recursive: true, force: true });
  }

  const cores = readFileSync('/proc/cpuinfo', 'utf8').match(/^processor/gm)?.length ?? 0;
  const lines = [
    `Measured ${new Date().toISOString().slice(0, 10)} on ${machineLine()}; load average ${loadBefore.toFixed(1)} before and ${loadavg()[0].toFixed(1)} after`,
    '(figures from a machine busy with other work are noisy; compare rows of one run).',
    `${JOBS} conversions of a 64 MiB raw image holding 16 MiB of data to qcow2, submitted at once through \`POST /v1/jobs\``,
    'and awaited on `/v1/events`; the CLI row runs the same conversions as one `ferry convert` process each, one after another.',
    'Busy = the sum of the jobs\' running times (startedAt → finishedAt, the end of the job\'s work; its record and log are written',
    'while the next job starts). Queueing overhead = (wall time × workers − busy) / busy:',
    `the share of worker time spent not running a job (dispatch, record updates, events). On ${cores} cores, 2 workers share the CPU`,
    'with the API and Redis, so their speed-up is bounded by the machine, not by the queue.',
    '',
    '| how | wall (s) | jobs/s | mean job time (s) | of which converting (s) | queueing overhead | wall vs CLI |',
    '|---|---:|---:|---:|---:|---:|---:|',
    `| CLI, ${JOBS} processes in sequence | ${cliWall.toFixed(2)} | ${(JOBS / cliWall).toFixed(1)} | ${(cliWall / JOBS).toFixed(3)} | | | 1.00 |`,
    ...rows.map(
      (r) =>
        `| ${r.label} | ${r.wall.toFixed(2)} | ${(JOBS / r.wall).toFixed(1)} | ${(r.busy / JOBS).toFixed(3)} | ${(r.converting / JOBS).toFixed(3)} | **${(r.overhead * 100).toFixed(1)}%** | ${(r.wall / cliWall).toFixed(2)} |`,
    ),
  ];
  publish('jobs', lines.join('\n'));
  rmSync(dataDir, { recursive: true, force: true });
  return rows;
}
