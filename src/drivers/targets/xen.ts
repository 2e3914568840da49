import { NET_CLASS, SCSI_ADAPTER_CLASS, SYSTEM_CLASS, type TargetProfile } from '../profile.js';

/** Xen (XCP-ng, Citrix Hypervisor): PV block and network front ends; Windows PV drivers from a folder. */
export const xen: TargetProfile = {
  name: 'xen',
  description: 'Xen with PV block (xen-blkfront) and network (xen-netfront) front ends',
  linux: {
    storage: ['xen_blkfront'],
    network: ['xen_netfront'],
    nicDriver: 'vif',
  },
  windows: {
    drivers: [
      { service: 'xenbus', role: 'bus', group: 'System Bus Extender', classGuid: SYSTEM_CLASS, hardwareIds: ['PCI\\VEN_5853&DEV_0001', 'PCI\\VEN_5853&DEV_0002'], source: 'drivers-path' },
      { service: 'xenvbd', role: 'storage', group: 'SCSI miniport', classGuid: SCSI_ADAPTER_CLASS, hardwareIds: ['XENBUS\\VEN_XS0001&DEV_VBD'], source: 'drivers-path' },
      { service: 'xennet', role: 'network', group: 'NDIS', classGuid: NET_CLASS, hardwareIds: ['XENVIF\\VEN_XS0001&DEV_NET'], source: 'drivers-path' },
    ],
  },
  removeTools: ['vmware', 'virtualbox', 'hyperv', 'qemu', 'azure'],
};
