import { NET_CLASS, SCSI_ADAPTER_CLASS, type TargetProfile } from '../profile.js';

/** AWS EC2 Nitro: NVMe EBS volumes and the Elastic Network Adapter. */
export const aws: TargetProfile = {
  name: 'aws',
  description: 'AWS EC2 (Nitro) with NVMe storage and the ENA network adapter',
  linux: {
    storage: ['nvme', 'nvme_core'],
    network: ['ena'],
    nicDriver: 'ena',
  },
  windows: {
    drivers: [
      // stornvme ships with Windows 8.1/2012 R2 and later; the ENA driver comes from AWS's package.
      { service: 'stornvme', role: 'storage', group: 'SCSI miniport', classGuid: SCSI_ADAPTER_CLASS, hardwareIds: ['PCI\\CC_010802'], source: 'in-box' },
      { service: 'ena', role: 'network', group: 'NDIS', classGuid: NET_CLASS, hardwareIds: ['PCI\\VEN_1D0F&DEV_EC20', 'PCI\\VEN_1D0F&DEV_EC21'], source: 'drivers-path' },
    ],
  },
  removeTools: ['vmware', 'virtualbox', 'xen', 'hyperv', 'qemu', 'azure'],
};
