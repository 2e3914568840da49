import { NET_CLASS, SCSI_ADAPTER_CLASS, type TargetProfile } from '../profile.js';

/** VMware ESXi/Workstation: paravirtual SCSI and vmxnet3; Windows drivers from a VMware Tools driver folder. */
export const vmware: TargetProfile = {
  name: 'vmware',
  description: 'VMware with PVSCSI storage and vmxnet3 network',
  linux: {
    storage: ['vmw_pvscsi', 'mptspi', 'sd_mod'],
    network: ['vmxnet3'],
    nicDriver: 'vmxnet3',
  },
  linuxAgent: { description: 'open-vm-tools', deb: 'open-vm-tools', rpm: 'open-vm-tools' },
  windows: {
    drivers: [
      { service: 'pvscsi', role: 'storage', group: 'SCSI miniport', classGuid: SCSI_ADAPTER_CLASS, hardwareIds: ['PCI\\VEN_15AD&DEV_07C0'], source: 'drivers-path' },
      { service: 'vmxnet3ndis6', file: 'vmxnet3.sys', role: 'network', group: 'NDIS', classGuid: NET_CLASS, hardwareIds: ['PCI\\VEN_15AD&DEV_07B0'], source: 'drivers-path' },
    ],
  },
  removeTools: ['virtualbox', 'xen', 'hyperv', 'qemu', 'azure'],
};
