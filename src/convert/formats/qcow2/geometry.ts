import { InvalidOptionError } from '../../../errors.js';
import { MAX_L1_BYTES, MAX_REFTABLE_BYTES } from './layout.js';

/** Where the fixed tables of a new image go and how many host clusters it can ever need. */
export interface Qcow2Geometry {
  /** Guest bytes one L2 table maps. */
  l2Coverage: number;
  l1Entries: number;
  l1Offset: number;
  reftableOffset: number;
  reftableClusters: number;
  /** Clusters taken by header, refcount table and L1 before any data. */
  firstFreeCluster: number;
  /** Upper bound on host clusters, all data stored uncompressed, with metadata. */
  maxClusters: number;
}

export function planLayout(virtualSize: number, clusterSize: number, refcountBits: number, extendedL2: boolean): Qcow2Geometry {
  const entriesPerL2 = clusterSize / (extendedL2 ? 16 : 8);
  const l2Coverage = entriesPerL2 * clusterSize;
  const dataClusters = Math.ceil(virtualSize / clusterSize);
  const l1Entries = Math.ceil(virtualSize / l2Coverage);
  if (l1Entries * 8 > MAX_L1_BYTES) {
    throw new InvalidOptionError(`virtual size ${virtualSize} needs an L1 table over 32 MiB: use a larger cluster_size`, { field: 'cluster_size' });
  }
  const l1Clusters = Math.max(1, Math.ceil((l1Entries * 8) / clusterSize));
  // One spare cluster for the partly filled area of packed compressed clusters.
  const payload = 1 + l1Clusters + l1Entries + dataClusters + 1;
  const { blocks, table } = refcountMetadata(payload, clusterSize, refcountBits);
  if (table * clusterSize > MAX_REFTABLE_BYTES) {
    throw new InvalidOptionError(`virtual size ${virtualSize} needs a refcount table over 8 MiB: use a larger cluster_size`, { field: 'cluster_size' });
  }
  return {
    l2Coverage,
    l1Entries,
    reftableOffset: clusterSize,
    reftableClusters: table,
    l1Offset: (1 + table) * clusterSize,
    firstFreeCluster: 1 + table + l1Clusters,
    maxClusters: payload + blocks + table,
  };
}

/** Refcount blocks and table clusters needed to count `clusters` clusters plus themselves (QEMU's fixpoint). */
export function refcountMetadata(clusters: number, clusterSize: number, refcountBits: number): { blocks: number; table: number } {
  const perBlock = (clusterSize * 8) / refcountBits;
  const perTableCluster = clusterSize / 8;
  let blocks = 0;
  let table = 0;
  let total = 0;
  for (;;) {
    const last = total;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    total = clusters + blocks + table;
    if (total === last) return { blocks, table };
  }
}

/** Size of a fully allocated image, computed exactly as qemu-img measure does (qcow2_calc_prealloc_size). */
export function fullyAllocatedSize(virtualSize: number, clusterSize: number, refcountBits: number, extendedL2: boolean): number {
  const entryBytes = extendedL2 ? 16 : 8;
  const aligned = Math.ceil(virtualSize / clusterSize) * clusterSize;
  let meta = clusterSize;
  const l2Entries = roundUp(aligned / clusterSize, clusterSize / entryBytes);
  meta += l2Entries * entryBytes;
  const l1Entries = roundUp((l2Entries * entryBytes) / clusterSize, clusterSize / 8);
  meta += l1Entries * 8;
  const { blocks, table } = refcountMetadata((meta + aligned) / clusterSize, clusterSize, refcountBits);
  meta += (blocks + table) * clusterSize;
  return meta + aligned;
}

function roundUp(value: number, multiple: number): number {
  return Math.ceil(value / multiple) * multiple;
}
