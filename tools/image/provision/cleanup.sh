#!/bin/bash
# Last step in Packer's build VM: remove what was only for the build and what must be unique
# per VM. Packer's SSH connection outlives sshd's removal; its shutdown command runs over it.
set -euo pipefail
systemctl stop appliance.service appliance-guestconfig.service
# The identity key and state the checks created: each VM makes its own at first start.
rm -rf /var/lib/appliance /var/lib/private/appliance /var/lib/appliance-guestconfig
rm -f /etc/appliance/console-password
# sshd, its host keys and the build key: the appliance is managed from its console.
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq openssh-server openssh-sftp-server >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get autoremove --purge -y -qq >/dev/null
rm -rf /root/.ssh /etc/ssh/ssh_host_*
# machine-id empty: systemd makes a new one at first boot (and runs ConditionFirstBoot units).
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
journalctl --rotate --vacuum-time=1s >/dev/null 2>&1 || true
rm -rf /var/log/journal/* /var/tmp/* /root/.bash_history /root/.cache
find /var/log -type f -exec truncate -s 0 {} +
rm -rf /tmp/stage
fstrim -a || true    # freed blocks leave the qcow2 (virtio discard=unmap), so the VMDK is smaller
echo "cleaned"
