#!/usr/bin/env bash
# Install the Debian packages the build, the VM boot and the tests need; a no-op when present.
set -euo pipefail
pkgs=(python3 python3-venv python3-dev gcc make qemu-system-x86 qemu-utils ovmf packer mmdebstrap
      mtools dosfstools e2fsprogs fdisk openssh-client curl
      # the hypervisor connector tests (tests/hypervisors): a private libvirtd with SASL over
      # TCP, libvirt-python compiled into the virtualenv, and the vSphere simulator built
      # offline from Debian's Go sources (tools/vcsim/build.sh)
      libvirt-daemon-system libvirt-dev pkg-config sasl2-bin libsasl2-modules
      golang-go golang-github-vmware-govmomi-dev
      # libvirt backups (appliance/hypervisors/libvirtbackup.py): libnbd's Python bindings read
      # the pull-mode backup's NBD exports (linked into the venv by the Makefile's venv
      # recipe); nbdcopy (libnbd-bin) is what the backup's throughput is measured against
      python3-libnbd libnbd-bin
      # the object-store tests (tests/objectstore, tools/cephrgw.py): a one-node Ceph cluster
      # (monitor, one memstore OSD, RADOS Gateway) is the real S3-compatible store the vaults'
      # S3 backend is tested against; no manager daemon is needed, and nothing here starts
      # by itself
      radosgw ceph-mon ceph-osd ceph-common
      # the web console's browser tests (tests/webconsole): headless Chromium and its
      # WebDriver, driven by selenium from the virtualenv
      chromium chromium-driver)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
