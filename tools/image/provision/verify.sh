#!/bin/bash
# Runs inside Packer's build VM: the image is only kept when the appliance runs in it.
set -euo pipefail
fail() { echo "VERIFY FAILED: $*" >&2; exit 1; }

python3 -c 'import appliance, gatewaycore, aiohttp, prompt_toolkit, netifaces, cryptography, psutil, ntplib, libvirt, pyVmomi' \
    || fail "the appliance or one of its Debian packages does not import"

echo "--- systemd-analyze security appliance.service"
report=$(systemd-analyze security --no-pager appliance.service)
echo "$report" | grep -v '✓' || true
exposure=$(echo "$report" | sed -n 's/.*Overall exposure level for appliance.service: \([0-9.]*\).*/\1/p')
python3 -c "import sys; sys.exit(0 if float('$exposure') <= 2.0 else 1)" \
    || fail "appliance.service exposure $exposure > 2.0"
echo "exposure=$exposure"

# The daemon answers on port 80 (504 is fine: no control plane is reachable from the build).
python3 - <<'PY' || fail "nothing answers on port 80"
import time, urllib.error, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        status = urllib.request.urlopen("http://127.0.0.1/?no_redirect", timeout=5).status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit(1)
        time.sleep(0.5)
        continue
    print(f"port 80 answers: HTTP {status}")
    break
PY

user=$(stat -c %U "/proc/$(systemctl show -p MainPID --value appliance.service)")
[ "$user" = appliance ] || fail "the daemon runs as '$user', not 'appliance'"
for unit in appliance.service appliance-guestconfig.service systemd-networkd.service \
            systemd-resolved.service systemd-timesyncd.service getty@tty1.service \
            serial-getty@ttyS0.service; do
    state=$(systemctl is-active "$unit" || true)
    echo "$unit: $state"
    [ "$state" = active ] || fail "$unit is $state"
done
failed=$(systemctl list-units --failed --no-legend --plain)
[ -z "$failed" ] || fail "failed units: $failed"

# The kernel for VMs (packages.txt: LZ4, not xz) and the drivers vSphere's virtual hardware
# needs (PVSCSI, VMXNET3) and QEMU's (virtio), disks and network adapters alike.
kernel=$(ls /lib/modules | head -1)
case "$kernel" in *-cloud-amd64) ;; *) fail "kernel $kernel is not Debian's cloud kernel" ;; esac
initrd=$(lsinitramfs /boot/initrd.img-"$kernel")
for mod in vmw_pvscsi virtio_blk virtio_scsi virtio_net vmxnet3; do
    grep -q "/$mod.ko" <<<"$initrd" || fail "$mod is not in the initramfs"
done
modinfo -n vmxnet3 >/dev/null || fail "no vmxnet3 driver"
# The allow-lists hold (dpkg-excludes.txt, initramfs-tools/modules): a few MB each, not the
# package's 91 and MODULES=most's 31.
kernel_mods=$(du -sm "/lib/modules/$kernel" | cut -f1)
[ "$kernel_mods" -le 16 ] || fail "the kernel's modules take $kernel_mods MiB (allow-list: about 6)"
initrd_mib=$(( $(stat -c %s /boot/initrd.img-"$kernel") / 1048576 ))
[ "$initrd_mib" -le 12 ] || fail "the initramfs is $initrd_mib MiB (MODULES=list: a few)"
echo "kernel modules ${kernel_mods} MiB, initramfs ${initrd_mib} MiB"

# The boot settings (docs/image.md, "Boot"): TSC clock and one line per unit on the serial
# console, the consoles waiting for the daemon, the units that do nothing here masked.
for opt in tsc=reliable systemd.show_status=1; do
    grep -qw -- "$opt" /proc/cmdline || fail "$opt is not on the kernel command line"
done
for unit in getty@tty1.service serial-getty@ttyS0.service; do
    systemctl show -p ExecStartPre --value "$unit" | grep -q wait-daemon \
        || fail "$unit does not wait for the daemon"
done
# The daemon starts beside appliance-guestconfig and waits for its marker (appliance-serve).
[ -e /run/appliance-guestconfig/done ] || fail "appliance-guestconfig left no marker"
systemctl show -p ExecStart --value appliance.service | grep -q appliance-serve \
    || fail "appliance.service does not start through appliance-serve"
for unit in appliance.service systemd-udevd.service systemd-networkd.service; do
    [ "$(systemctl show -p StartupCPUWeight --value "$unit")" = 1000 ] \
        || fail "$unit has no boot CPU weight"
done
# The boot's work that is not on the way to a key waits for the daemon to say it is ready.
[ "$(systemctl show -p Type --value appliance.service)" = notify ] \
    || fail "appliance.service is not Type=notify"
[ "$(systemctl is-enabled appliance-coldplug.service)" = enabled ] \
    || fail "appliance-coldplug.service is not enabled"
for unit in systemd-resolved.service systemd-timesyncd.service appliance-coldplug.service; do
    systemctl show -p After --value "$unit" | grep -qw appliance.service \
        || fail "$unit does not wait for the daemon"
done
for unit in e2scrub_reap.service systemd-pstore.service modprobe@drm.service; do
    [ "$(systemctl is-enabled "$unit" 2>/dev/null || true)" = masked ] || fail "$unit is not masked"
done
echo "verified"
