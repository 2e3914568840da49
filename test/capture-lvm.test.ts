// Capture of an LVM logical volume from a temporary snapshot, against a real LVM: this host's kernel has no
// device-mapper, so the volume lives in a small guest under TCG (helpers/lvm-guest.ts) reached over SSH.
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { doneLine, ferry, fileDigest, tempDir } from './helpers/env.js';
import { LVM_GUEST_VOLUME, startLvmGuest, type LvmGuest } from './helpers/lvm-guest.js';

let guest: LvmGuest;
let work: { dir: string; cleanup: () => Promise<void> };

beforeAll(async () => {
  work = await tempDir('ferry-capture-lvm-');
  guest = await startLvmGuest(work.dir);
}, 240_000);

afterAll(async () => {
  await guest?.stop();
  await work?.cleanup();
});

function capture(dest: string, extra: string[] = []) {
  return ferry(['capture', '-i', guest.userKey, '--host-key', guest.fingerprint, `ssh://root@127.0.0.1:${guest.port}${LVM_GUEST_VOLUME}`, dest, '--progress=json', ...extra], { timeoutMs: 180_000 });
}

/** The image's md5, to compare with md5sum of the volume in the guest. */
const md5File = (path: string) => fileDigest(path, 'md5');
const md5Volume = async () => (await guest.ssh(`md5sum ${LVM_GUEST_VOLUME}`)).split(/\s+/)[0];
const snapshots = async () => (await guest.ssh('lvs --noheadings -o lv_name vg0')).split(/\s+/).filter((n) => n.startsWith('ferry-snap-'));

describe('ferry capture of an LVM logical volume', () => {
  it('reads a temporary snapshot: the image is the volume as it was when the capture began, while it is rewritten', async () => {
    const before = await md5Volume();
    // Rewrites most of the volume as soon as Ferry's snapshot is active (lv_attr s...a; lvcreate shows the
    // new volume earlier, plain, while it clears it), while the snapshot is being read.
    await guest.ssh(
      `rm -f /tmp/writer.done; (until lvs --noheadings -o lv_name,lv_attr vg0 | grep -Eq 'ferry-snap-[0-9a-f]+ +s...a'; do sleep 0.05; done; i=0; while [ $i -lt 40 ]; do ` +
        `dd if=/dev/urandom of=${LVM_GUEST_VOLUME} bs=64k count=16 seek=$((i*16)) conv=notrunc 2>/dev/null; i=$((i+1)); done; sync; touch /tmp/writer.done) </dev/null >/dev/null 2>&1 &`,
    );
    const dest = join(work.dir, 'snap.raw');
    // Slowed down so that the writer runs while the snapshot is read.
    const r = await capture(dest, ['--bandwidth', '8M']);
    expect(r.code, r.stderr).toBe(0);
    const done = doneLine(r.stdout);
    expect(done.snapshot).toMatchObject({ name: expect.stringMatching(/^ferry-snap-/) });
    expect(await md5File(dest)).toBe(before);
    for (let i = 0; i < 100 && !(await guest.ssh('ls /tmp/writer.done 2>/dev/null || true')).trim(); i++) await delay(200);
    expect(await md5Volume()).not.toBe(before); // the writer did change the volume under the capture
    expect(await snapshots()).toEqual([]);
  });

  it('removes its snapshot when Ferry is killed mid-capture', async () => {
    const dest = join(work.dir, 'killed.raw');
    const running = capture(dest, ['--bandwidth', '1M']);
    let seen: string[] = [];
    for (let i = 0; i < 150 && seen.length === 0; i++) {
      seen = await snapshots();
      if (!seen.length) await delay(200);
    }
    expect(seen).toHaveLength(1);
    await delay(1000);
    const { execFileSync } = await import('node:child_process');
    // The CLI process (under /usr/bin/time): killed outright, nothing of Ferry's cleanup runs.
    execFileSync('pkill', ['-KILL', '-f', `capture .*${guest.port}${LVM_GUEST_VOLUME}`]);
    await running;
    let left = seen;
    for (let i = 0; i < 100 && left.length; i++) {
      await delay(200);
      left = await snapshots();
    }
    expect(left).toEqual([]);
  });

  it('reads the volume live when its group has no room for a snapshot', async () => {
    await guest.ssh('lvcreate -q --yes -l 100%FREE -n filler vg0');
    try {
      const dest = join(work.dir, 'live.raw');
      const r = await capture(dest);
      expect(r.code, r.stderr).toBe(0);
      expect(doneLine(r.stdout).snapshot).toBeUndefined();
      expect(r.stderr).toMatch(/no LVM snapshot/);
      expect(await md5File(dest)).toBe(await md5Volume());
    } finally {
      await guest.ssh('lvremove -q -f vg0/filler');
    }
  });
});

describe('LVM snapshot planning', async () => {
  const { parseLvs, snapshotSize } = await import('../src/capture/lvm-snapshot.js');
  const MiB = 1024 * 1024;

  it('reads the volume, its group and its type from lvs', () => {
    expect(parseLvs('  vg0|data|50331648|218103808|4194304|-wi-ao----\n')).toEqual({ vg: 'vg0', lv: 'data', size: 48 * MiB, vgFree: 208 * MiB, extentSize: 4 * MiB, attr: '-wi-ao----' });
    expect(parseLvs('')).toBeUndefined();
    expect(parseLvs('  vg0|data|lots|0|4194304|-wi-ao----')).toBeUndefined();
  });

  it('gives a snapshot as much room as the volume when the group has it, whole extents of what is free otherwise, none below a tenth', () => {
    const v = { vg: 'vg0', lv: 'data', size: 100 * MiB, vgFree: 1000 * MiB, extentSize: 4 * MiB, attr: '-wi-ao----' };
    expect(snapshotSize(v)).toEqual({ size: 100 * MiB });
    expect(snapshotSize({ ...v, vgFree: 30 * MiB })).toEqual({ size: 28 * MiB });
    expect(snapshotSize({ ...v, vgFree: 9 * MiB })).toMatchObject({ reason: expect.stringMatching(/less than a tenth/) });
    expect(snapshotSize({ ...v, attr: 'Vwi-aotz--' })).toMatchObject({ reason: expect.stringMatching(/not a plain logical volume/) });
    expect(snapshotSize({ ...v, attr: 'owi-aos---' })).toEqual({ size: 100 * MiB });
  });
});
