// Live migration: the same 512 MiB QEMU guest and workload (TCG, loopback) migrated by Ferry's engine and by
// QEMU's native migration — at QEMU's defaults and at a bandwidth both are held to — then Ferry's engine on
// simulated large VMs. Needs a built tree and qemu-system-x86, busybox-static, cpio, gcc, a kernel in /boot.
import { execFileSync, spawn } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { FERRY, ROOT, WORK, machineLine, publish } from './lib.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const MEM_MIB = 512;
// Heavy dirtying: 256 MiB checked, 96 MiB of it rewritten as fast as the vCPU can.
const WORKLOAD = { totalMiB: 256, hotMiB: 96, rateMiBs: 0 };
const MATCHED_BANDWIDTH = 256 * MiB;
/** How long QEMU gets before it counts as not converging (its defaults never give up on their own). */
const QEMU_PATIENCE_MS = 90_000;

function buildGuest(dir) {
  const root = join(dir, 'initramfs');
  rmSync(root, { recursive: true, force: true });
  mkdirSync(join(root, 'bin'), { recursive: true });
  copyFileSync('/bin/busybox', join(root, 'bin', 'busybox'));
  execFileSync('gcc', ['-static', '-O2', '-o', join(root, 'workload'), join(ROOT, 'test', 'fixtures', 'guest', 'workload.c')]);
  writeFileSync(join(root, 'init'), `#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexec /workload ${WORKLOAD.totalMiB} ${WORKLOAD.hotMiB} ${WORKLOAD.rateMiBs}\n`);
  chmodSync(join(root, 'init'), 0o755);
  const initrd = join(dir, 'initrd.cpio');
  execFileSync('sh', ['-c', `cd "${root}" && find . | cpio -o -H newc > "${initrd}" 2>/dev/null`]);
  const kernel = readdirSync('/boot').filter((f) => f.startsWith('vmlinuz-')).sort().pop();
  if (!kernel) throw new Error('no kernel in /boot: install linux-image-amd64');
  return { kernel: join('/boot', kernel), initrd };
}

async function startVm(dir, name, guest, incoming) {
  const qmp = join(dir, `${name}.qmp`);
  const serial = join(dir, `${name}.serial`);
  const ram = `/dev/shm/ferry-bench-${process.pid}-${name}.ram`;
  for (const f of [qmp, serial, ram]) rmSync(f, { force: true });
  const child = spawn('qemu-system-x86_64', [
    '-accel', 'tcg', '-m', `${MEM_MIB}M`, '-display', 'none', '-vga', 'none', '-nodefaults', '-no-user-config', '-no-reboot',
    '-serial', `file:${serial}`, '-qmp', `unix:${qmp},server=on,wait=off`,
    '-object', `memory-backend-file,id=mem,size=${MEM_MIB}M,mem-path=${ram},share=on`, '-machine', 'pc,memory-backend=mem',
    '-kernel', guest.kernel, '-initrd', guest.initrd, '-append', 'console=ttyS0 quiet panic=-1',
    ...(incoming ? ['-incoming', 'defer', '-S'] : []),
  ], { stdio: 'ignore' });
  for (let i = 0; i < 200 && !existsSync(qmp); i++) await delay(50);
  return {
    qmp, serial, ram,
    async stop() {
      child.kill('SIGKILL');
      await new Promise((r) => (child.exitCode !== null || child.signalCode ? r() : child.once('exit', r)));
      rmSync(ram, { force: true });
    },
  };
}

async function waitSerial(vm, pattern, ms) {
  const { readFileSync } = await import('node:fs');
  const deadline = Date.now() + ms;
  while (!pattern.test(readFileSync(vm.serial, 'utf8'))) {
    if (Date.now() > deadline) throw new Error(`guest did not show ${pattern}`);
    await delay(200);
  }
}

async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

function run(args) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [FERRY, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('exit', (code) => resolve({ code, out, err }));
  });
}

/** A booted source (workload running) and a waiting destination. */
async function pair(dir, guest) {
  const src = await startVm(dir, 'src', guest, false);
  const dst = await startVm(dir, 'dst', guest, true);
  await waitSerial(src, /WORKLOAD OK seq=3\b/, 120_000);
  return { src, dst, stop: async () => { await src.stop(); await dst.stop(); } };
}

async function ferryRun(dir, guest, label, extra) {
  const vms = await pair(dir, guest);
  try {
    const port = await freePort();
    const listen = spawn(process.execPath, [FERRY, 'migrate-listen', '--listen', `127.0.0.1:${port}`, '--qmp', vms.dst.qmp, '--ram', vms.dst.ram], { stdio: 'ignore' });
    await delay(1500);
    const r = await run(['migrate', '--qmp', vms.src.qmp, '--ram', vms.src.ram, '--to', `127.0.0.1:${port}`, '--progress=json', ...extra]);
    listen.kill('SIGKILL');
    const done = r.out.split('\n').filter((l) => l.includes('"type":"done"')).map((l) => JSON.parse(l))[0];
    if (!done) throw new Error(`ferry migrate printed no report: ${r.err}`);
    return { label, converged: done.outcome === 'completed', totalMs: done.totalMs, downtimeMs: done.downtimeMs, bytes: done.transferredBytes, rounds: done.rounds, note: done.reason ?? '' };
  } finally {
    await vms.stop();
  }
}

async function qemuRun(dir, guest, label, bandwidth) {
  const { QmpClient } = await import('../dist/live/qmp.js');
  const vms = await pair(dir, guest);
  const src = await QmpClient.connect(vms.src.qmp);
  const dst = await QmpClient.connect(vms.dst.qmp);
  try {
    const port = await freePort();
    await dst.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
    if (bandwidth) await src.execute('migrate-set-parameters', { 'max-bandwidth': bandwidth });
    const started = Date.now();
    await src.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    let info;
    for (;;) {
      await delay(100);
      info = await src.execute('query-migrate');
      if (['completed', 'failed'].includes(info.status)) break;
      if (Date.now() - started > QEMU_PATIENCE_MS) {
        await src.execute('migrate_cancel');
        return { label, converged: false, totalMs: Date.now() - started, downtimeMs: NaN, bytes: info.ram.transferred, rounds: info.ram['dirty-sync-count'], note: `not converged after ${QEMU_PATIENCE_MS / 1000} s` };
      }
    }
    return { label, converged: info.status === 'completed', totalMs: info['total-time'], downtimeMs: info.downtime, bytes: info.ram.transferred, rounds: info.ram['dirty-sync-count'], note: info['error-desc'] ?? '' };
  } finally {
    src.close();
    dst.close();
    await vms.stop();
  }
}

async function simulatedTable() {
  const { simulateMigration, measureEncoding } = await import('../dist/live/simulate.js');
  const { hotSetModel, CLARK_WORKLOADS } = await import('../dist/live/workloads.js');
  const ratios = await measureEncoding();
  const models = [
    hotSetModel(0.02, 200 * MiB, 4 * MiB),
    hotSetModel(0.05, 800 * MiB, 16 * MiB),
    hotSetModel(0.1, 2000 * MiB, 32 * MiB),
    CLARK_WORKLOADS.specweb,
    CLARK_WORKLOADS.mmuncher,
  ];
  const links = [1.25e9 / 10, 1.25e9, 1.25e9 * 2.5];
  const rows = [];
  for (const model of models) {
    for (const bandwidth of links) {
      for (const autoConverge of [false, true]) {
        const { report } = await simulateMigration({
          ramBytes: 64 * GiB,
          model,
          link: { bandwidth, rttMs: 0.2, ...ratios, cacheBytes: 64 * MiB, deviceLoadMs: 30 },
          // A dedicated migration link: no reason to start below it (Ferry's default starts at 128 MiB/s).
          limits: { maxBandwidth: bandwidth, initialBandwidth: bandwidth, autoConverge },
        });
        rows.push(`| ${model.name} | ${((bandwidth * 8) / 1e9).toFixed(0)} Gbit/s | ${autoConverge ? 'on' : 'off'} | ${report.outcome === 'completed' ? 'yes' : 'no'} | ${(report.totalMs / 1000).toFixed(1)} s | ${report.outcome === 'completed' ? `${report.downtimeMs.toFixed(0)} ms` : '–'} | ${report.rounds} | ${(report.transferredBytes / GiB).toFixed(1)} GiB |`);
        console.error('bench: live simulated', rows[rows.length - 1]);
      }
    }
  }
  return { ratios, rows };
}

export async function runLiveBench() {
  const dir = join(WORK, 'live');
  mkdirSync(dir, { recursive: true });
  const guest = buildGuest(dir);
  const rows = [];
  // Other work on the machine slows both sides' CPU-bound paths (TCG, hashing, encoding): record it.
  const load = [];
  const sampler = setInterval(() => load.push(loadavg()[0]), 5000);
  rows.push(await ferryRun(dir, guest, 'Ferry, defaults (unlimited rate, 300 ms)', []));
  rows.push(await ferryRun(dir, guest, 'Ferry, --auto-converge', ['--auto-converge']));
  rows.push(await qemuRun(dir, guest, 'QEMU, defaults (128 MiB/s, 300 ms)', 0));
  rows.push(await ferryRun(dir, guest, `Ferry, --max-bandwidth ${MATCHED_BANDWIDTH / MiB}M`, ['--max-bandwidth', `${MATCHED_BANDWIDTH / MiB}M`]));
  rows.push(await qemuRun(dir, guest, `QEMU, max-bandwidth ${MATCHED_BANDWIDTH / MiB} MiB/s`, MATCHED_BANDWIDTH));
  clearInterval(sampler);
  for (const r of rows) console.error('bench: live', JSON.stringify(r));
  const sim = await simulatedTable();
  const fmt = (r) =>
    `| ${r.label} | ${r.converged ? 'yes' : 'no'} | ${(r.totalMs / 1000).toFixed(1)} s | ${r.converged ? `${r.downtimeMs.toFixed(0)} ms` : '–'} | ${(r.bytes / MiB).toFixed(0)} MiB | ${r.rounds} | ${r.note} |`;
  publish(
    'live',
    [
      `Guest: ${MEM_MIB} MiB, TCG, workload ${WORKLOAD.totalMiB} MiB verified, ${WORKLOAD.hotMiB} MiB rewritten as fast as the vCPU goes; source and destination on loopback on this machine.`,
      'Downtime: Ferry measures source pause → destination confirmed running; QEMU reports its own (source stop → end of stream), which excludes the destination start.',
      `Machine: ${machineLine()}; 1-minute load average during the runs ${Math.min(...load).toFixed(1)}–${Math.max(...load).toFixed(1)} (other jobs share the cores, so figures vary from run to run).`,
      '',
      '| run | converged | total | downtime | sent | rounds | note |',
      '|---|---|---|---|---|---|---|',
      ...rows.map(fmt),
      '',
      `Simulated (Ferry's engine and policy on a virtual clock, 64 GiB VM, encoding ratios measured on synthetic pages: first send ${(sim.ratios.compressRatio * 100).toFixed(0)} %, delta ${(sim.ratios.deltaRatio * 100).toFixed(1)} % of a page; dirty tracking 0.5 ms/GiB; first round at the link rate; link-bound):`,
      '',
      '| workload | link | auto-converge | converged | total | downtime | rounds | sent |',
      '|---|---|---|---|---|---|---|---|',
      ...sim.rows,
    ].join('\n'),
  );
}
