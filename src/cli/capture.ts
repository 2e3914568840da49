import type { Command } from 'commander';
import type { DiskSettings, HostKeySettings, TransferSettings } from '../capture/capture.js';
import type { CaptureProgress, CaptureResult } from '../capture/session.js';
import type { SshAuth } from '../capture/ssh-connection.js';
import { InvalidOptionError } from '../errors.js';
import { formatSize, parseSize } from '../util/size.js';
import { collectOptions, parseCount, printOptionsHelp, progressMode } from './common.js';
import type { ProgressMode } from './progress.js';

export function registerCapture(program: Command): void {
  program
    .command('capture')
    .summary('capture a running machine\'s disk over SSH (online P2V)')
    .description(
      'Read DEVICE on a running machine over SSH, block by block, into DEST in any format Ferry writes. A ' +
        'first full pass runs while the source works; incremental passes fetch what changed; the final pass ' +
        "freezes the device's mounted filesystems briefly. Interrupted captures resume from a journal beside " +
        'DEST. Nothing is installed on the source: a small agent is pushed over SSH and removed at once. An ' +
        'LVM logical volume whose volume group has room is read from a temporary snapshot instead (one point ' +
        'in time, no freeze; removed afterwards). A user other than root reads the device through sudo.\n' +
        '\n' +
        '  ferry capture ssh://USER@HOST[:PORT]/DEVICE DEST [-O FMT]\n' +
        '  ferry capture ssh://USER@HOST[:PORT] --all-disks --out-dir DIR [-O FMT]',
    )
    .argument('<source>', 'ssh://USER@HOST[:PORT]/DEVICE (or without DEVICE for --all-disks)')
    .argument('[dest]', 'output image')
    .option('-O, --output-format <fmt>', 'output format', 'raw')
    .option('-o, --options <k=v,...>', 'output format options (repeatable; -o help lists them)', collectOptions)
    .option('-c, --compress', 'compress the output image (formats that support it)')
    .option('--all-disks', 'capture every fixed disk of the machine into --out-dir, with machine.json')
    .option('--out-dir <dir>', 'folder for --all-disks images and machine.json')
    .option('--inventory-only', 'with --all-disks: write machine.json only, capture nothing')
    .option('-i, --identity <file>', 'private key file for the SSH login')
    .option('--passphrase-env <var>', 'environment variable holding the private key\'s passphrase')
    .option('--agent', 'authenticate with the ssh-agent at SSH_AUTH_SOCK')
    .option('--password-env <var>', 'environment variable holding the login password (also answers sudo)')
    .option('--known-hosts <file>', 'known_hosts file to verify the host key against (default ~/.ssh/known_hosts)')
    .option('--host-key <fingerprint>', 'trust exactly this host key, SHA256:... as ssh-keygen -l prints it (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--channels <n>', 'parallel reading channels (agent processes on one SSH connection)', '4')
    .option('--level <n>', 'zstd level at the source, 0 for none', '1')
    .option('--bandwidth <rate>', 'limit the transfer to RATE bytes per second, e.g. 20M')
    .option('--chunk-size <size>', 'unit of transfer, hashing and resume', '256k')
    .option('--sync', 'bring an existing DEST up to date with the source (incremental pass only)')
    .option('--no-freeze', 'do not freeze filesystems for the final pass')
    .option('--no-snapshot', 'read an LVM logical volume live even when its volume group has room for a temporary snapshot')
    .option('--freeze-timeout <seconds>', 'longest the filesystems stay frozen; the source thaws them by itself after it', '30')
    .option('--max-passes <n>', 'live passes before the final one', '6')
    .option('--converge <size>', 'freeze once a live pass fetches no more than this', '64M')
    .option('--all-blocks', 'copy free space of filesystems too (default: used blocks only, for ext2/3/4)')
    .option('-p', 'show a progress bar')
    .option('--progress <mode>', 'progress output: bar (stderr) or json (JSON lines on stdout)')
    .option('-q, --quiet', 'no progress output')
    .action(async (sourceUrl: string, dest: string | undefined, o) => {
      // Loaded here, not at start-up: ssh2 and the capture stack would slow every other command.
      const [{ captureDisk, captureMachine }, { parseSshUrl }, { createLogger }] = await Promise.all([
        import('../capture/capture.js'),
        import('../capture/ssh-connection.js'),
        import('../log.js'),
      ]);
      if (await printOptionsHelp(o.outputFormat, o.options)) return;
      const target = parseSshUrl(sourceUrl);
      const log = createLogger('capture');
      const freezeTimeout = Number(o.freezeTimeout);
      if (!(freezeTimeout > 0 && freezeTimeout <= 3600)) throw new InvalidOptionError('--freeze-timeout must be more than 0 and at most 3600 seconds', { field: 'freeze-timeout' });
      const controller = new AbortController();
      const cancel = () => controller.abort();
      process.once('SIGINT', cancel);
      process.once('SIGTERM', cancel);
      const settings: DiskSettings = {
        format: o.outputFormat,
        formatOptions: o.options,
        compress: o.compress === true,
        chunkSize: parseSize(o.chunkSize, '--chunk-size'),
        sync: o.sync === true,
        freeze: o.freeze !== false,
        snapshot: o.snapshot !== false,
        freezeTimeoutMs: Math.round(freezeTimeout * 1000),
        maxPasses: parseCount(o.maxPasses, '--max-passes', 1, 100),
        convergeBytes: parseSize(o.converge, '--converge'),
        usedBlocksOnly: o.allBlocks !== true,
        signal: controller.signal,
        log,
      };
      const auth: SshAuth = { identityFile: o.identity, passphraseEnv: o.passphraseEnv, useAgent: o.agent === true, passwordEnv: o.passwordEnv };
      const hostKeys: HostKeySettings = { knownHostsFile: o.knownHosts, pins: o.hostKey };
      const transfer: TransferSettings = {
        channels: parseCount(o.channels, '--channels', 1, 8),
        level: parseCount(o.level, '--level', 0, 19),
        bandwidth: o.bandwidth === undefined ? undefined : parseSize(o.bandwidth, '--bandwidth'),
      };
      const progress = captureProgress(o.quiet ? 'none' : progressMode(o.p, o.progress));
      try {
        if (o.allDisks) {
          if (!o.outDir) throw new InvalidOptionError('--all-disks needs --out-dir DIR', { field: 'out-dir' });
          if (dest) throw new InvalidOptionError('--all-disks writes into --out-dir: give no DEST', { field: 'dest' });
          const result = await captureMachine({
            target,
            auth,
            hostKeys,
            transfer,
            settings,
            outDir: o.outDir,
            inventoryOnly: o.inventoryOnly === true,
            onProgress: (disk, p) => progress.update(p, disk),
          });
          for (const r of result.disks) progress.done(r);
          log.info({ machineFile: result.machineFile, disks: result.disks.length }, 'machine captured');
        } else {
          if (!dest) throw new InvalidOptionError('missing DEST (or use --all-disks --out-dir DIR)', { field: 'dest' });
          if (o.inventoryOnly) throw new InvalidOptionError('--inventory-only goes with --all-disks', { field: 'inventory-only' });
          const result = await captureDisk({ target, auth, hostKeys, transfer, dest, settings, onProgress: (p) => progress.update(p) });
          progress.done(result);
          log.info({ ...result, elapsedMs: Math.round(result.elapsedMs) }, 'capture finished');
        }
      } finally {
        process.off('SIGINT', cancel);
        process.off('SIGTERM', cancel);
      }
    });
}

interface CaptureReporter {
  update(p: CaptureProgress, disk?: string): void;
  done(r: CaptureResult): void;
}

/** Capture progress: a bar on stderr, or JSON lines on stdout with the wire and write counters. */
function captureProgress(mode: ProgressMode): CaptureReporter {
  if (mode === 'none') return { update: () => undefined, done: () => undefined };
  let phaseKey = '';
  let phaseStarted = performance.now();
  let lastDraw = 0;
  const rate = (p: CaptureProgress) => p.done / Math.max(0.001, (performance.now() - phaseStarted) / 1000);
  const eta = (p: CaptureProgress) => (p.done > 0 && p.total >= p.done ? (p.total - p.done) / rate(p) : undefined);
  const enter = (p: CaptureProgress, disk?: string) => {
    const key = `${disk ?? ''}/${p.phase}/${p.pass}`;
    if (key === phaseKey) return false;
    phaseKey = key;
    phaseStarted = performance.now();
    return true;
  };

  if (mode === 'json') {
    const emit = (type: string, p: CaptureProgress, disk?: string) => {
      const seconds = eta(p);
      process.stdout.write(
        JSON.stringify({
          type,
          operation: 'capture',
          ...(disk ? { disk } : {}),
          phase: p.phase,
          pass: p.pass,
          done: p.done,
          total: p.total,
          percent: p.total ? Math.round((p.done / p.total) * 10000) / 100 : 100,
          bytesRead: p.bytesRead,
          bytesOnWire: p.bytesOnWire,
          bytesWritten: p.bytesWritten,
          rate: Math.round(rate(p)),
          eta: seconds === undefined ? null : Math.round(seconds * 10) / 10,
        }) + '\n',
      );
    };
    return {
      update(p, disk) {
        if (enter(p, disk)) emit('phase', p, disk);
        const now = performance.now();
        if (now - lastDraw < 250) return;
        lastDraw = now;
        emit('progress', p, disk);
      },
      done(r) {
        process.stdout.write(JSON.stringify({ type: 'done', operation: 'capture', ...r, elapsedMs: Math.round(r.elapsedMs) }) + '\n');
      },
    };
  }

  const tty = process.stderr.isTTY === true;
  return {
    update(p, disk) {
      const entered = enter(p, disk);
      const now = performance.now();
      if (!entered && now - lastDraw < (tty ? 100 : 2000)) return;
      lastDraw = now;
      const pct = p.total ? (p.done / p.total) * 100 : 100;
      const label = `${disk ? `${disk} ` : ''}${p.phase}${p.pass ? ` pass ${p.pass}` : ''}`;
      const seconds = eta(p);
      const stats = `${formatSize(Math.round(rate(p)))}/s  wire ${formatSize(p.bytesOnWire)}  written ${formatSize(p.bytesWritten)}  ${seconds === undefined ? '' : `ETA ${Math.ceil(seconds)}s`}`;
      if (!tty) {
        process.stderr.write(`capture ${label}: ${pct.toFixed(1)}%  ${stats}\n`);
        return;
      }
      const width = Math.max(10, Math.min(30, (process.stderr.columns ?? 80) - 70));
      const filled = Math.round((Math.min(100, pct) / 100) * width);
      process.stderr.write(`\r${label.padEnd(18)} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${pct.toFixed(1).padStart(5)}%  ${stats}   `);
    },
    done(r) {
      process.stderr.write(
        `${tty ? '\n' : ''}captured ${r.source} into ${r.dest} (${r.format}): ${formatSize(r.capturedBytes)} in use, ${formatSize(r.bytesOnWire)} on the wire, ` +
          `${r.passes} pass(es)${r.frozen.length ? `, frozen: ${r.frozen.join(' ')}` : ''}, verified, ${(r.elapsedMs / 1000).toFixed(1)} s\n`,
      );
    },
  };
}
