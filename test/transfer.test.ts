import { createHmac, randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { appendFile, chmod, copyFile, mkdir, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { AgentChannel } from '../src/capture/agent-channel.js';
import { fingerprint, knownHostsPolicy, pinnedHostKeys } from '../src/capture/known-hosts.js';
import { parseInventory } from '../src/capture/machine.js';
import { readPartitionTable } from '../src/capture/partitions.js';
import { parseSshUrl } from '../src/capture/ssh-connection.js';
import { native } from '../src/native.js';
import { decodeDataFrame, runHash, zeroChunkHash, zeroChunkHashes } from '../src/transfer/chunk-codec.js';
import { FrameReader } from '../src/transfer/frame-reader.js';
import { Journal } from '../src/transfer/journal.js';
import { AGENT_MAGIC, DataFlag, FrameType, HEADER_SIZE, MAX_CHUNK, PROTOCOL_VERSION, ProtocolError } from '../src/transfer/protocol.js';
import { RateLimiter } from '../src/transfer/rate-limiter.js';
import { tempDir } from './helpers/env.js';

let work: { dir: string; cleanup: () => Promise<void> };
beforeAll(async () => {
  work = await tempDir('ferry-transfer-');
});
afterAll(async () => {
  await work?.cleanup();
});

function frame(type: number, opts: { flags?: number; offset?: number; length?: number; hash?: Buffer; payload?: Buffer; payloadLength?: number } = {}): Buffer {
  const payload = opts.payload ?? Buffer.alloc(0);
  const h = Buffer.alloc(HEADER_SIZE);
  h.writeUInt8(type, 0);
  h.writeUInt8(opts.flags ?? 0, 1);
  h.writeUInt32LE(opts.payloadLength ?? payload.length, 4);
  h.writeBigUInt64LE(BigInt(opts.offset ?? 0), 8);
  h.writeUInt32LE(opts.length ?? 0, 16);
  (opts.hash ?? Buffer.alloc(8)).copy(h, 24);
  return Buffer.concat([h, payload]);
}

const hello = () => {
  const hash = Buffer.alloc(8);
  hash.writeBigUInt64LE(AGENT_MAGIC);
  return frame(FrameType.Hello, { offset: PROTOCOL_VERSION, hash });
};

function xxh(data: Buffer): Buffer {
  const h = Buffer.alloc(8);
  h.writeBigUInt64LE(native.xxh64(data));
  return h;
}

/** An agent impersonated by the test: whatever bytes it is given come back as replies. */
async function fakeAgent(replies: Buffer[]): Promise<{ channel: AgentChannel; requests: PassThrough }> {
  const output = new PassThrough();
  const requests = new PassThrough();
  output.write(hello());
  const channel = await AgentChannel.start({ output, input: requests, errors: new PassThrough(), where: 'fake agent' });
  for (const r of replies) output.write(r);
  return { channel, requests };
}

describe('XXH64', () => {
  it('matches the published test vectors', () => {
    expect(native.xxh64(Buffer.from('')).toString(16)).toBe('ef46db3751d8e999');
    expect(native.xxh64(Buffer.from('a')).toString(16)).toBe('d24ec4f1a98c6e5b');
    expect(native.xxh64(Buffer.from('abc')).toString(16)).toBe('44bc2cf5ad770999');
    expect(native.xxh64(Buffer.from('Nobody inspects the spammish repetition')).toString(16)).toBe('fbcea83c8a378bf1');
  });

  it('hashes blocks in a batch exactly as one at a time, the last block short', async () => {
    const data = randomBytes(10_000);
    const out = Buffer.alloc(3 * 8);
    expect(await native.hashBlocks(data, data.length, 4096, out)).toBe(3);
    expect(out.subarray(0, 8).equals(xxh(data.subarray(0, 4096)))).toBe(true);
    expect(out.subarray(16, 24).equals(xxh(data.subarray(8192)))).toBe(true);
  });
});

describe('frames from a hostile agent', () => {
  it('refuses a payload larger than any chunk before reading it', async () => {
    const stream = new PassThrough();
    stream.end(frame(FrameType.Data, { length: 4096, payloadLength: 0xffffffff }));
    await expect(new FrameReader(stream, 'test').next()).rejects.toThrow(ProtocolError);
  });

  it('refuses unknown frame types, and lengths that do not fit the type', async () => {
    for (const bad of [
      frame(99),
      frame(FrameType.Data, { length: MAX_CHUNK + 1, payloadLength: 0 }),
      frame(FrameType.Data, { flags: DataFlag.Zstd, length: 4096, payloadLength: 4096 }),
      frame(FrameType.Data, { flags: DataFlag.Zero, length: 4096, payload: Buffer.alloc(1) }),
      frame(FrameType.Hashes, { length: 3, payload: Buffer.alloc(16) }),
      frame(FrameType.Error, { payload: Buffer.alloc(5000) }),
      frame(FrameType.End, { payload: Buffer.alloc(1) }),
    ]) {
      const stream = new PassThrough();
      stream.end(bad);
      await expect(new FrameReader(stream, 'test').next()).rejects.toThrow(ProtocolError);
    }
  });

  it('reports a stream cut inside a frame, and a clean end between frames', async () => {
    const cut = new PassThrough();
    cut.end(frame(FrameType.Info, { payload: Buffer.alloc(16) }).subarray(0, 40));
    await expect(new FrameReader(cut, 'test').next()).rejects.toThrow(/closed in the middle/);
    const clean = new PassThrough();
    clean.end();
    expect(await new FrameReader(clean, 'test').next()).toBeUndefined();
  });

  it('reassembles frames split across arbitrary pieces', async () => {
    const data = Buffer.concat([frame(FrameType.Info, { payload: Buffer.alloc(16, 7) }), frame(FrameType.End)]);
    const stream = new PassThrough();
    for (let i = 0; i < data.length; i += 5) stream.write(data.subarray(i, i + 5));
    stream.end();
    const reader = new FrameReader(stream, 'test');
    expect((await reader.next())?.payload.equals(Buffer.alloc(16, 7))).toBe(true);
    expect((await reader.next())?.header.type).toBe(FrameType.End);
  });

  it('rejects data that does not match its hash, and zero chunks with a wrong hash', async () => {
    const data = randomBytes(4096);
    const scratch = Buffer.alloc(4096);
    const good = { type: FrameType.Data, flags: 0, payloadLength: 4096, offset: 0, length: 4096, hash: xxh(data) };
    const decoded = await decodeDataFrame(good, data, 4096, scratch, 'test');
    expect(decoded.data?.equals(data)).toBe(true);
    expect(decoded.hashes.equals(xxh(data))).toBe(true);
    await expect(decodeDataFrame({ ...good, hash: Buffer.alloc(8) }, data, 4096, scratch, 'test')).rejects.toThrow(/does not match its hash/);
    const zero = { ...good, flags: DataFlag.Zero, payloadLength: 0 };
    expect((await decodeDataFrame({ ...zero, hash: zeroChunkHash(4096) }, Buffer.alloc(0), 4096, scratch, 'test')).data).toBeUndefined();
    await expect(decodeDataFrame(zero, Buffer.alloc(0), 4096, scratch, 'test')).rejects.toThrow(/zero data/);
  });

  it('checks a run of chunks by the hash of their hashes: any chunk changed, or two swapped, fails', async () => {
    const chunks = [randomBytes(1024), randomBytes(1024), randomBytes(1000)];
    const data = Buffer.concat(chunks);
    const hashes = Buffer.concat(chunks.map(xxh));
    expect(runHash(hashes).equals(xxh(hashes))).toBe(true);
    const header = { type: FrameType.Data, flags: 0, payloadLength: data.length, offset: 0, length: data.length, hash: runHash(hashes) };
    const decoded = await decodeDataFrame(header, data, 1024, Buffer.alloc(data.length), 'test');
    expect(decoded.hashes.equals(hashes)).toBe(true);
    const flipped = Buffer.from(data);
    flipped[1500] ^= 1;
    await expect(decodeDataFrame(header, flipped, 1024, Buffer.alloc(data.length), 'test')).rejects.toThrow(/does not match its hash/);
    const swapped = Buffer.concat([chunks[1], chunks[0], chunks[2]]);
    await expect(decodeDataFrame(header, swapped, 1024, Buffer.alloc(data.length), 'test')).rejects.toThrow(/does not match its hash/);
    // All-zero runs travel as a flag; their hash is still the run hash of zero chunks, the last one short.
    const zeroHeader = { ...header, flags: DataFlag.Zero, payloadLength: 0, hash: runHash(zeroChunkHashes(data.length, 1024)) };
    expect((await decodeDataFrame(zeroHeader, Buffer.alloc(0), 1024, Buffer.alloc(data.length), 'test')).hashes.equals(zeroChunkHashes(data.length, 1024))).toBe(true);
    expect(zeroChunkHashes(data.length, 1024).subarray(16).equals(zeroChunkHash(1000))).toBe(true);
  });

  it('rejects compressed data that does not decompress', async () => {
    const header = { type: FrameType.Data, flags: DataFlag.Zstd, payloadLength: 100, offset: 0, length: 4096, hash: Buffer.alloc(8) };
    await expect(decodeDataFrame(header, randomBytes(100), 4096, Buffer.alloc(4096), 'test')).rejects.toThrow(/does not decompress/);
  });

  it('fails a READ whose frames do not start and end where the chunk grid puts them, and every request after it', async () => {
    const data = Buffer.alloc(512, 1);
    const { channel } = await fakeAgent([frame(FrameType.Data, { offset: 512, length: 512, hash: xxh(data), payload: data })]);
    // 512-byte chunks: the whole 1 KiB range is due in one frame.
    const first = channel.read(0, 1024, 512, 1, async () => undefined);
    await expect(first).rejects.toThrow(/where 0\+1024 was due/);
    await expect(channel.hashes(0, 512, 512)).rejects.toThrow(ProtocolError);
  });

  it('fails a READ that ends early', async () => {
    const { channel } = await fakeAgent([frame(FrameType.End)]);
    await expect(channel.read(0, 1024, 512, 1, async () => undefined)).rejects.toThrow(/ended at 0/);
  });

  it('turns an agent ERROR into that request\'s failure and serves the next request', async () => {
    const hashes = Buffer.alloc(8, 3);
    const { channel } = await fakeAgent([
      frame(FrameType.Error, { payload: Buffer.from('read at 0: Input/output error') }),
      frame(FrameType.Hashes, { offset: 0, length: 1, payload: hashes }),
      frame(FrameType.End),
    ]);
    const failed = channel.hashes(0, 512, 512);
    const next = channel.hashes(0, 512, 512);
    await expect(failed).rejects.toThrow(/Input\/output error/);
    expect((await next).equals(hashes)).toBe(true);
  });

  it('refuses segments outside the requested range', async () => {
    const pair = Buffer.alloc(16);
    pair.writeBigUInt64LE(0n, 0);
    pair.writeBigUInt64LE(1n << 40n, 8);
    const { channel } = await fakeAgent([frame(FrameType.Segments, { length: 1, payload: pair }), frame(FrameType.End)]);
    await expect(channel.segments(0, 4096)).rejects.toThrow(/out of order or range/);
  });

  it('refuses a peer that is not the agent', async () => {
    const output = new PassThrough();
    output.end(Buffer.from('Welcome to the server! Last login: yesterday\n'.padEnd(64, ' ')));
    await expect(AgentChannel.start({ output, input: new PassThrough(), errors: new PassThrough(), where: 'x' })).rejects.toThrow(ProtocolError);
  });
});

describe('journal', () => {
  const meta = { source: 'ssh://root@h/dev/sda', size: 10 * 4096 + 100, chunkSize: 4096 };

  it('replays committed records and forgets what was only staged', async () => {
    const path = join(work.dir, 'a.journal');
    const j = await Journal.create(path, meta);
    expect(j.chunkCount).toBe(11);
    j.stage(3, Buffer.alloc(8, 3));
    j.stage(10, Buffer.alloc(8, 10));
    await j.commit(j.takeStaged());
    j.stage(4, Buffer.alloc(8, 4));
    await j.close();
    const again = (await Journal.load(path))!;
    expect(again.meta).toEqual(meta);
    expect(again.has(3) && again.has(10)).toBe(true);
    expect(again.has(4)).toBe(false);
    expect(again.hash(10).equals(Buffer.alloc(8, 10))).toBe(true);
    expect(again.matches(3, Buffer.alloc(8, 3))).toBe(true);
    await again.close();
  });

  it('drops a torn last record and keeps appending after the good ones', async () => {
    const path = join(work.dir, 'b.journal');
    const j = await Journal.create(path, meta);
    j.stage(1, Buffer.alloc(8, 1));
    j.stage(2, Buffer.alloc(8, 2));
    await j.commit(j.takeStaged());
    await j.close();
    const size = (await stat(path)).size;
    await truncate(path, size - 5); // a crash in the middle of the second record
    const torn = (await Journal.load(path))!;
    expect(torn.has(1)).toBe(true);
    expect(torn.has(2)).toBe(false);
    torn.stage(5, Buffer.alloc(8, 5));
    await torn.commit(torn.takeStaged());
    await torn.close();
    const after = (await Journal.load(path))!;
    expect(after.has(1) && after.has(5)).toBe(true);
    await after.close();
  });

  it('stops at a record whose checksum is wrong', async () => {
    const path = join(work.dir, 'c.journal');
    const j = await Journal.create(path, meta);
    j.stage(1, Buffer.alloc(8, 1));
    await j.commit(j.takeStaged());
    await j.close();
    await appendFile(path, randomBytes(24));
    const loaded = (await Journal.load(path))!;
    expect(loaded.knownCount()).toBe(1);
    await loaded.close();
  });

  it('refuses a file that is not a journal, and reports none when there is none', async () => {
    const path = join(work.dir, 'd.journal');
    await writeFile(path, 'not a journal at all');
    await expect(Journal.load(path)).rejects.toThrow(/not a usable capture journal/);
    expect(await Journal.load(join(work.dir, 'none.journal'))).toBeUndefined();
  });

  it('compacts a long log on load, keeping the latest state', async () => {
    const path = join(work.dir, 'e.journal');
    const j = await Journal.create(path, meta);
    for (let round = 0; round < 200; round++) {
      for (let i = 0; i < 11; i++) j.stage(i, Buffer.alloc(8, round));
      await j.commit(j.takeStaged());
    }
    j.forget(7);
    await j.commit(j.takeStaged());
    await j.close();
    const before = (await stat(path)).size;
    const loaded = (await Journal.load(path))!;
    expect((await stat(path)).size).toBeLessThan(before / 10);
    expect(loaded.has(7)).toBe(false);
    expect(loaded.hash(3).equals(Buffer.alloc(8, 199))).toBe(true);
    await loaded.close();
    const reloaded = (await Journal.load(path))!;
    expect(reloaded.knownCount()).toBe(10);
    await reloaded.close();
  });
});

describe('rate limiter', () => {
  it('lets a second\'s worth through at once and makes the next taker wait', async () => {
    vi.useFakeTimers();
    try {
      const limiter = new RateLimiter(1000);
      await limiter.take(1000);
      let done = false;
      const waiting = limiter.take(500).then(() => (done = true));
      await vi.advanceTimersByTimeAsync(100);
      expect(done).toBe(false);
      await vi.advanceTimersByTimeAsync(1000);
      await waiting;
      expect(done).toBe(true);
    } finally {
      vi.useRealTimers();
    }
  });
});

describe('host keys', () => {
  const blob = (type: string, body: Buffer) => {
    const t = Buffer.from(type);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(t.length);
    return Buffer.concat([len, t, body]);
  };
  const key = blob('ssh-ed25519', randomBytes(36));
  const other = blob('ssh-ed25519', randomBytes(36));
  const rsa = blob('ssh-rsa', randomBytes(64));

  it('computes OpenSSH fingerprints and accepts only pinned ones', () => {
    expect(fingerprint(key)).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    const policy = pinnedHostKeys([fingerprint(key)]);
    expect(policy.check(key)).toBe('trusted');
    expect(policy.check(other)).toBe('changed');
    expect(() => pinnedHostKeys(['MD5:aa:bb'])).toThrow(/SHA256/);
  });

  it('reads known_hosts: ports, hashed names, wildcards, negation, revocation', async () => {
    const salt = randomBytes(20);
    const hashed = `|1|${salt.toString('base64')}|${createHmac('sha1', salt).update('hashed.example').digest('base64')}`;
    const file = join(work.dir, 'known_hosts');
    await writeFile(
      file,
      [
        '# comment',
        `[10.0.0.5]:2222 ssh-ed25519 ${key.toString('base64')}`,
        `${hashed} ssh-ed25519 ${key.toString('base64')}`,
        `*.corp.example,!bad.corp.example ssh-rsa ${rsa.toString('base64')}`,
        `@revoked * ssh-ed25519 ${other.toString('base64')}`,
        `broken ssh-ed25519 ${rsa.toString('base64')}`,
      ].join('\n'),
    );
    expect((await knownHostsPolicy(file, '10.0.0.5', 2222)).check(key)).toBe('trusted');
    expect((await knownHostsPolicy(file, '10.0.0.5', 22)).check(key)).toBe('unknown');
    expect((await knownHostsPolicy(file, 'hashed.example', 22)).check(key)).toBe('trusted');
    expect((await knownHostsPolicy(file, 'hashed.example', 22)).check(rsa)).toBe('changed');
    const corp = await knownHostsPolicy(file, 'db.corp.example', 22);
    expect(corp.check(rsa)).toBe('trusted');
    expect(corp.algorithms).toEqual(['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa']);
    expect((await knownHostsPolicy(file, 'bad.corp.example', 22)).check(rsa)).toBe('unknown');
    expect((await knownHostsPolicy(file, '10.0.0.5', 2222)).check(other)).toBe('revoked');
    // A line whose blob names another type than its field is ignored, not trusted.
    expect((await knownHostsPolicy(file, 'broken', 22)).check(rsa)).toBe('unknown');
    expect((await knownHostsPolicy(join(work.dir, 'missing'), 'x', 22)).check(key)).toBe('unknown');
  });
});

describe('source URLs', () => {
  it('parses users, ports, IPv6 and devices, and refuses passwords', () => {
    expect(parseSshUrl('ssh://admin@db1:2200/dev/sda')).toEqual({ user: 'admin', host: 'db1', port: 2200, device: '/dev/sda' });
    expect(parseSshUrl('ssh://root@[::1]/dev/vda')).toEqual({ user: 'root', host: '::1', port: 22, device: '/dev/vda' });
    expect(parseSshUrl('ssh://root@host').device).toBe('');
    expect(() => parseSshUrl('ssh://root:secret@host/dev/sda')).toThrow(/password-env/);
    expect(() => parseSshUrl('ssh://host/dev/sda')).toThrow(/needs a user/);
    expect(() => parseSshUrl('http://root@host/dev/sda')).toThrow(/ssh:\/\//);
  });
});

describe('partition tables', () => {
  const readFrom = (disk: Buffer) => async (offset: number, length: number) => disk.subarray(offset, offset + length);

  it('reads MBR primaries and logical partitions in an extended one', async () => {
    const disk = Buffer.alloc(64 * 1024 * 1024);
    const entry = (sector: Buffer, i: number, type: number, lba: number, sectors: number) => {
      const e = 446 + 16 * i;
      sector[e + 4] = type;
      sector.writeUInt32LE(lba, e + 8);
      sector.writeUInt32LE(sectors, e + 12);
    };
    entry(disk, 0, 0x83, 2048, 20480);
    entry(disk, 1, 0x05, 40960, 40960);
    disk.writeUInt16LE(0xaa55, 510);
    const ebr = disk.subarray(40960 * 512, 40961 * 512);
    entry(ebr, 0, 0x83, 2048, 8192);
    ebr.writeUInt16LE(0xaa55, 510);
    const table = await readPartitionTable(readFrom(disk), disk.length, 512);
    expect(table.kind).toBe('mbr');
    expect(table.partitions).toEqual([
      { number: 1, start: 2048 * 512, length: 20480 * 512, type: '83' },
      { number: 5, start: (40960 + 2048) * 512, length: 8192 * 512, type: '83' },
    ]);
  });

  it('reads GPT entries and ignores ones past the disk', async () => {
    const disk = Buffer.alloc(8 * 1024 * 1024);
    disk[446 + 4] = 0xee;
    disk.writeUInt32LE(1, 446 + 8);
    disk.writeUInt16LE(0xaa55, 510);
    const h = disk.subarray(512, 1024);
    h.write('EFI PART', 0, 'latin1');
    h.writeBigUInt64LE(2n, 72);
    h.writeUInt32LE(128, 80);
    h.writeUInt32LE(128, 84);
    const e = (i: number, first: number, last: number) => {
      const at = 1024 + i * 128;
      disk.fill(0xab, at, at + 16);
      disk.writeBigUInt64LE(BigInt(first), at + 32);
      disk.writeBigUInt64LE(BigInt(last), at + 40);
    };
    e(0, 2048, 4095);
    e(1, 4096, 1 << 30);
    const table = await readPartitionTable(readFrom(disk), disk.length, 512);
    expect(table.kind).toBe('gpt');
    expect(table.partitions).toHaveLength(1);
    expect(table.partitions[0]).toMatchObject({ number: 1, start: 2048 * 512, length: 2048 * 512 });
  });

  it('sees no table on a boot sector with invalid entries', async () => {
    const disk = randomBytes(1024 * 1024);
    disk.writeUInt16LE(0xaa55, 510);
    disk[446] = 0x42;
    expect((await readPartitionTable(readFrom(disk), disk.length, 512)).kind).toBe('none');
  });
});

describe('machine inventory', () => {
  it('parses the inventory sections into what a target VM needs', async () => {
    const lsblk = JSON.stringify({
      blockdevices: [
        { name: 'zram0', size: 0, type: 'disk', rm: false, ro: false },
        { name: 'loop0', size: 1000, type: 'loop', rm: false, ro: false },
        { name: 'sr0', size: 1000, type: 'rom', rm: true, ro: false },
        {
          name: 'sda', kname: 'sda', path: '/dev/sda', size: 107374182400, type: 'disk', rm: false, ro: false, pttype: 'gpt', ptuuid: 'abcd', model: 'QEMU HARDDISK ',
          children: [{ name: 'sda1', kname: 'sda1', path: '/dev/sda1', size: 536870912, type: 'part', rm: false, ro: false, parttype: 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b', fstype: 'vfat', mountpoint: '/boot/efi' }],
        },
      ],
    });
    const text = [
      '=== ferry:hostname', 'db1', '=== ferry:cpus', '8', '=== ferry:memory', 'MemTotal:       16384000 kB', '=== ferry:firmware', 'uefi',
      '=== ferry:uname', 'x86_64', '6.1.0-18-amd64', '=== ferry:os-release', 'ID=debian', 'VERSION_ID="12"', 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"',
      '=== ferry:lsblk', lsblk, '=== ferry:starts', 'sda1 2048', '=== ferry:nics', 'eth0 52:54:00:AB:CD:EF physical virtio_net', 'br0 52:54:00:ab:cd:01 virtual -', 'dummy0 00:00:00:00:00:00 virtual -',
      '=== ferry:end',
    ].join('\n');
    const m = parseInventory(text);
    expect(m).toMatchObject({ hostname: 'db1', cpus: 8, memoryBytes: 16384000 * 1024, firmware: 'uefi', architecture: 'x86_64', kernel: '6.1.0-18-amd64' });
    expect(m.os).toEqual({ id: 'debian', versionId: '12', prettyName: 'Debian GNU/Linux 12 (bookworm)' });
    expect(m.disks.map((d) => d.name)).toEqual(['sda']);
    expect(m.disks[0]).toMatchObject({ size: 107374182400, model: 'QEMU HARDDISK', partitionTable: { type: 'gpt', uuid: 'abcd' } });
    expect(m.disks[0].partitions[0]).toMatchObject({ name: 'sda1', start: 2048 * 512, fsType: 'vfat', mountpoint: '/boot/efi' });
    expect(m.nics).toEqual([
      { name: 'eth0', mac: '52:54:00:ab:cd:ef', virtual: false, driver: 'virtio_net' },
      { name: 'br0', mac: '52:54:00:ab:cd:01', virtual: true, driver: null },
    ]);
  });
});

describe('agent binary', () => {
  const agentPath = async () => join((await import('./helpers/env.js')).ROOT, 'native', 'build', 'ferry-agent');

  async function localAgent(device: string): Promise<AgentChannel> {
    const child = spawn(await agentPath(), [device]);
    return AgentChannel.start({ output: child.stdout, input: child.stdin, errors: child.stderr, where: 'local agent' });
  }

  it('sends runs of chunks per frame and hashes groups of chunks as Ferry computes them', async () => {
    const chunk = 64 * 1024;
    const hashesOf = (b: Buffer) => Buffer.concat(Array.from({ length: Math.ceil(b.length / chunk) }, (_, i) => xxh(b.subarray(i * chunk, (i + 1) * chunk))));
    // 9.5 chunks: random, zero, compressible text, and a short last chunk.
    const data = Buffer.concat([randomBytes(3 * chunk), Buffer.alloc(chunk), Buffer.alloc(2 * chunk, 'text '), randomBytes(3.5 * chunk)]);
    const file = join(work.dir, 'agent-source.raw');
    const whole = Buffer.concat([randomBytes(MAX_CHUNK), data]);
    await writeFile(file, whole);
    const channel = await localAgent(file);
    try {
      const chunkHashes = hashesOf(data);
      expect((await channel.hashes(MAX_CHUNK, data.length, chunk)).equals(chunkHashes)).toBe(true);
      // Groups of 4: three groups, the last of two chunks (one short), each the run hash of its members.
      const grouped = await channel.hashes(MAX_CHUNK, data.length, chunk, 4);
      expect(grouped.length).toBe(3 * 8);
      for (let g = 0; g < 3; g++) expect(grouped.subarray(g * 8, g * 8 + 8).equals(runHash(chunkHashes.subarray(g * 32, g * 32 + 32)))).toBe(true);

      const runs: Array<{ offset: number; length: number; hashes: Buffer }> = [];
      const back = Buffer.alloc(whole.length);
      await channel.read(0, whole.length, chunk, 1, async (run) => {
        runs.push({ offset: run.offset, length: run.length, hashes: Buffer.from(run.hashes) });
        run.data?.copy(back, run.offset);
      });
      // A full frame of MAX_CHUNK bytes, then the rest: each frame a run of chunks with every chunk's hash.
      expect(runs.map((r) => [r.offset, r.length])).toEqual([[0, MAX_CHUNK], [MAX_CHUNK, data.length]]);
      expect(runs[0].hashes.equals(hashesOf(whole.subarray(0, MAX_CHUNK)))).toBe(true);
      expect(runs[1].hashes.equals(chunkHashes)).toBe(true);
      expect(back.equals(whole)).toBe(true);
    } finally {
      channel.close();
    }
  });

  it('removes the pushed binary it runs from when asked or when it exits, and never anything else', async () => {
    const file = join(work.dir, 'agent-unlink.raw');
    await writeFile(file, randomBytes(4096));
    const pushed = async (name: string) => {
      const dir = join(work.dir, name);
      await mkdir(dir);
      await copyFile(await agentPath(), join(dir, 'ferry-agent'));
      await chmod(join(dir, 'ferry-agent'), 0o700);
      const child = spawn(join(dir, 'ferry-agent'), [file]);
      const channel = await AgentChannel.start({ output: child.stdout, input: child.stdin, errors: child.stderr, where: 'local agent' });
      return { dir, child, channel };
    };
    const asked = await pushed('ferry-agent.asked123');
    try {
      await asked.channel.unlinkSelf();
      expect(existsSync(asked.dir)).toBe(false);
      // The running agent keeps serving from its deleted binary.
      expect((await asked.channel.info()).size).toBe(4096);
    } finally {
      asked.channel.close();
    }
    // A connection lost before Ferry asked: the agent sees its input end and cleans up on the way out.
    const lost = await pushed('ferry-agent.lost4567');
    const exited = new Promise((resolve) => lost.child.once('exit', resolve));
    lost.channel.close();
    await exited;
    expect(existsSync(lost.dir)).toBe(false);
    // Started from anywhere else (here, the build directory): refused, and nothing removed.
    const built = await localAgent(file);
    try {
      await expect(built.unlinkSelf()).rejects.toThrow(/not started from a pushed agent directory/);
      expect(existsSync(await agentPath())).toBe(true);
    } finally {
      built.close();
    }
  });

  it('is statically linked, so it runs on a source without our libraries', async () => {
    const { ROOT } = await import('./helpers/env.js');
    const elf = await readFile(join(ROOT, 'native', 'build', 'ferry-agent'));
    expect(elf.subarray(0, 4).toString('latin1')).toBe('\x7fELF');
    // A dynamically linked executable has a PT_INTERP program header naming its loader (ld-linux).
    const phoff = Number(elf.readBigUInt64LE(0x20));
    const phentsize = elf.readUInt16LE(0x36);
    const types = Array.from({ length: elf.readUInt16LE(0x38) }, (_, i) => elf.readUInt32LE(phoff + i * phentsize));
    expect(types.length).toBeGreaterThan(0);
    expect(types).not.toContain(3);
  });
});
