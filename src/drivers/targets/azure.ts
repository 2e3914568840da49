import type { TargetProfile } from '../profile.js';
import { hyperv } from './hyperv.js';

/** Azure runs Hyper-V: the same drivers, plus its guest agent and a fixed, 1 MiB-aligned VHD. */
export const azure: TargetProfile = {
  name: 'azure',
  description: 'Azure (Hyper-V drivers, Azure guest agent, fixed 1 MiB-aligned VHD)',
  linux: hyperv.linux,
  linuxAgent: { description: 'Azure Linux agent', deb: 'walinuxagent', rpm: 'WALinuxAgent' },
  windows: {
    drivers: hyperv.windows.drivers,
    agentInstaller: { description: 'Azure VM agent', pattern: /^WindowsAzureVmAgent.*\.msi$/i },
  },
  removeTools: ['vmware', 'virtualbox', 'xen', 'qemu'],
  output: {
    format: 'vhd',
    options: { subformat: 'fixed' },
    sizeAlignment: 1024 * 1024,
    note: 'Azure accepts only fixed VHDs whose virtual size is a whole number of MiB',
  },
};
