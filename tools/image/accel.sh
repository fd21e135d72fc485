#!/usr/bin/env bash
# Print the QEMU accelerator to use: $APPLIANCE_ACCEL if set, else "kvm" when /dev/kvm really
# runs a guest, else "tcg". Some hosts (nested or paravirtual KVM) offer a /dev/kvm whose
# guests hang as soon as they leave real mode, so opening it is not proof: we boot a
# firmware with a 10 s deadline and look for its first line on the serial port.
# The answer is cached in build/.accel (delete it to probe again).
set -euo pipefail
if [ -n "${APPLIANCE_ACCEL:-}" ]; then echo "$APPLIANCE_ACCEL"; exit 0; fi
cache="$(cd "$(dirname "$0")/../.." && pwd)/build/.accel"
if [ -s "$cache" ]; then cat "$cache"; exit 0; fi
accel=tcg
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    out=$(timeout 10 qemu-system-x86_64 -accel kvm -m 128 -nographic -nodefaults -serial stdio \
          -bios /usr/share/OVMF/OVMF_CODE.fd -no-reboot 2>/dev/null | head -c 4096 || true)
    if grep -qa . <<<"$out"; then accel=kvm; fi
fi
mkdir -p "$(dirname "$cache")"
echo "$accel" >"$cache"
echo "$accel"
