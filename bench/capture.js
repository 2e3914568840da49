// Online capture over SSH, Ferry vs the classic pipeline, on the generated 4 GiB benchmark disk:
//   ferry capture ssh://…/SRC out.qcow2 -O qcow2
//   ssh … 'dd if=SRC bs=4M | zstd -1' > out.zst && zstd -d out.zst && qemu-img convert -O qcow2 out.raw out.qcow2
// Both run against a private sshd on loopback, through a proxy that counts the bytes the server sends.
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { loadavg, userInfo } from 'node:os';
import { join } from 'node:path';
import { FERRY, WORK, benchImage, machineLine, median, publish, sync, timed } from './lib.js';

const MiB = 1024 * 1024;

/** A throwaway OpenSSH server on a free loopback port, logging in the current user by a fresh key. */
async function startSshd(dir) {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  mkdirSync('/run/sshd', { recursive: true });
  for (const name of ['host', 'user']) execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, name)]);
  writeFileSync(join(dir, 'authorized_keys'), readFileSync(join(dir, 'user.pub')));
  const port = await freePort();
  writeFileSync(
    join(dir, 'sshd_config'),
    [
      'ListenAddress 127.0.0.1',
      `HostKey ${join(dir, 'host')}`,
      `AuthorizedKeysFile ${join(dir, 'authorized_keys')}`,
      `PidFile ${join(dir, 'sshd.pid')}`,
      'UsePAM no',
      'StrictModes no',
      'PermitRootLogin yes',
      'MaxSessions 20',
      'LogLevel ERROR',
    ].join('\n') + '\n',
  );
  const child = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', join(dir, 'sshd_config'), '-p', String(port)], { stdio: 'ignore' });
  for (let i = 0; i < 100 && !(await canConnect(port)); i++) await new Promise((r) => setTimeout(r, 50));
  return { port, stop: () => child.kill('SIGTERM') };
}

function freePort() {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function canConnect(port) {
  return new Promise((resolve) => {
    const s = connect({ port, host: '127.0.0.1' });
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
}

/** Forwards to sshd and counts what the server sends: the bytes on the wire, SSH framing included. */
async function countingProxy(targetPort) {
  const counter = { bytes: 0 };
  const server = createServer((client) => {
    const upstream = connect({ port: targetPort, host: '127.0.0.1' });
    upstream.on('data', (d) => (counter.bytes += d.length));
    client.pipe(upstream).pipe(client);
    const end = () => (client.destroy(), upstream.destroy());
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { port: server.address().port, counter, close: () => server.close() };
}

export async function runCaptureBench({ runs = 5 } = {}) {
  const source = await benchImage();
  const dir = join(WORK, 'capture-sshd');
  const sshd = await startSshd(dir);
  const proxy = await countingProxy(sshd.port);
  const user = userInfo().username;
  const hostPub = readFileSync(join(dir, 'host.pub'), 'utf8').trim().split(/\s+/);
  const knownHosts = join(dir, 'known_hosts');
  writeFileSync(knownHosts, `[127.0.0.1]:${proxy.port} ${hostPub[0]} ${hostPub[1]}\n`);
  const key = join(dir, 'user');
  const out = (name) => join(WORK, name);
  const outputs = [out('capture-ferry.qcow2'), out('capture-peer.zst'), out('capture-peer.raw'), out('capture-peer.qcow2')];
  const ferry = [process.execPath, FERRY, 'capture', '-i', key, '--known-hosts', knownHosts, '-O', 'qcow2', `ssh://${user}@127.0.0.1:${proxy.port}${source}`, outputs[0]];
  const ssh = `ssh -i ${key} -o UserKnownHostsFile=${knownHosts} -o StrictHostKeyChecking=yes -o BatchMode=yes -p ${proxy.port} ${user}@127.0.0.1`;
  const peer = [
    'sh',
    '-c',
    `${ssh} 'dd if=${source} bs=4M status=none | zstd -1 -q' > ${outputs[1]} && zstd -d -q -f ${outputs[1]} -o ${outputs[2]} && ` +
      `qemu-img convert -f raw -O qcow2 ${outputs[2]} ${outputs[3]}`,
  ];
  const results = { ferry: [], peer: [] };
  const loads = [];
  try {
    for (let i = 0; i < runs; i++) {
      for (const [who, argv, result] of [
        ['ferry', ferry, outputs[0]],
        ['peer', peer, outputs[3]],
      ]) {
        for (const o of outputs) rmSync(o, { force: true });
        sync();
        loads.push(loadavg()[0]);
        proxy.counter.bytes = 0;
        const r = await timed(argv);
        results[who].push({ ...r, wire: proxy.counter.bytes });
        // Both must have produced the source disk (checked outside the timing): a fast wrong result is worthless.
        execFileSync('qemu-img', ['compare', '-q', source, result]);
      }
    }
  } finally {
    for (const o of outputs) rmSync(o, { force: true });
    proxy.close();
    sshd.stop();
  }
  const row = (who) => ({
    seconds: median(results[who].map((r) => r.seconds)),
    best: Math.min(...results[who].map((r) => r.seconds)),
    wire: median(results[who].map((r) => r.wire)),
    rss: Math.max(...results[who].map((r) => r.rssMiB)),
  });
  const f = row('ferry');
  const p = row('peer');
  console.error(`bench: capture: ferry ${f.seconds.toFixed(2)} s, ${(f.wire / MiB).toFixed(0)} MiB; pipeline ${p.seconds.toFixed(2)} s, ${(p.wire / MiB).toFixed(0)} MiB`);
  const lines = [
    `Measured ${new Date().toISOString().slice(0, 10)} on ${machineLine()}; ${runs} alternating runs each, medians, warm page cache.`,
    'Source and target on the same machine, over OpenSSH on loopback; wire bytes counted by a proxy in front of sshd (SSH framing included).',
    `Load average (1 min) before the runs: ${Math.min(...loads).toFixed(1)} to ${Math.max(...loads).toFixed(1)} (the machine is shared; both tools ran under the same load, alternating).`,
    '',
    '| capture, 4 GiB disk with 1.5 GiB of data → qcow2 | wall (s) | best (s) | on the wire (MiB) | peak RSS (MiB) |',
    '|---|---:|---:|---:|---:|',
    `| \`ferry capture -O qcow2\` (used ranges only, zstd -1 at the source, 4 channels, verified) | ${f.seconds.toFixed(2)} | ${f.best.toFixed(2)} | ${(f.wire / MiB).toFixed(0)} | ${f.rss.toFixed(0)} |`,
    `| \`ssh 'dd bs=4M \\| zstd -1' > out.zst\`, \`zstd -d\`, \`qemu-img convert -O qcow2\` | ${p.seconds.toFixed(2)} | ${p.best.toFixed(2)} | ${(p.wire / MiB).toFixed(0)} | ${p.rss.toFixed(0)} |`,
    '',
    `Ratio Ferry / pipeline: ${(f.seconds / p.seconds).toFixed(2)} in time, ${(f.wire / p.wire).toFixed(4)} in bytes on the wire.`,
    '',
    'Ferry reads only the 1.5 GiB in use where the pipeline reads and compresses all 4 GiB. Almost all bytes on the',
    'wire are the 768 MiB of incompressible data, in both; Ferry\'s own framing (runs of chunks in frames of up to',
    '4 MiB compressed as one, one hash per 4 MiB group in the consistency pass) costs less than the pipeline\'s zstd',
    'stream over the whole disk. Ferry\'s time includes what the pipeline skips: a second pass that hashes the source',
    'for changes (DEST is converted meanwhile), a durable DEST (fsynced while it is read back), and reading DEST back',
    'to check every chunk against the source\'s hash. Its working image and journal are resumable throughout (journal',
    'appended every 250 ms, fsynced with the data every 30 s: this capture ends before any working-image fsync).',
  ];
  publish('capture', lines.join('\n'));
  return { ferry: f, peer: p };
}
