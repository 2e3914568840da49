import type { Change } from '../types.js';

/**
 * Work that needs the guest running on its new hardware (installing the target's agent from the
 * network, running a foreign tool's own uninstaller) goes to a firstboot service: a systemd unit runs
 * every script in /var/lib/ferry/firstboot.d in order, deletes each one that succeeds, and stops
 * running once the folder is empty. A failed script stays and is retried on the next boot.
 */
export const FIRSTBOOT_DIR = '/var/lib/ferry/firstboot.d';
const RUNNER = '/usr/local/lib/ferry/firstboot.sh';
const UNIT = '/etc/systemd/system/ferry-firstboot.service';

const RUNNER_SCRIPT = `#!/bin/sh
# Written by Ferry: runs the scripts queued in ${FIRSTBOOT_DIR} after a move to new hardware.
for script in ${FIRSTBOOT_DIR}/*.sh; do
  [ -f "$script" ] || continue
  echo "ferry-firstboot: running $script"
  if sh "$script"; then rm -f "$script"; else echo "ferry-firstboot: $script failed; it runs again next boot"; fi
done
exit 0
`;

const UNIT_FILE = `# Written by Ferry
[Unit]
Description=Ferry first-boot tasks after a move to new hardware
Wants=network-online.target
After=network-online.target
ConditionDirectoryNotEmpty=${FIRSTBOOT_DIR}

[Service]
Type=oneshot
ExecStart=${RUNNER}
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
`;

export interface FirstbootTask {
  /** File name in the queue, ordered by its number prefix ("20-install-agent.sh"). */
  name: string;
  script: string;
  reason: string;
}

/** The service (installed once) and one queued script per task. */
export function firstbootChanges(tasks: FirstbootTask[], installed: { runner: string | null; unit: string | null }): Change[] {
  if (!tasks.length) return [];
  const changes: Change[] = [];
  if (installed.runner !== RUNNER_SCRIPT) {
    changes.push({ kind: 'file.write', path: RUNNER, before: installed.runner, after: RUNNER_SCRIPT, mode: 0o755, reason: 'the firstboot runner' });
  }
  if (installed.unit !== UNIT_FILE) {
    changes.push({ kind: 'file.write', path: UNIT, before: installed.unit, after: UNIT_FILE, reason: 'the firstboot service' });
    changes.push({ kind: 'guest.command', command: 'systemctl enable ferry-firstboot.service', reason: 'start the firstboot service at boot' });
  }
  for (const task of tasks) {
    changes.push({ kind: 'file.write', path: `${FIRSTBOOT_DIR}/${task.name}`, before: null, after: `#!/bin/sh\nset -e\n${task.script}\n`, mode: 0o755, reason: task.reason });
  }
  return changes;
}

export const FIRSTBOOT_FILES = { runner: RUNNER, unit: UNIT };

/** A shell snippet installing a package with whichever package manager the guest has. */
export function installPackageScript(packageFormat: string, deb: string | undefined, rpm: string | undefined): string | null {
  if (packageFormat === 'deb' && deb) return `export DEBIAN_FRONTEND=noninteractive\napt-get update\napt-get install -y ${deb}`;
  if (packageFormat === 'rpm' && rpm) {
    return [
      `if command -v dnf >/dev/null; then dnf install -y ${rpm}`,
      `elif command -v yum >/dev/null; then yum install -y ${rpm}`,
      `elif command -v zypper >/dev/null; then zypper --non-interactive install ${rpm}`,
      'else echo "no package manager found" >&2; exit 1; fi',
    ].join('\n');
  }
  return null;
}
