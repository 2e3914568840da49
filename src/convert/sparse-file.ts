import { native } from '../native.js';

/** SEEK_DATA/SEEK_HOLE pairs asked for per native call. */
const SEGMENT_BATCH = 4096;

export interface FileRun {
  start: number;
  end: number;
  /** false: a hole, which reads as zeroes. */
  data: boolean;
}

/**
 * The data and hole runs of the file range [start, end), in order and covering it exactly, found with
 * SEEK_DATA/SEEK_HOLE rather than by reading: how every format whose data sits plainly in a file (raw,
 * fixed VHD, static VDI, flat VMDK extents) reports its allocation.
 */
export function* fileRuns(fd: number, start: number, end: number): Iterable<FileRun> {
  let pos = start;
  while (pos < end) {
    const seg = native.dataSegments(fd, pos, end, SEGMENT_BATCH);
    const resumeAt = seg[seg.length - 1];
    for (let i = 0; i + 1 < seg.length; i += 2) {
      if (seg[i] > pos) yield { start: pos, end: seg[i], data: false };
      yield { start: seg[i], end: seg[i + 1], data: true };
      pos = seg[i + 1];
    }
    if (resumeAt >= end && pos < end) {
      yield { start: pos, end, data: false };
      pos = end;
    }
    pos = Math.max(pos, resumeAt);
  }
}
