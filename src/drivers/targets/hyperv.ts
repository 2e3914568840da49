import { NET_CLASS, SCSI_ADAPTER_CLASS, SYSTEM_CLASS, type TargetProfile } from '../profile.js';

/** Hyper-V: VMBus with synthetic storage and network; Windows has these drivers in the box (7/2008 R2 on). */
export const hyperv: TargetProfile = {
  name: 'hyperv',
  description: 'Hyper-V with VMBus synthetic storage (storvsc) and network (netvsc)',
  linux: {
    storage: ['hv_vmbus', 'hv_storvsc', 'sd_mod'],
    network: ['hv_netvsc'],
    nicDriver: 'hv_netvsc',
  },
  linuxAgent: { description: 'Hyper-V KVP/VSS daemons', deb: 'hyperv-daemons', rpm: 'hyperv-daemons' },
  windows: {
    drivers: [
      { service: 'vmbus', role: 'bus', group: 'System Bus Extender', classGuid: SYSTEM_CLASS, hardwareIds: ['ACPI\\VMBus'], source: 'in-box' },
      { service: 'storvsc', role: 'storage', group: 'SCSI miniport', classGuid: SCSI_ADAPTER_CLASS, hardwareIds: ['VMBUS\\{ba6163d9-04a1-4d29-b605-72e2ffb1dc7f}'], source: 'in-box' },
      { service: 'netvsc', role: 'network', group: 'NDIS', classGuid: NET_CLASS, hardwareIds: ['VMBUS\\{f8615163-df3e-46c5-913f-f2d2f965ed0e}'], source: 'in-box' },
    ],
  },
  removeTools: ['vmware', 'virtualbox', 'xen', 'qemu'],
};
