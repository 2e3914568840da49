import { NET_CLASS, SCSI_ADAPTER_CLASS, type TargetProfile } from '../profile.js';

/** KVM/QEMU (libvirt, Proxmox, OpenStack): virtio disks and NICs, drivers from virtio-win for Windows. */
export const kvm: TargetProfile = {
  name: 'kvm',
  description: 'KVM/QEMU with virtio-blk, virtio-scsi and virtio-net',
  linux: {
    storage: ['virtio_pci', 'virtio_blk', 'virtio_scsi', 'sd_mod'],
    network: ['virtio_net'],
    nicDriver: 'virtio_net',
  },
  linuxAgent: { description: 'QEMU guest agent', deb: 'qemu-guest-agent', rpm: 'qemu-guest-agent' },
  windows: {
    drivers: [
      // Legacy and modern (virtio 1.0) device ids of each device.
      { service: 'viostor', role: 'storage', group: 'SCSI miniport', classGuid: SCSI_ADAPTER_CLASS, hardwareIds: ['PCI\\VEN_1AF4&DEV_1001', 'PCI\\VEN_1AF4&DEV_1042'], source: 'drivers-path' },
      { service: 'vioscsi', role: 'storage', group: 'SCSI miniport', classGuid: SCSI_ADAPTER_CLASS, hardwareIds: ['PCI\\VEN_1AF4&DEV_1004', 'PCI\\VEN_1AF4&DEV_1048'], source: 'drivers-path' },
      { service: 'netkvm', role: 'network', group: 'NDIS', classGuid: NET_CLASS, hardwareIds: ['PCI\\VEN_1AF4&DEV_1000', 'PCI\\VEN_1AF4&DEV_1041'], source: 'drivers-path' },
    ],
    agentInstaller: { description: 'QEMU guest agent', pattern: /^qemu-ga-x86_64\.msi$/i },
  },
  removeTools: ['vmware', 'virtualbox', 'xen', 'hyperv', 'azure'],
};
