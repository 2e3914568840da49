import { InvalidOptionError } from '../../errors.js';
import type { TargetName, TargetProfile } from '../profile.js';
import { aws } from './aws.js';
import { azure } from './azure.js';
import { hyperv } from './hyperv.js';
import { kvm } from './kvm.js';
import { vmware } from './vmware.js';
import { xen } from './xen.js';

/** Every target Ferry can fix guests for — adding one is a file in this folder plus one entry here. */
export const targetProfiles: readonly TargetProfile[] = [kvm, hyperv, vmware, xen, aws, azure];

export function findTarget(name: string): TargetProfile {
  const profile = targetProfiles.find((p) => p.name === name);
  if (!profile) {
    throw new InvalidOptionError(`unknown target '${name}': choose one of ${targetProfiles.map((p) => p.name).join(', ')}`, { field: 'target' });
  }
  return profile;
}

export type { TargetName };
