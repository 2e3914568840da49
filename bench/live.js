// Live migration: the same 512 MiB QEMU guest and workload (TCG, loopback) migrated by Ferry's engine and by
// QEMU's native migration — at each tool's defaults, and held to the same bandwidth (unlimited, and 256 MiB/s
// with auto-converge and without) — then Ferry's engine on simulated large VMs. Needs a built tree and
// qemu-system-x86, busybox-static, cpio, gcc, a kernel in /boot.
//
// Downtime is measured the same way for both tools: the guest prints a heartbeat every HEARTBEAT_MS of its
// own time on the serial console, which the bench reads from a socket and timestamps on arrival; the pause
// the guest lived is the gap between the source's last heartbeat and the destination's first. Each tool's
// own figure is reported beside it.
import { execFileSync, spawn } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { FERRY, ROOT, WORK, machineLine, publish } from './lib.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const MEM_MIB = 512;
// Heavy dirtying: 256 MiB checked, 96 MiB of it rewritten as fast as the vCPU can; a heartbeat every 5 ms.
const WORKLOAD = { totalMiB: 256, hotMiB: 96, rateMiBs: 0, heartbeatMs: 5 };
/** QEMU's max-bandwidth for "unlimited" (its own default is 128 MiB/s). */
const QEMU_UNLIMITED = 2 ** 40;
/** How long QEMU gets before it counts as not converging (it never gives up on its own). */
const QEMU_PATIENCE_MS = 90_000;

/**
 * What is compared. Ferry's defaults are an unlimited rate and 300 ms, QEMU's 128 MiB/s and 300 ms; the
 * matched settings hold both tools to the same rate during pre-copy (both lift it for the stop-and-copy).
 * `repeat: false` runs once: those rows do not converge and only show that.
 */
const SETTINGS = [
  { name: 'unlimited', ferry: [], qemu: { bandwidth: QEMU_UNLIMITED }, repeat: true },
  { name: '256 MiB/s, auto-converge', ferry: ['--max-bandwidth', '256M', '--auto-converge'], qemu: { bandwidth: 256 * MiB, autoConverge: true }, repeat: true },
  { name: '256 MiB/s', ferry: ['--max-bandwidth', '256M'], qemu: { bandwidth: 256 * MiB }, repeat: false },
];

export function buildGuest(dir) {
  const root = join(dir, 'initramfs');
  rmSync(root, { recursive: true, force: true });
  mkdirSync(join(root, 'bin'), { recursive: true });
  copyFileSync('/bin/busybox', join(root, 'bin', 'busybox'));
  execFileSync('gcc', ['-static', '-O2', '-o', join(root, 'workload'), join(ROOT, 'test', 'fixtures', 'guest', 'workload.c')]);
  const w = WORKLOAD;
  writeFileSync(join(root, 'init'), `#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexec /workload ${w.totalMiB} ${w.hotMiB} ${w.rateMiBs} ${w.heartbeatMs}\n`);
  chmodSync(join(root, 'init'), 0o755);
  const initrd = join(dir, 'initrd.cpio');
  execFileSync('sh', ['-c', `cd "${root}" && find . | cpio -o -H newc > "${initrd}" 2>/dev/null`]);
  const kernel = readdirSync('/boot').filter((f) => f.startsWith('vmlinuz-')).sort().pop();
  if (!kernel) throw new Error('no kernel in /boot: install linux-image-amd64');
  return { kernel: join('/boot', kernel), initrd };
}

/**
 * A QEMU whose serial console is a socket the bench reads: `text` is the console so far, `beats` the host
 * time (ms) each heartbeat line arrived. `paused`: -S, for destinations (resumed by Ferry, or by the bench
 * for QEMU's own migration).
 */
async function startVm(dir, name, guest, { incoming = false, paused = false } = {}) {
  const qmp = join(dir, `${name}.qmp`);
  const console_ = join(dir, `${name}.console`);
  const ram = `/dev/shm/ferry-bench-${process.pid}-${name}.ram`;
  for (const f of [qmp, console_, ram]) rmSync(f, { force: true });
  const child = spawn('qemu-system-x86_64', [
    '-accel', 'tcg', '-m', `${MEM_MIB}M`, '-display', 'none', '-vga', 'none', '-nodefaults', '-no-user-config', '-no-reboot',
    '-chardev', `socket,id=console,path=${console_},server=on,wait=on`, '-serial', 'chardev:console',
    '-qmp', `unix:${qmp},server=on,wait=off`,
    '-object', `memory-backend-file,id=mem,size=${MEM_MIB}M,mem-path=${ram},share=on`, '-machine', 'pc,memory-backend=mem',
    '-kernel', guest.kernel, '-initrd', guest.initrd, '-append', 'console=ttyS0 quiet panic=-1',
    ...(incoming ? ['-incoming', 'defer'] : []),
    ...(paused ? ['-S'] : []),
  ], { stdio: 'ignore' });
  const vm = {
    qmp, ram, text: '', beats: [],
    async stop() {
      socket?.destroy();
      writeFileSync(join(dir, `${name}.console.txt`), vm.text);
      child.kill('SIGKILL');
      await new Promise((r) => (child.exitCode !== null || child.signalCode ? r() : child.once('exit', r)));
      rmSync(ram, { force: true });
    },
  };
  // wait=on: QEMU does not start the guest before the console is connected, so no line is lost.
  let socket;
  for (let i = 0; i < 400 && !socket; i++) {
    socket = await new Promise((resolve) => {
      const s = connect(console_);
      s.once('connect', () => resolve(s)).once('error', () => resolve(undefined));
    });
    if (!socket) await delay(25);
  }
  if (!socket) throw new Error(`${name}: QEMU did not open its console socket`);
  let partial = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk) => {
    const at = performance.now();
    vm.text += chunk;
    const lines = (partial + chunk).split('\n');
    partial = lines.pop();
    for (const line of lines) if (line.startsWith('HB ')) vm.beats.push(at);
  });
  socket.on('error', () => undefined);
  for (let i = 0; i < 200 && !existsSync(qmp); i++) await delay(50);
  return vm;
}

async function waitConsole(vm, pattern, ms) {
  const deadline = Date.now() + ms;
  while (!pattern.test(vm.text)) {
    if (Date.now() > deadline) throw new Error(`guest did not show ${pattern}`);
    await delay(200);
  }
}

/** A guest kernel or workload that found its memory or state broken. */
const GUEST_BROKEN = /WORKLOAD FAILURE|BUG:|Oops|Kernel panic/;

/**
 * After a switchover: the pause as the guest lived it (the source's last heartbeat to the destination's
 * first, ms; NaN when the destination never beat) and whether the guest is intact there (2 s of heartbeats
 * and no kernel or workload failure on either console).
 */
async function afterSwitchover(src, dst) {
  const deadline = Date.now() + 20_000;
  while (dst.beats.length === 0 && Date.now() < deadline) await delay(50);
  const pauseMs = dst.beats.length && src.beats.length ? dst.beats[0] - src.beats[src.beats.length - 1] : NaN;
  if (dst.beats.length) await delay(2000);
  const intact = dst.beats.length > 0 && !GUEST_BROKEN.test(src.text) && !GUEST_BROKEN.test(dst.text);
  return { guestPauseMs: pauseMs, intact };
}

async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

function run(args, env = {}) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [FERRY, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('exit', (code) => resolve({ code, out, err }));
  });
}

/** A booted source (workload running for 3 s) and a waiting destination. */
async function pair(dir, guest, destination) {
  const src = await startVm(dir, 'src', guest);
  const dst = await startVm(dir, 'dst', guest, destination);
  await waitConsole(src, /WORKLOAD OK seq=3\b/, 120_000);
  return { src, dst, stop: async () => { await src.stop(); await dst.stop(); } };
}

export async function ferryRun(dir, guest, setting) {
  const vms = await pair(dir, guest, { incoming: true, paused: true });
  try {
    const port = await freePort();
    const listen = spawn(process.execPath, [FERRY, 'migrate-listen', '--listen', `127.0.0.1:${port}`, '--qmp', vms.dst.qmp, '--ram', vms.dst.ram], { stdio: ['ignore', 'pipe', 'ignore'] });
    await new Promise((resolve) => listen.stdout.on('data', (d) => /listening/.test(String(d)) && resolve()));
    const r = await run(['migrate', '--qmp', vms.src.qmp, '--ram', vms.src.ram, '--to', `127.0.0.1:${port}`, '--progress=json', ...setting.ferry], { FERRY_LOG_LEVEL: 'info' });
    listen.kill('SIGKILL');
    // The engine's log of the last run (rounds, decisions, downtime breakdown), for a look afterwards.
    writeFileSync(join(dir, 'ferry-migrate.log'), r.err);
    const done = r.out.split('\n').filter((l) => l.includes('"type":"done"')).map((l) => JSON.parse(l))[0];
    if (!done) throw new Error(`ferry migrate printed no report: ${r.err}`);
    const converged = done.outcome === 'completed';
    return {
      tool: 'Ferry', setting: setting.name, converged, totalMs: done.totalMs, ownDowntimeMs: done.downtimeMs,
      ...(converged ? await afterSwitchover(vms.src, vms.dst) : { guestPauseMs: NaN, intact: false }),
      bytes: done.transferredBytes, rounds: done.rounds, note: done.reason ?? '', breakdown: done.downtimeBreakdownMs,
    };
  } finally {
    await vms.stop();
  }
}

/**
 * QEMU's own migration. Its destination waits with -S, like Ferry's, and is resumed with `cont` the moment
 * it reports the incoming migration completed (a QMP event), as libvirt does.
 */
export async function qemuRun(dir, guest, setting) {
  const { QmpClient, watchMigrationEnd } = await import('../dist/live/qmp.js');
  const vms = await pair(dir, guest, { incoming: true, paused: true });
  const src = await QmpClient.connect(vms.src.qmp);
  const dst = await QmpClient.connect(vms.dst.qmp);
  try {
    const port = await freePort();
    await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    const dstEnded = watchMigrationEnd(dst);
    await dst.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
    const resumed = dstEnded(QEMU_PATIENCE_MS + 60_000).then(async (i) => {
      if (i.status === 'completed') await dst.execute('cont');
    });
    resumed.catch(() => undefined); // a cancelled migration never completes there
    if (setting.qemu.bandwidth) await src.execute('migrate-set-parameters', { 'max-bandwidth': setting.qemu.bandwidth });
    if (setting.qemu.autoConverge) await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'auto-converge', state: true }] });
    const started = Date.now();
    await src.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    let info;
    for (;;) {
      await delay(100);
      info = await src.execute('query-migrate');
      if (['completed', 'failed'].includes(info.status)) break;
      if (Date.now() - started > QEMU_PATIENCE_MS) {
        await src.execute('migrate_cancel');
        return { tool: 'QEMU', setting: setting.name, converged: false, totalMs: Date.now() - started, ownDowntimeMs: NaN, guestPauseMs: NaN, intact: false, bytes: info.ram.transferred, rounds: info.ram['dirty-sync-count'], note: `not converged after ${QEMU_PATIENCE_MS / 1000} s` };
      }
    }
    const converged = info.status === 'completed';
    if (converged) await resumed;
    return {
      tool: 'QEMU', setting: setting.name, converged, totalMs: info['total-time'], ownDowntimeMs: info.downtime,
      ...(converged ? await afterSwitchover(vms.src, vms.dst) : { guestPauseMs: NaN, intact: false }),
      bytes: info.ram.transferred, rounds: info.ram['dirty-sync-count'], note: info['error-desc'] ?? '',
    };
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

function median(values) {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return NaN;
  return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
}

/** One table row per tool and setting: medians over the runs that converged (all runs when none did). */
function summarize(runs) {
  const groups = new Map();
  for (const r of runs) {
    const key = `${r.tool}|${r.setting}`;
    groups.set(key, [...(groups.get(key) ?? []), r]);
  }
  return [...groups.values()].map((g) => {
    const ok = g.filter((r) => r.converged);
    const use = ok.length ? ok : g;
    const ms = (x) => (Number.isFinite(x) ? `${x.toFixed(0)} ms` : '–');
    return {
      tool: g[0].tool,
      setting: g[0].setting,
      cells: [
        `${ok.length}/${g.length}`,
        ok.length ? `${ok.filter((r) => r.intact).length}/${ok.length}` : '–',
        `${(median(use.map((r) => r.totalMs)) / 1000).toFixed(1)} s`,
        ms(median(ok.map((r) => r.guestPauseMs))),
        ok.length ? ok.map((r) => (Number.isFinite(r.guestPauseMs) ? r.guestPauseMs.toFixed(0) : 'never ran')).join(', ') : '–',
        ms(median(ok.map((r) => r.ownDowntimeMs))),
        `${(median(use.map((r) => r.bytes)) / MiB).toFixed(0)} MiB`,
        `${median(use.map((r) => r.rounds))}`,
        ok.length ? '' : g[0].note,
      ],
      guestPauseMs: median(ok.map((r) => r.guestPauseMs)),
      ownDowntimeMs: median(ok.map((r) => r.ownDowntimeMs)),
    };
  });
}

export async function runLiveBench({ runs = 3 } = {}) {
  const dir = join(WORK, 'live');
  mkdirSync(dir, { recursive: true });
  const guest = buildGuest(dir);
  // Other work on the machine slows both sides' CPU-bound paths (TCG, hashing, encoding): record it.
  const load = [];
  const sampler = setInterval(() => load.push(loadavg()[0]), 5000);
  const results = [];
  const record = (r) => {
    console.error('bench: live', JSON.stringify(r));
    results.push(r);
  };
  // Ferry and QEMU alternate, so a busy spell on the shared cores hits both.
  for (let i = 0; i < runs; i++) {
    for (const setting of SETTINGS.filter((s) => s.repeat || i === 0)) {
      record(await ferryRun(dir, guest, setting));
      record(await qemuRun(dir, guest, setting));
    }
  }
  record(await qemuRun(dir, guest, { name: 'QEMU defaults: 128 MiB/s', qemu: {} }));
  clearInterval(sampler);
  const rows = summarize(results);
  const sim = await simulatedTable();
  const verdicts = SETTINGS.filter((s) => s.repeat).map((s) => {
    const f = rows.find((r) => r.tool === 'Ferry' && r.setting === s.name);
    const q = rows.find((r) => r.tool === 'QEMU' && r.setting === s.name);
    const verdict = !Number.isFinite(f.guestPauseMs)
      ? 'Ferry did not converge'
      : !Number.isFinite(q.guestPauseMs)
        ? 'nothing to compare: QEMU\'s destination guest never ran'
        : f.guestPauseMs <= q.guestPauseMs
          ? 'Ferry ≤ QEMU'
          : 'Ferry > QEMU';
    return `${s.name}: Ferry ${f.cells[3]} vs QEMU ${q.cells[3]}, own figures ${f.cells[5]} vs ${q.cells[5]} (${verdict})`;
  });
  publish(
    'live',
    [
      `Guest: ${MEM_MIB} MiB, TCG, workload ${WORKLOAD.totalMiB} MiB verified, ${WORKLOAD.hotMiB} MiB rewritten as fast as the vCPU goes; source and destination on loopback on this machine.`,
      `Ferry's defaults: unlimited rate, 300 ms (the \`unlimited\` rows); QEMU's: 128 MiB/s, 300 ms (the last row). The matched rows hold both to the same rate during pre-copy; both lift it for the stop-and-copy, as QEMU does.`,
      `Guest-observed pause (the same for both tools): the guest prints a heartbeat every ${WORKLOAD.heartbeatMs} ms of its time on the serial console, read by the bench from a socket and timestamped on arrival; the pause is the source's last heartbeat → the destination's first (source stop → destination running, as the guest lives it; resolution ${WORKLOAD.heartbeatMs} ms).`,
      "Own figure: Ferry's source pause → destination confirmed running; QEMU's `downtime` (source stop → end of its stream, without the destination's start).",
      `${runs} alternating runs of each repeated row (medians over the runs that converged), one of the others. Machine: ${machineLine()}; 1-minute load average during the runs ${Math.min(...load).toFixed(1)}–${Math.max(...load).toFixed(1)} (other jobs share the cores, so figures vary from run to run).`,
      '',
      '| tool | rate (pre-copy) | converged | guest intact after | total | guest-observed pause | each run | own downtime figure | sent | rounds | note |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
      ...rows.map((r) => `| ${r.tool} | ${r.setting} | ${r.cells.join(' | ')} |`),
      '',
      `Downtime at matched bandwidth (guest-observed, medians): ${verdicts.join('; ')}.`,
      '',
      `Simulated (Ferry's engine and policy on a virtual clock, 64 GiB VM, encoding ratios measured on synthetic pages: first send ${(sim.ratios.compressRatio * 100).toFixed(0)} %, delta ${(sim.ratios.deltaRatio * 100).toFixed(1)} % of a page; dirty tracking 0.5 ms/GiB; first round at the link rate; link-bound):`,
      '',
      '| workload | link | auto-converge | converged | total | downtime | rounds | sent |',
      '|---|---|---|---|---|---|---|---|',
      ...sim.rows,
    ].join('\n'),
  );
}
