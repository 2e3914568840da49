import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { native, type WriteLane } from '../native.js';

/** Temporary names drawn before create() gives up on finding a free one. */
const TEMP_NAME_ATTEMPTS = 16;

/**
 * A file written under a temporary name beside its destination and renamed into place only when complete,
 * so a failed or cancelled conversion never leaves a partial image under the real name.
 *
 * Writes go through one lane, a native thread of its own (native openWriteLane): buffered writes to one file
 * serialise on the inode lock in the kernel anyway, and parallel writers only spin on it (measured: a fifth of
 * all CPU time), stealing the core that reads the source. The lane writes what is queued back to back, merges
 * writes queued at consecutive positions, and writes each into a range the filesystem allocates just before:
 * cheaper for it than delayed allocation.
 */
export class OutputFile {
  private readonly lane: WriteLane;

  private constructor(
    readonly finalPath: string,
    readonly tempPath: string,
    readonly handle: FileHandle,
  ) {
    this.lane = native.openWriteLane(handle.fd);
  }

  /**
   * The temporary name only has to be free: opening it exclusively (wx) proves it is, and a taken one is
   * retried under another name. So Math.random() serves, and a conversion starts without loading node:crypto.
   */
  static async create(finalPath: string): Promise<OutputFile> {
    for (let attempt = 1; ; attempt++) {
      const tag = Math.floor(Math.random() * 2 ** 32).toString(16).padStart(8, '0');
      const tempPath = join(dirname(finalPath), `.${basename(finalPath)}.ferry-${tag}.tmp`);
      try {
        return new OutputFile(finalPath, tempPath, await open(tempPath, 'wx+', 0o644));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt === TEMP_NAME_ATTEMPTS) throw err;
      }
    }
  }

  get fd(): number {
    return this.handle.fd;
  }

  /** Writes all of `data` at `position`. The caller must not modify `data` until the promise settles. */
  async writeAt(data: Uint8Array, position: number): Promise<void> {
    await native.laneWrite(this.lane, [data], position);
  }

  /** Closes and renames into place. `durable` fsyncs first, for callers that must survive a crash. */
  async commit(durable: boolean): Promise<void> {
    native.closeWriteLane(this.lane);
    if (durable) await this.handle.sync();
    await this.handle.close();
    await rename(this.tempPath, this.finalPath);
  }

  async discard(): Promise<void> {
    native.closeWriteLane(this.lane);
    await this.handle.close().catch(() => undefined);
    await unlink(this.tempPath).catch(() => undefined);
  }
}

/** Reads exactly `length` bytes at `position`; a short read past EOF is reported to `onShort`. */
export async function readFully(handle: FileHandle, into: Uint8Array, intoOffset: number, length: number, position: number): Promise<number> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await handle.read(into, intoOffset + done, length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}
