#!/usr/bin/env bash
# Build the bare-Debian baseline disk that tools/bootbench.py boots beside the appliance:
# the same boot-disk recipe (tools/image/make-base-disk.sh: msdos label, GRUB for BIOS and
# UEFI with timeout 0, ext4 root), Debian's packages in packages.txt, Debian's defaults for
# everything else, and an HTTP server on port 80 (customize.sh). No Packer step: nothing is
# installed after the first boot, so the image boots as mmdebstrap left it.
#
# usage: tools/image/baseline/build.sh WORKDIR OUT.raw   (as root; about 1-2 min)
set -euo pipefail
workdir=${1:?usage: build.sh WORKDIR OUT.raw} out=${2:?usage: build.sh WORKDIR OUT.raw}
here=$(cd "$(dirname "$0")" && pwd)
PACKAGES_FILE=$here/packages.txt DPKG_EXCLUDES=$here/dpkg-excludes.txt \
    CUSTOMIZE_HOOK=$here/customize.sh APPLIANCE_BOOT_TUNING=0 DISK_MIB=4096 \
    KERNEL_CMDLINE="ro net.ifnames=0 console=tty0 console=ttyS0,115200n8 quiet" \
    "$here/../make-base-disk.sh" "$workdir" - "$out"
