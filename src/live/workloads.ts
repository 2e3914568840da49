/**
 * Working-set models for the synthetic VM: which pages a guest writes, and how fast. A model is a list of
 * regions of guest RAM (fractions of it), each written at a steady rate by Poisson page writes spread
 * uniformly over the region — Clark et al.'s writable working set: a hot region rewritten constantly over
 * a colder, slowly changing rest.
 */

export interface WriteRegion {
  /** Start and end of the region as fractions of RAM, 0 ≤ from < to ≤ 1. */
  from: number;
  to: number;
  /** Bytes written per second into the region (page writes × page size). */
  bytesPerSecond: number;
}

export interface WorkingSetModel {
  readonly name: string;
  readonly regions: readonly WriteRegion[];
}

/**
 * Calls mark(page) once for every page of RAM written at least once during `seconds` of guest run time.
 * Each page of a region is hit with probability 1 - exp(-writes per page); the hits are drawn with
 * geometric skips, so the cost is the number of pages hit, not the region size.
 */
export function writePages(model: WorkingSetModel, seconds: number, pageCount: number, pageSize: number, random: () => number, mark: (page: number) => void): void {
  if (seconds <= 0) return;
  for (const r of model.regions) {
    const first = Math.floor(r.from * pageCount);
    const size = Math.floor(r.to * pageCount) - first;
    if (size <= 0 || r.bytesPerSecond <= 0) continue;
    const writesPerPage = (r.bytesPerSecond / pageSize) * seconds / size;
    const p = 1 - Math.exp(-writesPerPage);
    if (p >= 1 - 1e-12) {
      for (let i = 0; i < size; i++) mark(first + i);
      continue;
    }
    const logMiss = Math.log1p(-p);
    for (let i = -1; ; ) {
      i += 1 + Math.floor(Math.log(1 - random()) / logMiss);
      if (i >= size) break;
      mark(first + i);
    }
  }
}

const MiB = 1024 * 1024;

export function uniformModel(bytesPerSecond: number): WorkingSetModel {
  return { name: `uniform ${formatRate(bytesPerSecond)}`, regions: [{ from: 0, to: 1, bytesPerSecond }] };
}

/** A hot set (a fraction of RAM at the start) written at hotBytesPerSecond, the rest at coldBytesPerSecond. */
export function hotSetModel(hotFraction: number, hotBytesPerSecond: number, coldBytesPerSecond = 0): WorkingSetModel {
  return {
    name: `hot set ${(hotFraction * 100).toFixed(0)}% at ${formatRate(hotBytesPerSecond)}${coldBytesPerSecond ? ` + rest at ${formatRate(coldBytesPerSecond)}` : ''}`,
    regions: [
      { from: 0, to: hotFraction, bytesPerSecond: hotBytesPerSecond },
      ...(coldBytesPerSecond > 0 ? [{ from: hotFraction, to: 1, bytesPerSecond: coldBytesPerSecond }] : []),
    ],
  };
}

/**
 * Workloads shaped after those Clark et al. migrated (NSDI 2005, §6): a web server (SPECweb99: a modest
 * hot set over a slowly written page cache), a game server (Quake 3: a small hot set rewritten fast) and
 * MMuncher (their diabolical case: writes all over memory faster than the link). The rates are parameters
 * chosen to have those shapes, not measurements from the paper.
 */
export const CLARK_WORKLOADS: Record<string, WorkingSetModel> = {
  specweb: { name: 'web server (SPECweb-like)', regions: [{ from: 0, to: 0.1, bytesPerSecond: 60 * MiB }, { from: 0.1, to: 1, bytesPerSecond: 8 * MiB }] },
  quake3: { name: 'game server (Quake 3-like)', regions: [{ from: 0, to: 0.02, bytesPerSecond: 40 * MiB }] },
  mmuncher: { name: 'MMuncher (dirties all memory)', regions: [{ from: 0, to: 1, bytesPerSecond: 1024 * MiB }] },
};

/** Parses a model name: "uniform:RATE_MIB", "hotset:FRACTION:HOT_MIB[:COLD_MIB]" or a Clark workload name. */
export function parseWorkload(text: string): WorkingSetModel {
  const [kind, ...args] = text.split(':');
  const n = args.map(Number);
  if (kind === 'uniform' && n.length === 1 && n[0] >= 0) return uniformModel(n[0] * MiB);
  if (kind === 'hotset' && (n.length === 2 || n.length === 3) && n[0] > 0 && n[0] <= 1) return hotSetModel(n[0], n[1] * MiB, (n[2] ?? 0) * MiB);
  const clark = CLARK_WORKLOADS[text];
  if (clark) return clark;
  throw new Error(`unknown workload '${text}': use uniform:MIB_S, hotset:FRACTION:HOT_MIB_S[:COLD_MIB_S] or ${Object.keys(CLARK_WORKLOADS).join(', ')}`);
}

function formatRate(bytesPerSecond: number): string {
  return `${(bytesPerSecond / MiB).toFixed(0)} MiB/s`;
}
