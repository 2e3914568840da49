import type { Command } from 'commander';
import { InvalidOptionError } from '../errors.js';
import type { MigrationReport, MigrationStats } from '../live/index.js';
import { formatSize, parseSize } from '../util/size.js';
import { parseCount, progressMode } from './common.js';
import type { ProgressMode } from './progress.js';

const TRACKERS = ['auto', 'soft-dirty', 'page-hash'];

export function registerMigrate(program: Command): void {
  program
    .command('migrate')
    .summary('live-migrate a running QEMU VM to a `ferry migrate-listen` on another host')
    .description(
      'Iterative pre-copy: all guest RAM is copied while the VM runs, dirtied pages are re-sent in rounds, ' +
        'then the VM pauses briefly for the rest and its device state, and resumes on the destination once ' +
        "the destination's memory digest matched. Any failure before that leaves the source running; Ctrl-C " +
        'aborts.\n\n' +
        'The VM must keep its RAM in a shared file: -object memory-backend-file,id=mem,size=…,mem-path=RAM,share=on ' +
        "-machine memory-backend=mem (or use --engine qemu, QEMU's own migration under Ferry's policy).",
    )
    .requiredOption('--qmp <socket>', "the source QEMU's QMP unix socket")
    .option('--ram <path>', "the source VM's guest RAM file (required for --engine ferry)")
    .requiredOption('--to <addr:port>', 'the destination `ferry migrate-listen` address')
    .option('--max-downtime <ms>', 'longest acceptable pause in milliseconds', '300')
    .option('--max-bandwidth <rate>', 'bytes per second at most, with k/M/G suffixes (default: unlimited)')
    .option('--auto-converge', 'throttle the guest CPU when it dirties memory faster than it can be sent')
    .option('--engine <engine>', "ferry (Ferry's pre-copy over a shared RAM file) or qemu (QEMU's own migration)", 'ferry')
    .option('--streams <n>', 'parallel page streams', '2')
    .option('--tracker <method>', `dirty page tracking: ${TRACKERS.join(', ')}`, 'auto')
    .option('-p', 'show progress')
    .option('--progress <mode>', 'progress output: bar (stderr) or json (JSON lines on stdout)')
    .action(async (o) => {
      const engine = o.engine as string;
      if (engine !== 'ferry' && engine !== 'qemu') throw new InvalidOptionError(`--engine must be ferry or qemu, not '${engine}'`, { field: 'engine' });
      if (engine === 'ferry' && !o.ram) throw new InvalidOptionError('--ram is required with --engine ferry', { field: 'ram' });
      if (!TRACKERS.includes(o.tracker)) throw new InvalidOptionError(`--tracker must be one of ${TRACKERS.join(', ')}`, { field: 'tracker' });
      const maxDowntimeMs = parseCount(o.maxDowntime, '--max-downtime', 1, 3_600_000);
      const maxBandwidth = o.maxBandwidth === undefined ? Infinity : parseSize(o.maxBandwidth, '--max-bandwidth');
      // Loaded here, not at start-up, so other commands do not pay for the migration stack.
      const [{ startMigration }, { MigrationError }, { createLogger }] = await Promise.all([import('../live/index.js'), import('../live/errors.js'), import('../log.js')]);
      const log = createLogger('migrate');
      const mode = progressMode(o.p, o.progress);
      const migration = await startMigration({
        engine,
        source: { kind: 'qemu-shared-file', qmpSocket: o.qmp, ramPath: o.ram ?? '', tracker: o.tracker, log },
        to: parseAddress(o.to, '--to'),
        limits: { maxDowntimeMs, maxBandwidth, autoConverge: o.autoConverge === true },
        streams: parseCount(o.streams, '--streams', 1, 16),
        log,
      });
      const onInterrupt = () => migration.abort();
      process.once('SIGINT', onInterrupt);
      process.once('SIGTERM', onInterrupt);
      migration.on('stats', (s) => showStats(mode, s));
      const report = await migration.start();
      process.off('SIGINT', onInterrupt);
      process.off('SIGTERM', onInterrupt);
      showReport(mode, report);
      if (report.outcome !== 'completed') {
        const where = report.sourceRunning ? 'the source VM is still running' : 'the source VM is paused';
        throw new MigrationError(`migration ${report.outcome}: ${report.reason ?? 'unknown reason'} (${where})`);
      }
    });

  program
    .command('migrate-listen')
    .summary('receive one live migration into a QEMU VM started with -incoming defer -S')
    .description(
      'Start the destination QEMU like the source, on its own RAM file, plus -incoming defer -S. Pages are ' +
        'written into that file; the VM resumes only after the memory digest matched the source and the ' +
        'device state loaded. If the migration fails, the destination QEMU is told to quit.',
    )
    .requiredOption('--listen <addr:port>', 'address to listen on')
    .requiredOption('--qmp <socket>', "the destination QEMU's QMP unix socket")
    .requiredOption('--ram <path>', "the destination VM's guest RAM file")
    .action(async (o) => {
      const [{ listenForMigration }, { MigrationError }, { createLogger }] = await Promise.all([import('../live/index.js'), import('../live/errors.js'), import('../log.js')]);
      const log = createLogger('migrate-listen');
      const { host, port } = parseAddress(o.listen, '--listen');
      const listener = await listenForMigration({ host, port, destination: { kind: 'qemu-shared-file', qmpSocket: o.qmp, ramPath: o.ram, nativeHost: host, log }, log });
      const address = listener.address;
      process.stdout.write(`listening on ${address.host}:${address.port}\n`);
      const result = await listener.result;
      await listener.close();
      process.stdout.write(JSON.stringify({ type: 'done', ...result }) + '\n');
      if (result.outcome !== 'resumed') throw new MigrationError(`incoming migration discarded: ${result.reason ?? 'unknown reason'}`);
    });
}

function parseAddress(text: string, what: string): { host: string; port: number } {
  const m = /^(.*):(\d+)$/.exec(text);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !m[1] || port > 65535) throw new InvalidOptionError(`${what} must be ADDRESS:PORT, not '${text}'`, { field: what });
  return { host: m[1].replace(/^\[(.*)\]$/, '$1'), port };
}

let lastDraw = 0;

function showStats(mode: ProgressMode, s: MigrationStats): void {
  if (mode === 'json') {
    process.stdout.write(JSON.stringify({ type: 'progress', ...finite(s) }) + '\n');
    return;
  }
  if (mode !== 'bar') return;
  const now = performance.now();
  if (now - lastDraw < 200) return;
  lastDraw = now;
  const line =
    `round ${s.round}  sent ${formatSize(s.transferredBytes)}  remaining ${formatSize(s.remainingBytes)}  ` +
    `dirty ${formatSize(Math.round(s.dirtyRate))}/s  bw ${formatSize(Math.round(s.bandwidth))}/s  ` +
    `downtime ~${Number.isFinite(s.expectedDowntimeMs) ? Math.round(s.expectedDowntimeMs) : '--'} ms${s.throttle ? `  throttle ${Math.round(s.throttle * 100)}%` : ''}`;
  process.stderr.write(process.stderr.isTTY ? `\r${line.padEnd(110)}` : `${line}\n`);
}

function showReport(mode: ProgressMode, r: MigrationReport): void {
  if (mode === 'json') {
    process.stdout.write(JSON.stringify({ type: 'done', ...r }) + '\n');
    return;
  }
  if (mode === 'bar' && process.stderr.isTTY) process.stderr.write('\n');
  if (r.outcome === 'completed') {
    process.stdout.write(
      `migrated in ${(r.totalMs / 1000).toFixed(1)} s: downtime ${r.downtimeMs.toFixed(0)} ms, ${r.rounds} rounds, ` +
        `${formatSize(r.transferredBytes)} sent for ${formatSize(r.ramBytes)} of RAM${r.memoryVerified ? `, memory verified (${r.verification})` : ''}\n`,
    );
  }
}

/** JSON has no Infinity: unlimited rates and unknown estimates become null. */
function finite(s: MigrationStats): Record<string, unknown> {
  return Object.fromEntries(Object.entries(s).map(([k, v]) => [k, typeof v === 'number' && !Number.isFinite(v) ? null : v]));
}
