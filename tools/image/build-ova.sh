#!/usr/bin/env bash
# Build the appliance OVA: base disk (mmdebstrap) -> Packer (install, verify, clean up) ->
# streamOptimized VMDK -> OVF + SHA256 manifest -> OVA.
#
# usage: tools/image/build-ova.sh VERSION OUT.ova
# env:   APPLIANCE_ACCEL=kvm|tcg (default: probed by accel.sh), DEBIAN_MIRROR,
#        DEBIAN_SECURITY_MIRROR, DISK_MIB (virtual disk size, default 80 GiB)
set -euo pipefail

version=${1:?usage: build-ova.sh VERSION OUT.ova}
out=${2:?usage: build-ova.sh VERSION OUT.ova}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
work=$(dirname "$out")/image
export DISK_MIB=${DISK_MIB:-81920}
python=$repo/.venv/bin/python
[ -x "$python" ] || python=python3
t0=$(date +%s)
step() { echo "==> [$(( $(date +%s) - t0 ))s] $*"; }

mkdir -p "$work"
accel=$("$here/accel.sh")
step "accelerator: $accel"

# A key for this build only: its public half goes into the base disk, the cleanup step
# removes it (and sshd) from the image, and this copy is deleted at the end.
rm -f "$work/build_key" "$work/build_key.pub"
ssh-keygen -q -t ed25519 -N '' -C "packer-build-$$" -f "$work/build_key"

step "base disk"
"$here/make-base-disk.sh" "$work" "$work/build_key.pub" "$work/base.raw"

step "staging the appliance $version"
stage=$work/stage
rm -rf "$stage"
mkdir -p "$stage/src" "$stage/guest"
echo "$version" >"$stage/VERSION"
# The committed file list when in git (no stray editor or cache files), else the folder.
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z gatewaycore appliance | xargs -0 cp --parents -t "$stage/src")
else
    (cd "$repo" && find gatewaycore appliance -type f -not -name '*.pyc' -print0 | xargs -0 cp --parents -t "$stage/src")
fi
cp "$here/guest/guestconfig.py" "$stage/guest/"
# The release key the image trusts (docs/updates.md): the development key, made once in
# build/release/ and kept (bundles signed with it install on every image built with it).
(cd "$repo" && "$python" -m tools.release keygen)
cp "$repo/build/release/release-key.pub" "$stage/release-key.pub"
cp -r "$here/overlay" "$stage/overlay"
cp -r "$repo/systemd" "$stage/systemd"
tar -C "$stage" -cf "$stage.tar" .

step "packer build ($(packer version | head -1))"
packer_dir=$work/packer-out
rm -rf "$packer_dir"
export CHECKPOINT_DISABLE=1 PACKER_CACHE_DIR=$work/packer_cache PACKER_NO_COLOR=1
if packer version | grep -qE 'v1\.[0-6]\.'; then :; else packer init "$repo/packer/plugins"; fi
packer build -color=false -timestamp-ui \
    -var "base_disk=$work/base.raw" \
    -var "output_dir=$packer_dir" \
    -var "stage_dir=$stage" \
    -var "ssh_private_key_file=$work/build_key" \
    -var "accelerator=$accel" \
    -var "serial_log=$work/packer-serial.log" \
    "$repo/packer"
rm -f "$work/base.raw" "$work/build_key" "$work/build_key.pub"

step "streamOptimized VMDK"
vmdk=$work/disk.vmdk
rm -f "$vmdk"
qemu-img convert -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic \
    "$packer_dir/appliance.qcow2" "$vmdk"
rm -rf "$packer_dir" "$stage" "$stage.tar"

step "OVA"
"$python" "$here/make_ovf.py" --version "$version" --disk "$vmdk" --out "$out"
rm -f "$vmdk"
size_mib=$(( $(stat -c %s "$out") / 1048576 ))
step "done: $out, ${size_mib} MiB, built in $(( $(date +%s) - t0 )) s"
[ "$size_mib" -le 300 ] || echo "WARNING: the OVA is ${size_mib} MiB, over the 300 MiB target" >&2
