#!/usr/bin/env bash
# Make the base disk Packer boots: Debian bookworm (+ bookworm-security) from mmdebstrap, one
# msdos-partitioned disk that boots under BIOS (GRUB in the post-MBR gap) and UEFI (GRUB as
# EFI/BOOT/BOOTX64.EFI on an ESP), both reading the same grub.cfg on the root filesystem.
#
# Why no loop devices: the kernel on build machines may not parse partition tables, and
# `mkfs.ext4 -d` + `dd` at offsets works everywhere root (or fakeroot) can write a file.
#
# usage: make-base-disk.sh WORKDIR SSH_PUBKEY_FILE OUT.raw
#   WORKDIR keeps a cached rootfs tarball, keyed by the package list, mirrors and the day,
#   so repeated builds on one day skip the 45-60 s download.
set -euo pipefail

workdir=$1 pubkey=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
disk_mib=${DISK_MIB:-4096}
esp_mib=64

mkdir -p "$workdir"
packages=$(grep -v '^\s*#' "$here/packages.txt" | grep -v '^\s*$' | paste -sd, -)
key=$(printf '%s\n' "$packages" "$(cat "$here/dpkg-excludes.txt")" "$mirror" "$security" "$(date -u +%F)" | sha256sum | cut -c1-16)
tarball="$workdir/rootfs-$key.tar"

if [ ! -s "$tarball" ]; then
    rm -rf "$workdir"/rootfs-*.tar
    echo "==> mmdebstrap: bookworm + bookworm-security ($(tr ',' '\n' <<<"$packages" | wc -l) packages)"
    t0=$(date +%s)
    mmdebstrap --mode=root --variant=minbase --quiet \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt="$here/dpkg-excludes.txt" \
        --include="$packages" \
        --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
        bookworm "$tarball.partial.tar" \
        "deb $mirror bookworm main" \
        "deb $security bookworm-security main"
    mv "$tarball.partial.tar" "$tarball"
    echo "==> rootfs tarball $(du -m "$tarball" | cut -f1) MiB in $(( $(date +%s) - t0 )) s"
fi

root="$workdir/rootfs"
rm -rf "$root"
mkdir -p "$root"
tar --numeric-owner --xattrs --xattrs-include='*' -xpf "$tarball" -C "$root"

# --- the OS configuration Packer's build VM needs before any provisioner runs ---------------
echo backup-gateway >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tbackup-gateway\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
    >"$root/etc/hosts"
printf 'LABEL=root\t/\text4\terrors=remount-ro\t0\t1\n' >"$root/etc/fstab"
echo 'LANG=C.UTF-8' >"$root/etc/default/locale"
install -m 0644 "$repo"/systemd/network/*.network "$root/etc/systemd/network/"
ln -sf /run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
for unit in systemd-networkd.service systemd-resolved.service; do
    chroot "$root" systemctl enable "$unit" >/dev/null 2>&1
done
# The build-only SSH key: Packer's way in, removed with sshd by the last provisioner.
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$pubkey" "$root/root/.ssh/authorized_keys"
chroot "$root" ssh-keygen -A >/dev/null   # host keys for the build VM only (purged later)
: >"$root/etc/machine-id"

# --- boot loader: one grub.cfg for both firmwares ------------------------------------------
mkdir -p "$root/boot/grub"
cat >"$root/boot/grub/grub.cfg" <<'EOF'
# Written by tools/image/make-base-disk.sh; used by BIOS and UEFI GRUB alike.
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=0
search --no-floppy --label --set=root root
menuentry "Backup gateway appliance" {
    linux /vmlinuz root=LABEL=root ro net.ifnames=0 console=tty0 console=ttyS0,115200n8 quiet
    initrd /initrd.img
}
EOF
test -e "$root/vmlinuz" && test -e "$root/initrd.img" || { echo "no /vmlinuz or /initrd.img in rootfs" >&2; exit 1; }
mods_common="part_msdos ext2 search search_label search_fs_uuid normal linux echo serial terminal test"
chroot "$root" grub-mkimage -O i386-pc -o /tmp/core.img -p '(hd0,msdos2)/boot/grub' \
    biosdisk $mods_common
chroot "$root" grub-mkimage -O x86_64-efi -o /tmp/bootx64.efi -p '(hd0,msdos2)/boot/grub' \
    fat efi_gop efi_uga all_video $mods_common
mv "$root/tmp/core.img" "$root/tmp/bootx64.efi" "$workdir/"

# --- the disk: msdos label, ESP (p1), root (p2) ---------------------------------------------
rm -f "$out"
truncate -s "${disk_mib}M" "$out"
esp_start=2048
esp_sectors=$((esp_mib * 2048))
root_start=$((esp_start + esp_sectors))
sfdisk --quiet "$out" <<EOF
label: dos
start=$esp_start, size=$esp_sectors, type=ef
start=$root_start, type=83, bootable
EOF
root_sectors=$(sfdisk -J "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["partitiontable"]["partitions"][1]["size"])')

mkfs.ext4 -q -F -L root -E offset=$((root_start * 512)) -d "$root" "$out" "$((root_sectors / 2))k"

esp="$workdir/esp.img"
rm -f "$esp"
mkfs.vfat -n ESP -C "$esp" $((esp_mib * 1024)) >/dev/null
mmd -i "$esp" ::/EFI ::/EFI/BOOT
mcopy -i "$esp" "$workdir/bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
dd if="$esp" of="$out" bs=512 seek=$esp_start conv=notrunc status=none

# BIOS: boot.img's code (first 440 bytes, the partition table stays) + core.img from sector 1.
core_sectors=$(( ($(stat -c %s "$workdir/core.img") + 511) / 512 ))
[ "$core_sectors" -lt "$esp_start" ] || { echo "core.img too big for the MBR gap" >&2; exit 1; }
dd if="$root/usr/lib/grub/i386-pc/boot.img" of="$out" bs=440 count=1 conv=notrunc status=none
dd if="$workdir/core.img" of="$out" bs=512 seek=1 conv=notrunc status=none

rm -rf "$root" "$esp"
echo "==> base disk $out: ${disk_mib} MiB virtual, $(du -m "$out" | cut -f1) MiB allocated"
