#!/usr/bin/env bash
# make-base-disk.sh's CUSTOMIZE_HOOK for the bare-Debian baseline: an HTTP server on port 80
# (Python's http.server, started once the network is configured, as a web service would be)
# and a login prompt on the serial port (Debian's default getty, from console=ttyS0).
set -euo pipefail
root=$1
echo bare-debian >"$root/etc/hostname"
mkdir -p "$root/srv/www"
echo "bare Debian" >"$root/srv/www/index.html"
cat >"$root/etc/systemd/system/bare-http.service" <<'UNIT'
[Unit]
Description=HTTP on port 80 (the bare-Debian boot baseline)
After=network.target

[Service]
ExecStart=/usr/bin/python3 -m http.server 80 --directory /srv/www

[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable --quiet bare-http.service
