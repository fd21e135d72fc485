#!/usr/bin/env bash
# Make the base disk Packer boots: Debian bookworm (+ bookworm-security) from mmdebstrap, one
# msdos-partitioned disk that boots under BIOS (GRUB in the post-MBR gap) and UEFI (GRUB as
# EFI/BOOT/BOOTX64.EFI on an ESP), both reading the same grub.cfg on the root filesystem.
#
# Why no loop devices: the kernel on build machines may not parse partition tables, and
# `mkfs.ext4 -d` + `dd` at offsets works everywhere root (or fakeroot) can write a file.
#
# usage: make-base-disk.sh WORKDIR SSH_PUBKEY_FILE|- OUT.raw
#   WORKDIR keeps a cached rootfs tarball, keyed by the package list, mirrors and the day,
#   so repeated builds on one day skip the 45-60 s download.
# env (the bare-Debian baseline of tools/bootbench.py, tools/image/baseline/, sets them; the
# appliance uses the defaults): PACKAGES_FILE, DPKG_EXCLUDES, KERNEL_CMDLINE (after root=),
# CUSTOMIZE_HOOK (an executable run with the rootfs folder before the disk is made).
# SSH_PUBKEY_FILE "-": no build key, no host keys (an image Packer never logs into).
set -euo pipefail

workdir=$1 pubkey=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
disk_mib=${DISK_MIB:-4096}
esp_mib=64
packages_file=${PACKAGES_FILE:-$here/packages.txt}
dpkg_excludes=${DPKG_EXCLUDES:-$here/dpkg-excludes.txt}
# The appliance's kernel command line (docs/image.md, "Boot"). The serial console comes last,
# so it is /dev/console and systemd's one line per unit (show_status, unit names) goes there.
# tsc=reliable: under QEMU's TCG the kernel finds the vCPUs' TSCs "unsynchronized" and falls
# back to the HPET, whose every read is an emulated MMIO access the vDSO cannot do, so each
# clock_gettime() of systemd and Python becomes a syscall plus an exit. TCG's TSC is one
# host counter for all vCPUs; vSphere marks its TSC reliable itself, and KVM guests use
# kvm-clock (rated above the TSC) either way.
cmdline=${KERNEL_CMDLINE:-ro net.ifnames=0 console=tty0 console=ttyS0,115200n8 quiet tsc=reliable systemd.show_status=1 systemd.status_unit_format=name}

mkdir -p "$workdir"
packages=$(grep -v '^\s*#' "$packages_file" | grep -v '^\s*$' | paste -sd, -)
key=$(printf '%s\n' "$packages" "$(cat "$dpkg_excludes")" "$mirror" "$security" "$(date -u +%F)" | sha256sum | cut -c1-16)
tarball="$workdir/rootfs-$key.tar"

if [ ! -s "$tarball" ]; then
    rm -rf "$workdir"/rootfs-*.tar
    echo "==> mmdebstrap: bookworm + bookworm-security ($(tr ',' '\n' <<<"$packages" | wc -l) packages)"
    t0=$(date +%s)
    mmdebstrap --mode=root --variant=minbase --quiet \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt="$dpkg_excludes" \
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
chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
if [ -e "$root/lib/systemd/system/systemd-resolved.service" ]; then   # not in the baseline
    ln -sf /run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
    chroot "$root" systemctl enable systemd-resolved.service >/dev/null 2>&1
fi
# The build-only SSH key: Packer's way in, removed with sshd by the last provisioner.
if [ "$pubkey" != - ]; then
    install -d -m 0700 "$root/root/.ssh"
    install -m 0600 "$pubkey" "$root/root/.ssh/authorized_keys"
    chroot "$root" ssh-keygen -A >/dev/null   # host keys for the build VM only (purged later)
fi
: >"$root/etc/machine-id"

# --- boot: what starts (docs/image.md, "Boot") ---------------------------------------------
# Under TCG every process costs CPU the daemon's start competes for; these units do nothing an
# appliance needs: e2scrub (LVM snapshots: the root is plain ext4), pstore archiving, the
# generator of network units from `ip=` on the kernel command line, the debug, tracing,
# hugepage, fuse and configfs mounts, and the modprobe@ units for modules the image leaves out
# (dpkg-excludes.txt: drm, fuse, loop, dm_mod, efi_pstore) or never uses (configfs).
if [ "${APPLIANCE_BOOT_TUNING:-1}" = 1 ]; then
    chroot "$root" systemctl mask --quiet e2scrub_reap.service e2scrub_all.timer \
        systemd-pstore.service systemd-network-generator.service \
        sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount \
        sys-fs-fuse-connections.mount sys-kernel-config.mount \
        modprobe@drm.service modprobe@fuse.service modprobe@loop.service \
        modprobe@dm_mod.service modprobe@efi_pstore.service modprobe@configfs.service
    # Generators systemd runs (one process each, before it loads any unit) for what the image
    # has none of: encrypted, verity and integrity volumes, GPT auto-discovery (the disk is
    # msdos), hibernation, /etc/rc.local, systemd.run= and SysV scripts (each of the image's
    # /etc/init.d scripts has a native unit), offline updates (system-update.target: the
    # appliance's updates are its own, docs/updates.md). Kept: fstab, getty, debug-shell.
    mkdir -p "$root/etc/systemd/system-generators"
    for gen in cryptsetup veritysetup integritysetup gpt-auto hibernate-resume rc-local run \
               sysv system-update; do
        ln -sf /dev/null "$root/etc/systemd/system-generators/systemd-$gen-generator"
    done
fi
# The initramfs with the image's own settings (tools/image/overlay/etc/initramfs-tools: only
# the root disk's drivers, loaded by udev, zstd), made here at the build machine's speed: the
# base disk then boots Packer's VM with it, and mkinitramfs costs about 1 min under TCG.
# Cached beside the rootfs tarball, keyed by it and by those settings (5-30 s to make).
if [ "${APPLIANCE_BOOT_TUNING:-1}" = 1 ]; then
    cp -r "$here/overlay/etc/initramfs-tools/." "$root/etc/initramfs-tools/"
    install -D -m 0755 "$here/overlay/usr/lib/appliance-image/coldplug" \
        "$root/usr/lib/appliance-image/coldplug"   # hooks/appliance-coldplug copies it in
    kver=$(ls "$root/lib/modules")
    ikey=$( (echo "$key"; cd "$here/overlay" && find etc/initramfs-tools -type f | sort |
             xargs sha256sum usr/lib/appliance-image/coldplug) | sha256sum | cut -c1-16)
    initrd="$workdir/initrd-$ikey.img"
    if [ -s "$initrd" ]; then
        cp "$initrd" "$root/boot/initrd.img-$kver"
    else
        rm -f "$workdir"/initrd-*.img
        chroot "$root" update-initramfs -u -k "$kver" >/dev/null
        cp "$root/boot/initrd.img-$kver" "$initrd.partial" && mv "$initrd.partial" "$initrd"
    fi
fi
[ -z "${CUSTOMIZE_HOOK:-}" ] || "$CUSTOMIZE_HOOK" "$root"

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
    echo "Loading the kernel..."
    linux /vmlinuz root=LABEL=root @CMDLINE@
    echo "Loading the initial ramdisk..."
    initrd /initrd.img
    echo "Starting the kernel..."
}
EOF
sed -i "s|@CMDLINE@|$cmdline|" "$root/boot/grub/grub.cfg"
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
