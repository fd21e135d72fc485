#!/bin/bash
# Runs inside Packer's build VM as root: installs the appliance from /tmp/stage (made by
# tools/image/build-ova.sh). Nothing here uses the network: every package is in the base disk.
set -euo pipefail
stage=/tmp/stage
rm -rf "$stage" && mkdir -p "$stage" && tar -xf /tmp/stage.tar -C "$stage" && rm /tmp/stage.tar
version=$(cat "$stage/VERSION")

# The code: /opt/appliance/VERSION, found by Debian's python3 through a .pth file pointing at
# the `current` link, so a software update is a new folder and a link swap.
install -d -m 0755 /opt/appliance
rm -rf "/opt/appliance/$version"
cp -r "$stage/src" "/opt/appliance/$version"
chown -R root:root "/opt/appliance/$version"
chmod -R u=rwX,go=rX "/opt/appliance/$version"
python3 -m compileall -q "/opt/appliance/$version"   # the daemon may not write __pycache__
ln -sfn "$version" /opt/appliance/current
echo /opt/appliance/current >/usr/lib/python3/dist-packages/backup-gateway-appliance.pth

install -D -m 0755 "$stage/guest/guestconfig.py" /usr/lib/appliance-image/guestconfig.py
# The release key's public half: the update installer accepts only bundles it signed.
install -D -m 0644 "$stage/release-key.pub" /usr/share/appliance/release-key.pub
cp -r "$stage/overlay/." /
chown -R root:root /etc/appliance /etc/initramfs-tools
# The initramfs was made with these settings by make-base-disk.sh, at the build machine's
# speed (here, under TCG, it took a minute); a kernel update in the VM uses them too.

# The units: the daemon, the boot-time settings, the update installer and its trigger, the
# console on tty1 and ttyS0.
install -m 0644 "$stage"/systemd/*.service "$stage"/systemd/*.path /etc/systemd/system/
install -m 0644 "$stage"/systemd/sysusers.d/*.conf /usr/lib/sysusers.d/
for dropin in "$stage"/systemd/*.service.d; do
    install -d "/etc/systemd/system/$(basename "$dropin")"
    install -m 0644 "$dropin"/*.conf "/etc/systemd/system/$(basename "$dropin")/"
done
install -m 0644 "$stage"/systemd/network/*.network /etc/systemd/network/
systemd-sysusers
systemctl daemon-reload
systemctl enable appliance-guestconfig.service appliance.service appliance-coldplug.service \
    systemd-timesyncd.service systemd-networkd.service systemd-resolved.service \
    appliance-update.path appliance-update.service
# Units the appliance never needs, whose kernel modules the image leaves out
# (dpkg-excludes.txt): binfmt_misc (foreign executable formats).
systemctl mask systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
    proc-sys-fs-binfmt_misc.mount
systemctl reset-failed   # this build VM's boot tried them before they were masked
systemctl restart appliance-guestconfig.service
systemctl restart appliance.service
systemctl restart getty@tty1.service serial-getty@ttyS0.service
echo "installed appliance $version"
