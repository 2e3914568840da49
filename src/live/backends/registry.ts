/**
 * The memory backends, in one place. A backend is one file in this folder with its source (MemoryBackend)
 * and destination (DestinationVm) ends; adding one is that file plus an entry here.
 */
import { QemuSharedFileDestination, QemuSharedFileSource, type QemuDestinationOptions, type QemuSourceOptions } from './qemu-shared-file.js';
import { SyntheticDestination, SyntheticVm, type SyntheticVmOptions } from './synthetic.js';
import type { DestinationVm, MemoryBackend } from '../types.js';

export type SourceSpec = ({ kind: 'qemu-shared-file' } & QemuSourceOptions) | ({ kind: 'synthetic' } & SyntheticVmOptions);
export type DestinationSpec = ({ kind: 'qemu-shared-file' } & QemuDestinationOptions) | { kind: 'synthetic'; ramPath: string };

export const memoryBackends = {
  'qemu-shared-file': {
    description: 'a QEMU VM whose guest RAM is a shared memory-backend-file (share=on); QMP for control',
    openSource: (o: QemuSourceOptions): Promise<MemoryBackend> => QemuSharedFileSource.open(o),
    openDestination: (o: QemuDestinationOptions): Promise<DestinationVm> => QemuSharedFileDestination.open(o),
  },
  synthetic: {
    description: 'a synthetic VM with a working-set model (tests, simulations); destination: a RAM file',
    openSource: async (o: SyntheticVmOptions): Promise<MemoryBackend> => new SyntheticVm(o),
    openDestination: async (o: { ramPath: string }): Promise<DestinationVm> => new SyntheticDestination(o.ramPath),
  },
} as const;

export function openSource(spec: SourceSpec): Promise<MemoryBackend> {
  return spec.kind === 'qemu-shared-file' ? memoryBackends[spec.kind].openSource(spec) : memoryBackends[spec.kind].openSource(spec);
}

export function openDestination(spec: DestinationSpec): Promise<DestinationVm> {
  return spec.kind === 'qemu-shared-file' ? memoryBackends[spec.kind].openDestination(spec) : memoryBackends[spec.kind].openDestination(spec);
}
