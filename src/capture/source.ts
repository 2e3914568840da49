/**
 * The role a capture source plays: a disk on another machine that Ferry can read, hash and freeze range by
 * range. Sources differ in how they reach the agent (SSH today; a local file or an installed agent fit the
 * same interface); CaptureSession only talks to this.
 */
/** A run of consecutive chunks as received: the unit a read delivers (one DATA frame). */
export interface ReceivedRun {
  offset: number;
  length: number;
  /** The hash of each chunk's bytes at the source (8 bytes per chunk), already checked against `data`. */
  hashes: Buffer;
  /** The run's bytes, valid only until the callback's promise settles; undefined when all zero. */
  data: Buffer | undefined;
}

export interface SourceCounters {
  /** Source bytes the agent read for data and hashes. */
  bytesRead: number;
  /** Bytes received from the network connection (compressed data, hashes, protocol and SSH overhead). */
  bytesOnWire: number;
}

export interface BlockSource {
  /** For messages: ssh://user@host:port/dev/sda. Never contains a secret. */
  readonly description: string;
  readonly size: number;
  readonly sectorSize: number;
  readonly blockDevice: boolean;
  /** How many requests it serves at once; callers keep this many (or twice as many, to pipeline) in flight. */
  readonly parallelism: number;
  readonly counters: SourceCounters;
  /**
   * Reads [offset, offset+length) in runs of whole `chunkSize` chunks, in order. `onRun` is awaited before the
   * next run is taken, so a slow consumer slows the transfer instead of filling memory.
   */
  read(offset: number, length: number, chunkSize: number, onRun: (run: ReceivedRun) => Promise<void>): Promise<void>;
  /**
   * Hashes of the `chunkSize` chunks of [offset, offset+length), 8 bytes each: one per chunk, or with `group`
   * above 1 the run hash (chunk-codec runHash) of each `group` consecutive chunks, the last group possibly shorter.
   */
  hashes(offset: number, length: number, chunkSize: number, group?: number): Promise<Buffer>;
  /** Ranges that hold data; a block device reports its whole extent, a sparse file only where it stores data. */
  allocated(offset: number, length: number): Promise<Array<[number, number]>>;
  /** Small reads for partition tables and filesystem metadata. */
  readBytes(offset: number, length: number): Promise<Buffer>;
  /** Mount points of filesystems on this device (or its partitions), for the final frozen pass. */
  mountPoints(): Promise<string[]>;
  /**
   * Freezes the mount points until `thaw`. The source thaws by itself after `timeoutMs`, or when Ferry or
   * the connection goes away.
   */
  freeze(mountPoints: string[], timeoutMs: number): Promise<void>;
  /** Resolves with whether the freeze held until now (false: the source's watchdog thawed it earlier). */
  thaw(): Promise<{ heldUntilThaw: boolean }>;
  close(): Promise<void>;
}
