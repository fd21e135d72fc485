#!/usr/bin/env bash
# `make run`: the reference control plane on the host, the appliance OVA in QEMU beside it.
#
# usage: tools/run-vm.sh build/backup-gateway-VERSION.ova
# env:   HTTP_PORT (8080), CP_PORT (8443), HYPERVISOR_PORT (16509), APPLIANCE_ACCEL,
#        FIRMWARE=bios|uefi, FRESH=1 (new disk)
#
# The VM's serial console is this terminal; leave with the console's power-off, or Ctrl-A x.
# The guest reaches nothing beyond this machine (QEMU user networking with restrict=on): its
# port 80 is forwarded to 127.0.0.1:$HTTP_PORT and its 10.0.2.100:8443 is relayed to the
# control plane on 127.0.0.1:$CP_PORT; its 10.0.2.101:16509 is relayed to 127.0.0.1:$HYPERVISOR_PORT,
# where `python -m tools.demohypervisor start` puts a demo libvirtd (started before or after
# the VM: each guest connection is relayed on its own), and 10.0.2.101:10809-10872 to the
# same ports here (libvirt's NBD backup exports, which the gateway reads backups from). The VM's disk (an overlay in build/run) and the control
# plane's state (build/controlplane) are kept between runs, like a deployed appliance.
set -euo pipefail
ova=${1:?usage: run-vm.sh OVA}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=$repo/.venv/bin/python
http_port=${HTTP_PORT:-8080}
cp_port=${CP_PORT:-8443}
hv_port=${HYPERVISOR_PORT:-16509}
work=$repo/build/run
cp_state=$repo/build/controlplane
mkdir -p "$work" "$cp_state"

port_free() { "$py" -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }
for p in "$http_port" "$cp_port"; do
    port_free "$p" || { echo "run-vm: 127.0.0.1:$p is in use (set HTTP_PORT / CP_PORT)" >&2; exit 1; }
done

"$py" -m controlplane serve --listen "127.0.0.1:$cp_port" --state-dir "$cp_state" \
    >"$work/controlplane.log" 2>&1 &
cp_pid=$!
qemu_pid=
stop_all() {
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
    kill "$cp_pid" 2>/dev/null && wait "$cp_pid" 2>/dev/null
    echo "run-vm: control plane stopped (log: $work/controlplane.log)"
}
trap stop_all EXIT
trap 'exit 130' INT TERM HUP
"$py" - "$cp_port" "$cp_pid" <<'PY' || { cat "$work/controlplane.log" >&2; exit 1; }
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("run-vm: the control plane exited")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit("run-vm: the control plane did not start listening within 30 s")
PY

accel=$("$repo/tools/image/accel.sh")
fresh=()
[ -n "${FRESH:-}" ] && fresh=(--fresh)
mapfile -d '' qemu < <("$py" "$repo/tools/image/vm.py" argv --ova "$ova" --workdir "$work" \
    --http-port "$http_port" --control-plane-port "$cp_port" --hypervisor-port "$hv_port" \
    --accel "$accel" \
    --firmware "${FIRMWARE:-bios}" "${fresh[@]}")

cat <<MSG
==> control plane: http://127.0.0.1:$cp_port (state $cp_state, log $work/controlplane.log)
==> booting the appliance ($accel, ${FIRMWARE:-bios}); its port 80 is http://127.0.0.1:$http_port
==> the VM's qemu+tcp://10.0.2.101:16509/system is this machine's 127.0.0.1:$hv_port
    (and its 10.0.2.101:10809-10872, a backup's NBD exports, this machine's same ports)
    (a demo hypervisor there: .venv/bin/python -m tools.demohypervisor start --port $hv_port)
    From another terminal, once the console shows up (about 20 s under TCG):

    eval "\$(.venv/bin/python -m controlplane env --state-dir $cp_state)"
    curl "http://127.0.0.1:$http_port/?activationRegion=us-west-2&gatewayType=BACKUP_VM&no_redirect"
    .venv/bin/aws backup-gateway create-gateway --activation-key KEY --gateway-display-name demo \\
        --gateway-type BACKUP_VM --endpoint-url http://127.0.0.1:$cp_port --region us-west-2
    .venv/bin/aws backup-gateway list-gateways --endpoint-url http://127.0.0.1:$cp_port --region us-west-2

    Leave: power off from the console, or Ctrl-A x.
MSG
# In the background (stdin kept: it is the serial console) so a signal to this script still
# reaches the trap, which stops QEMU and the control plane.
"${qemu[@]}" <&0 &
qemu_pid=$!
rc=0
wait "$qemu_pid" || rc=$?
qemu_pid=
echo "run-vm: QEMU exited ($rc)"
