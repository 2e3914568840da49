// Shared benchmark plumbing: a reproducible test image, timed runs of commands side by side, and the
// table that goes into docs/benchmarks.md. Benchmarks are not tests: they measure, they do not assert.
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { cpus, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
export const WORK = join(ROOT, 'bench', '.work');
export const FERRY = join(ROOT, 'bin', 'ferry.js');
mkdirSync(WORK, { recursive: true });

/**
 * Variables of this machine's environment that slow every Node process before it runs a line, and that a
 * user's environment does not normally carry. NODE_EXTRA_CA_CERTS (set here to the system CA bundle) makes
 * Node parse every certificate in it at start-up: 35 ms of a 60 ms start, measured here, on each Ferry run
 * and none of qemu-img's. Every suite's commands run without them; machineLine() names the ones removed.
 */
const REMOVED_FROM_ENV = ['NODE_EXTRA_CA_CERTS'].filter((name) => process.env[name] !== undefined);
for (const name of REMOVED_FROM_ENV) delete process.env[name];

const MiB = 1024 * 1024;
const GENERATOR_VERSION = '1';

/** A deterministic pseudo-random fill (xorshift32): incompressible, but the same bytes every run. */
function fillRandom(buf, seed) {
  const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
}

/**
 * The benchmark disk: 4 GiB sparse raw holding 1.5 GiB of data in 96 regions of 16 MiB spread over the
 * disk: a third incompressible, a third compressible text, a third incompressible with every other 64 KiB
 * zero (so zero detection matters). Generated once and reused.
 */
export async function benchImage() {
  const path = join(WORK, 'source-4g.raw');
  const marker = path + '.v' + GENERATOR_VERSION;
  if (existsSync(path) && existsSync(marker)) return path;
  console.error('bench: generating', path);
  rmSync(path, { force: true });
  const h = await open(path, 'w');
  await h.truncate(4096 * MiB);
  const random = Buffer.alloc(16 * MiB);
  const text = Buffer.alloc(16 * MiB);
  const line = Buffer.from('Ferry moves machines between hypervisors; this line repeats to be compressible. 0123456789\n');
  for (let i = 0; i < text.length; i += line.length) line.copy(text, i);
  const holey = Buffer.alloc(16 * MiB);
  for (let i = 0; i < 96; i++) {
    const offset = Math.floor((i * 4096) / 96) * MiB;
    let data;
    if (i % 3 === 0) {
      fillRandom(random, 0x9e3779b9 + i);
      data = random;
    } else if (i % 3 === 1) {
      data = text;
    } else {
      fillRandom(holey, 0x7f4a7c15 + i);
      for (let j = 0; j < holey.length; j += 128 * 1024) holey.fill(0, j, j + 64 * 1024);
      data = holey;
    }
    await h.write(data, 0, data.length, offset);
  }
  await h.close();
  writeFileSync(marker, '');
  return path;
}

/** Runs a command once under GNU time: wall seconds (monotonic clock) and peak RSS in MiB. */
export function timed(argv, env = {}) {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn('/usr/bin/time', ['-f', 'BENCH_RSS=%M', ...argv], { env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    child.on('close', (code) => {
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      const m = /BENCH_RSS=(\d+)/.exec(stderr);
      if (code !== 0) return reject(new Error(`${argv.join(' ')} failed (${code}): ${stderr}`));
      resolve({ seconds, rssMiB: m ? Number(m[1]) / 1024 : NaN });
    });
  });
}

export function sync() {
  execFileSync('sync');
}

export function median(values) {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/**
 * Times two ways of doing the same job: each tool gets one untimed warm-up run and then `runs` timed runs
 * in a row, and the order of the tools alternates from row to row. Measured here: on this VM the first run
 * after the other tool pays for page-cache pages the host must fault in again (2–4× slower, either tool),
 * so alternating run by run measures the machine, not the tools. Outputs are deleted and dirty pages
 * flushed before every run, so no run pays for another's writes.
 */
let peerFirst = false;
export async function sideBySide({ name, runs, ferry, peer, outputs, note }) {
  const results = { ferry: [], peer: [] };
  const order = [
    ['ferry', ferry],
    ['peer', peer],
  ];
  if (peerFirst) order.reverse();
  peerFirst = !peerFirst;
  for (const [who, argv] of order) {
    for (let i = 0; i <= runs; i++) {
      for (const o of outputs) rmSync(o, { force: true });
      sync();
      const r = await timed(argv);
      if (i > 0) results[who].push(r);
    }
  }
  const sizes = outputs.map((o) => (existsSync(o) ? statSync(o).size : 0));
  for (const o of outputs) rmSync(o, { force: true });
  const row = {
    name,
    note,
    ferrySeconds: median(results.ferry.map((r) => r.seconds)),
    peerSeconds: median(results.peer.map((r) => r.seconds)),
    ferryBest: Math.min(...results.ferry.map((r) => r.seconds)),
    peerBest: Math.min(...results.peer.map((r) => r.seconds)),
    ferryRssMiB: Math.max(...results.ferry.map((r) => r.rssMiB)),
    peerRssMiB: Math.max(...results.peer.map((r) => r.rssMiB)),
    outputBytes: sizes[sizes.length - 1],
  };
  row.ratio = row.ferrySeconds / row.peerSeconds;
  console.error(
    `bench: ${name}: ferry ${row.ferrySeconds.toFixed(3)} s, peer ${row.peerSeconds.toFixed(3)} s, ratio ${row.ratio.toFixed(2)}, ferry RSS ${row.ferryRssMiB.toFixed(0)} MiB`,
  );
  return row;
}

export function machineLine() {
  const qemu = execFileSync('qemu-img', ['--version'], { encoding: 'utf8' }).split('\n')[0];
  const removed = REMOVED_FROM_ENV.length ? `; run without ${REMOVED_FROM_ENV.join(', ')} (see the introduction)` : '';
  return `${cpus().length} cores (${cpus()[0]?.model ?? 'unknown'}), ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, Node ${process.version}, ${qemu}${removed}`;
}

/** Replaces the text between `<!-- bench:KEY -->` and `<!-- /bench:KEY -->` in docs/benchmarks.md. */
export function publish(key, markdown) {
  const path = join(ROOT, 'docs', 'benchmarks.md');
  const doc = readFileSync(path, 'utf8');
  const start = `<!-- bench:${key} -->`;
  const end = `<!-- /bench:${key} -->`;
  const from = doc.indexOf(start);
  const to = doc.indexOf(end);
  if (from < 0 || to < 0) throw new Error(`docs/benchmarks.md lacks the ${start} ... ${end} markers`);
  writeFileSync(path, doc.slice(0, from + start.length) + '\n' + markdown.trim() + '\n' + doc.slice(to));
}
