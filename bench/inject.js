// Driver injection, Ferry vs virt-v2v-in-place, on copies of the same Debian guest (the test fixture:
// built for other hardware, no virtio in its initramfs). Both tools fix the guest for KVM in place.
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, rmSync, statSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { FERRY, WORK, machineLine, median, publish, sync, timed } from './lib.js';

/** The newest cached Debian guest built by test/helpers/debian-guest.ts (the tests build it once). */
function guestImage() {
  const dir = process.env.FERRY_TEST_CACHE ?? (process.env.XDG_CACHE_HOME ? join(process.env.XDG_CACHE_HOME, 'ferry-test') : '/var/cache/ferry-test');
  const images = existsSync(dir) ? readdirSync(dir).filter((n) => /^debian-.*\.raw$/.test(n)).map((n) => join(dir, n)) : [];
  images.sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  return images[0];
}

export async function runInjectBench({ runs = 2 } = {}) {
  const pristine = guestImage();
  if (!pristine) {
    console.error('bench: inject: no cached Debian guest; run `npx vitest run test/drivers-linux.test.ts` once to build it');
    return [];
  }
  const { libguestfsEnvironment, probeAccelerator } = await import('../dist/drivers/kvm-probe.js');
  // Both tools get the same appliance accelerator: KVM only where a probe boot succeeds.
  const env = await libguestfsEnvironment();
  const accelerator = await probeAccelerator();
  const copy = join(WORK, 'inject-guest.raw');
  const tools = {
    ferry: [process.execPath, FERRY, 'inject', '--target', 'kvm', copy],
    peer: ['virt-v2v-in-place', '-i', 'disk', copy],
  };
  const results = { ferry: [], peer: [] };
  const loadBefore = loadavg()[0];
  for (let i = 0; i < runs; i++) {
    for (const who of ['ferry', 'peer']) {
      execFileSync('cp', ['--sparse=always', pristine, copy]);
      execFileSync('chmod', ['644', copy]);
      sync();
      const r = await timed(tools[who], env);
      console.error(`bench: inject: ${who} run ${i + 1}: ${r.seconds.toFixed(1)} s`);
      results[who].push(r);
    }
  }
  const loadAfter = loadavg()[0];
  rmSync(copy, { force: true });
  rmSync(`${copy}.ferry-inject.json`, { force: true });
  const row = (who) => ({ seconds: median(results[who].map((r) => r.seconds)), best: Math.min(...results[who].map((r) => r.seconds)), rss: Math.max(...results[who].map((r) => r.rssMiB)) });
  const f = row('ferry');
  const p = row('peer');
  const v2v = execFileSync('virt-v2v-in-place', ['--version'], { encoding: 'utf8' }).trim();
  const lines = [
    `Measured ${new Date().toISOString().slice(0, 10)} on ${machineLine()}, ${v2v}; libguestfs appliance under ${accelerator.toUpperCase()};`,
    `${runs === 1 ? 'one run' : `${runs} alternating runs, medians`} each on a fresh copy of the Debian 12 test guest; load average ${loadBefore.toFixed(1)} before and ${loadAfter.toFixed(1)} after`,
    '(the appliances of both tools run under TCG, so figures from a machine busy with other work are noisy). Ratio = Ferry time / virt-v2v time;',
    'peak RSS is the largest process of each run: the libguestfs appliance\'s qemu for both.',
    'virt-v2v rebuilds the initramfs with the guest\'s update-initramfs inside the appliance, which dominates its time under TCG;',
    'Ferry extends the guest\'s initramfs-tools image on the host (`src/drivers/linux/initramfs-tools-host.ts`; dracut guests still rebuild in the appliance)',
    'and recognises this guest with its own light detection instead of libguestfs inspect-os (`src/drivers/linux/detect.ts`).',
    '',
    '| guest | Ferry `inject --target kvm` (s) | `virt-v2v-in-place -i disk` (s) | ratio | best (s) | peak RSS Ferry / virt-v2v (MiB) |',
    '|---|---:|---:|---:|---:|---:|',
    `| Debian 12, ${(statSync(pristine).size / 2 ** 30).toFixed(1)} GiB raw | ${f.seconds.toFixed(1)} | ${p.seconds.toFixed(1)} | **${(f.seconds / p.seconds).toFixed(2)}** | ${f.best.toFixed(1)} / ${p.best.toFixed(1)} | ${f.rss.toFixed(0)} / ${p.rss.toFixed(0)} |`,
  ];
  publish('inject', lines.join('\n'));
  return [{ ferry: f, peer: p }];
}
