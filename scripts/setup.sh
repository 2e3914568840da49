#!/usr/bin/env bash
# npm run setup: the system packages Ferry and its tests need, then npm ci and the build. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian package -> a command (or file) that shows it is installed.
PACKAGES=(
  "qemu-utils:qemu-img"          # the oracle for every disk format, in tests and benchmarks
  "libzstd-dev:/usr/include/zstd.h" # zstd for the native addon
  "zlib1g-dev:/usr/include/zlib.h"  # deflate for the native addon
  "time:/usr/bin/time"           # peak RSS in benchmarks
  "zstd:zstd"                    # the ssh|dd|zstd pipeline capture is benchmarked against
  "redis-server:redis-server"    # BullMQ queues: tests start their own server on a free loopback port
  "openssh-server:/usr/sbin/sshd" # capture tests start their own sshd on a free loopback port
  "openssh-client:ssh-keygen"
  "sudo:sudo"                    # capture tests: an unprivileged login reading the source through sudo
  "lvm2:/usr/sbin/lvm"           # capture tests: LVM snapshots, in a small guest (lvm and sshd copied into its initramfs)
  "kmod:modprobe"                # capture tests: the LVM guest's kernel modules, in dependency order
  "chromium:chromium"            # the dashboard's browser test (driven by playwright-core, no browser download)
  "make:make"
  "g++:g++"
  "python3:python3"              # node-gyp
  "qemu-system-x86:qemu-system-x86_64" # live migration tests and benchmark (TCG guests)
  "busybox-static:/usr/share/doc/busybox-static" # the test guests' userland (/bin/busybox, static)
  "linux-image-amd64:/usr/share/doc/linux-image-amd64" # the test guests' kernel (/boot/vmlinuz-*; a metapackage, so probed by its doc folder)
  "cpio:cpio"                    # the test guests' initramfs
  "gcc:gcc"                      # the test guests' workload (static)
  "libguestfs-tools:guestfish"   # driver injection: one libguestfs appliance per inspect/inject (uses /boot/vmlinuz-*)
  "libhivex-bin:hivexget"        # driver injection: Windows registry hives (tests read them back with hivexget)
  "libwin-hivex-perl:hivexregedit" # driver injection: registry changes merged as .reg files
  "ntfs-3g:ntfscat"              # driver injection tests: synthetic NTFS images (mkntfs), read back with ntfscat
  "debootstrap:debootstrap"      # driver injection tests: the Debian guest fixture
  "grub-pc-bin:/usr/lib/grub/i386-pc/boot.img" # driver injection tests: GRUB for the Debian guest fixture (grub-mkimage)
  "e2fsprogs:mkfs.ext4"          # driver injection tests: the fixture's root filesystem (mkfs.ext4 -d)
  "xfsprogs:mkfs.xfs"            # capture tests: XFS images (mkfs.xfs -p), checked with xfs_db and xfs_repair
  "fdisk:sfdisk"                 # driver injection tests: partition tables on image files
  "initramfs-tools-core:lsinitramfs" # driver injection tests: an independent reader of initramfs images
  "virt-v2v:virt-v2v-in-place"   # driver injection benchmark: the peer Ferry is measured against
  "nbdkit:nbdkit"                # virt-v2v-in-place -i disk reads the disk through nbdkit
  "xorriso:xorriso"              # driver injection: --drivers virtio-win.iso is unpacked without mounting
)

missing=()
for entry in "${PACKAGES[@]}"; do
  pkg="${entry%%:*}"
  probe="${entry#*:}"
  if [[ "$probe" == /* ]]; then [ -e "$probe" ] || missing+=("$pkg")
  else command -v "$probe" >/dev/null 2>&1 || missing+=("$pkg"); fi
done

if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]} with apt-get"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: this is not a Debian/Ubuntu system; install these packages (or your distribution's equivalents) and rerun: ${missing[*]}" >&2
    exit 1
  fi
else
  echo "setup: system packages present"
fi

echo "setup: npm ci"
npm ci --no-audit --no-fund
echo "setup: building the native addon and the TypeScript sources"
npm run build --silent
echo "setup: done. Try: node bin/ferry.js --help"
